"""A Hugging Face config.json -> ModelConfig.

Configs on the Hub come from several transformers versions: RoPE settings appear as
`rope_theta` + `rope_scaling` (4.x) or as `rope_parameters` (5.x, per layer type for
Gemma 3), and sliding-window layouts as `sliding_window_pattern` or `layer_types`. Each
family's reader accepts both and fails loudly on settings the models do not implement.
"""
from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from textmill.config import ModelConfig
from textmill.loader.rope_scaling import llama3_freq_factors, yarn
from textmill.models.registry import resolve_architecture

# transformers' activation names -> ModelConfig.hidden_act
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


def read_hf_config(folder: Path, tensor_names: Collection[str] = (), context_window: int | None = None
                   ) -> ModelConfig:
    """`tensor_names` (the checkpoint's) settles whether the LM head is tied when the
    config does not say: a checkpoint without `lm_head.weight` is tied. `context_window`
    (default: the model's own) picks LongRoPE's factors."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    with path.open(encoding="utf-8") as f:
        raw = json.load(f)
    return config_from_dict(raw, tensor_names, name=folder.name, context_window=context_window)


def config_from_dict(raw: dict[str, Any], tensor_names: Collection[str] = (), *,
                     name: str = "", context_window: int | None = None) -> ModelConfig:
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ValueError(f"quantized Hugging Face checkpoints ({method}) are not supported; "
                         "use the float weights or a GGUF file")
    archs = raw.get("architectures") or [raw.get("model_type", "")]
    if raw.get("model_type") == "ernie4_5" or archs[0] == "Ernie4_5ForCausalLM":
        # Its q/k rows pair (2i, 2i + 1) for RoPE; the registry's "ernie4_5" is for GGUF files,
        # whose loader reorders them (names.QK_PERMUTED_ARCHS). This loader does not.
        raise ValueError("ERNIE 4.5 is supported from GGUF files only (llama.cpp's conversion), not folders")
    family = resolve_architecture(archs[0])
    fields = _gpt2(raw) if family == "gpt2" else _decoder_fields(raw, family)
    if (longrope := fields.pop("longrope", None)) is not None:
        fields |= _longrope(raw, longrope, context_window or fields["max_position_embeddings"],
                            (fields["rotary_dim"] or fields["head_dim"]) // 2)
    untied_head = any(n.endswith("lm_head.weight") for n in tensor_names) or not tensor_names
    tied = raw.get("tie_word_embeddings", family in ("gemma", "gemma2", "gemma3", "gpt2")) or not untied_head
    return ModelConfig(architecture=family, vocab_size=int(raw["vocab_size"]),
                       tie_word_embeddings=bool(tied), name=name, **fields)


def _decoder_fields(raw: dict[str, Any], family: str) -> dict[str, Any]:
    """Llama, Mistral, Phi-3, Qwen2, Qwen3, Gemma 2 and 3: the fields they share, then each one's own."""
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    # transformers 4.x keeps partial_rotary_factor at the top level, 5.x inside rope_parameters.
    partial = float(raw.get("partial_rotary_factor") or (raw.get("rope_parameters") or {}).get("partial_rotary_factor")
                    or 1.0)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    rotary = int(head_dim * partial)  # transformers' rounding
    if rotary != head_dim and (family != "phi3" or not 0 < rotary < head_dim or rotary % 2):
        raise ValueError(f"partial_rotary_factor {partial} (RoPE over {rotary} of {head_dim} values) is not "
                         f"supported for {family}")
    fields = dict(
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(raw["max_position_embeddings"]),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=_activation(raw.get("hidden_activation") or raw.get("hidden_act") or "silu"),
        rotary_dim=rotary if rotary < head_dim else None,  # partial rotary (Phi-4-mini)
    )
    if family == "gemma3":
        return fields | _gemma3(raw, fields["num_layers"], fields["head_dim"])
    if family == "gemma2":
        return fields | _gemma2(raw, fields["num_layers"], fields["head_dim"])
    if family == "gemma":  # Gemma 1: Gemma 2 without windows, soft-caps and output norms
        if raw.get("attention_bias"):
            raise ValueError("Gemma checkpoints with attention_bias are not supported")
        # transformers' Gemma takes tanh GELU where hidden_activation is unset, whatever
        # hidden_act says (the first Gemma configs say "gelu").
        act = _activation(raw["hidden_activation"]) if raw.get("hidden_activation") else "gelu_tanh"
        return fields | _rope(raw, None, head_dim=fields["head_dim"], default_theta=10000.0) | dict(
            post_norms=False, query_pre_attn_scalar=float(fields["head_dim"]), hidden_act=act)
    fields |= _rope(raw, None, head_dim=fields["rotary_dim"] or fields["head_dim"], default_theta=10000.0)
    fields |= _moe(raw, family, fields["num_layers"])
    if family == "qwen2":
        return fields | dict(attention_bias=True, sliding_window=_qwen2_window(raw, fields["num_layers"]))
    if family == "qwen3":
        if raw.get("attention_bias"):
            raise ValueError("Qwen3 checkpoints with attention_bias are not supported")
        return fields | dict(qk_norm=True, sliding_window=_qwen2_window(raw, fields["num_layers"]))
    if family == "olmo2":
        return fields | _olmo2(raw, fields["num_layers"], fields["rotary_dim"] or fields["head_dim"])
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    if raw.get("model_type") == "olmoe":  # Llama's block, q and k normed over all heads
        return fields | dict(qk_norm=True, qk_norm_whole=True)
    if raw.get("model_type") == "smollm3" or "no_rope_layers" in raw:
        return fields | _smollm3(raw, fields["num_layers"])
    if family == "llama" and (raw.get("model_type") == "granite" or "residual_multiplier" in raw):
        return fields | _granite(raw)
    return fields | dict(sliding_window=raw.get("sliding_window"))


def _moe(raw: dict[str, Any], family: str, num_layers: int) -> dict[str, Any]:
    """Qwen2 MoE's, Qwen3 MoE's, OLMoE's and Mixtral's experts (models/moe.py): the Qwens' dense
    layers are their mlp_only_layers and those off their decoder_sparse_step; OLMoE's and
    Mixtral's experts are intermediate_size wide, OLMoE's weights not renormalized (Mixtral's
    are); Qwen2 MoE's shared expert is gated."""
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    if not experts:
        return {}
    if family not in ("qwen2", "qwen3", "llama") or raw.get("clip_qkv"):
        raise ValueError(f"{raw.get('model_type')!r} experts are not supported (Qwen2 MoE, Qwen3 MoE, OLMoE and "
                         "Mixtral are)")
    shared = int(raw.get("shared_expert_intermediate_size") or 0)
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = set(raw.get("mlp_only_layers") or ()) | {i for i in range(num_layers) if (i + 1) % step}
    return dict(num_experts=experts, num_experts_per_tok=int(raw["num_experts_per_tok"]),
                moe_intermediate_size=int(raw.get("moe_intermediate_size") or raw["intermediate_size"]),
                norm_topk_prob=bool(raw.get("norm_topk_prob", raw.get("model_type") == "mixtral")),
                dense_layers=tuple(sorted(dense)), shared_expert_intermediate_size=shared or None,
                shared_expert_gate=bool(shared))


def _smollm3(raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """SmolLM3: Llama whose `no_rope_layers` (1 = RoPE, 0 = none; by default every
    `no_rope_layer_interval`-th layer, 4, is 0) say where RoPE is left out; a window as
    Qwen2's (use_sliding_window, layer_types)."""
    every = int(raw.get("no_rope_layer_interval") or 4)
    uses = raw.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(num_layers)]
    if len(uses) < num_layers:
        raise ValueError(f"no_rope_layers has {len(uses)} entries for {num_layers} layers")
    return dict(no_rope_layers=tuple(i for i, use in enumerate(uses[:num_layers]) if not use),
                sliding_window=_qwen2_window(raw, num_layers))


def _olmo2(raw: dict[str, Any], num_layers: int, rotary_dims: int) -> dict[str, Any]:
    """OLMo 2 norms q and k over all heads, EXAONE 4.0 each head alone. OLMo 3 slides a window
    in the layers layer_types names (by default three of every four), whose RoPE is
    rope_parameters' "sliding_attention" (plain), the others' its "full_attention" (YaRN).
    EXAONE 4.0's sliding layers (its 32B) are not modelled; with a window set and no layer
    sliding, transformers turns no layer by RoPE (only where the window is unset or the
    layer slides)."""
    if raw.get("attention_bias"):
        raise ValueError("OLMo 2 checkpoints with attention_bias are not supported")
    if raw.get("model_type") == "olmo3":
        types = raw.get("layer_types") or ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                                           for i in range(num_layers)]
        rope = _rope(raw, "full_attention", head_dim=rotary_dims, default_theta=10000.0)
        local = _rope(raw, "sliding_attention", head_dim=rotary_dims, default_theta=rope["rope_theta"],
                      legacy_scaling=False)
        if len(local) > 1:
            raise ValueError("OLMo 3 with RoPE scaling in its sliding layers is not supported")
        return rope | dict(qk_norm=True, qk_norm_whole=True, sliding_window=raw.get("sliding_window"),
                           sliding_window_pattern=pattern_of_layers([t == "sliding_attention" for t in types]),
                           rope_local_theta=local["rope_theta"])
    if raw.get("model_type") != "exaone4":
        return dict(qk_norm=True, qk_norm_whole=True)
    types = raw.get("layer_types")
    if "sliding_attention" in (types or ()) or (raw.get("sliding_window") and not types):
        raise ValueError("EXAONE 4.0 checkpoints with sliding-window layers (its 32B) are not supported")
    return dict(qk_norm=True, no_rope_layers=tuple(range(num_layers)) if raw.get("sliding_window") else ())


def _granite(raw: dict[str, Any]) -> dict[str, Any]:
    """Granite's four multipliers (transformers' defaults, 1.0, where config.json lacks them)."""
    return dict(sliding_window=raw.get("sliding_window"),
                embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
                attention_scale=float(raw.get("attention_multiplier", 1.0)),
                logit_scale=float(raw.get("logits_scaling", 1.0)))


def _gemma3(raw: dict[str, Any], num_layers: int, head_dim: int) -> dict[str, Any]:
    rope = _rope(raw, "full_attention", head_dim=head_dim, default_theta=1_000_000.0)
    local = _rope(raw, "sliding_attention", head_dim=head_dim, default_theta=10000.0,
                  legacy_theta_key="rope_local_base_freq", legacy_scaling=False)
    if len(local) > 1 or "rope_freq_factors" in rope:
        raise ValueError("Gemma 3 supports linear RoPE scaling of its global layers only")
    layer_types = raw.get("layer_types")
    if layer_types:
        pattern = pattern_of_layers([t == "sliding_attention" for t in layer_types[:num_layers]])
    else:
        pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
    if raw.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 with bidirectional attention (an encoder) is not supported")
    return rope | _gemma_common(raw) | dict(
        qk_norm=True,
        rope_local_theta=local["rope_theta"],
        sliding_window_pattern=pattern,
    )


def _gemma2(raw: dict[str, Any], num_layers: int, head_dim: int) -> dict[str, Any]:
    """Gemma 2: one RoPE base, every other layer local (layer_types where the config has
    them), soft-capped attention scores and logits, no QK norm."""
    rope = _rope(raw, None, head_dim=head_dim, default_theta=10000.0)
    if len(rope) > 1:
        raise ValueError("Gemma 2 with RoPE scaling is not supported")
    layer_types = raw.get("layer_types")
    sliding = ([t == "sliding_attention" for t in layer_types[:num_layers]] if layer_types
               else [i % 2 == 0 for i in range(num_layers)])
    # transformers' Gemma2Config defaults where config.json lacks a key (null still means off).
    defaults = {"sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    return rope | _gemma_common(defaults | raw) | dict(rope_local_theta=rope["rope_theta"],
                                                       sliding_window_pattern=pattern_of_layers(sliding))


def _gemma_common(raw: dict[str, Any]) -> dict[str, Any]:
    return dict(
        sliding_window=raw.get("sliding_window"),
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or 256),
        final_logit_softcap=raw.get("final_logit_softcapping"),
        attn_logit_softcap=raw.get("attn_logit_softcapping"),
        attention_bias=bool(raw.get("attention_bias", False)),
    )


def _gpt2(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("scale_attn_by_inverse_layer_idx") or not raw.get("scale_attn_weights", True):
        raise ValueError("GPT-2 variants with other attention scaling are not supported")
    hidden, heads = int(raw["n_embd"]), int(raw["n_head"])
    return dict(
        hidden_size=hidden,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        num_layers=int(raw["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(raw["n_positions"]),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        hidden_act=_activation(raw.get("activation_function", "gelu_new")),
    )


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _rope(raw: dict[str, Any], layer_type: str | None, *, head_dim: int, default_theta: float,
          legacy_theta_key: str = "rope_theta", legacy_scaling: bool = True) -> dict[str, Any]:
    """rope_theta and the scaling fields, from rope_parameters (5.x) or the 4.x keys;
    `head_dim`: the values of a head that RoPE turns (all but Phi-4-mini's)."""
    params = raw.get("rope_parameters") or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    theta = float(params.get("rope_theta") or raw.get(legacy_theta_key) or default_theta)

    def kind_of(p: dict[str, Any] | None) -> str:  # configs spell it rope_type or (older) type
        return (p or {}).get("rope_type") or (p or {}).get("type") or "default"

    scaling = params if kind_of(params) != "default" else None
    if scaling is None and legacy_scaling:
        scaling = raw.get("rope_scaling")
    kind = kind_of(scaling)
    if kind == "default":
        return dict(rope_theta=theta)
    if kind == "linear":
        return dict(rope_theta=theta, rope_scaling_factor=float(scaling["factor"]))
    if kind == "llama3":
        return dict(rope_theta=theta, rope_freq_factors=llama3_freq_factors(theta, head_dim, scaling))
    if kind in ("longrope", "su") and layer_type is None:  # resolved once the window is known
        return dict(rope_theta=theta, longrope=scaling)
    if kind == "yarn":
        return dict(rope_theta=theta) | _yarn(raw, scaling, theta, head_dim)
    raise ValueError(f"RoPE scaling {kind!r} is not supported (only linear, llama3, longrope and yarn)")


def _yarn(raw: dict[str, Any], params: dict[str, Any], theta: float, rotary_dims: int) -> dict[str, Any]:
    """YaRN as transformers reads it (the original context from the parameters, else the
    config's; the factor given, else their ratio). Ministral 3 also scales each query by
    1 + beta ln(1 + floor(position / original)): exactly 1 below the original context,
    which is where it is served (its window capped there) rather than modelled."""
    positions = int(raw["max_position_embeddings"])
    original = int(params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
                   or positions)
    fields = yarn(theta=theta, rotary_dims=rotary_dims, factor=float(params.get("factor") or positions / original),
                  original=original, beta_fast=float(params.get("beta_fast") or 32.0),
                  beta_slow=float(params.get("beta_slow") or 1.0), attention_factor=params.get("attention_factor"),
                  mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                  truncate=bool(params.get("truncate", True)))
    if params.get("llama_4_scaling_beta"):
        fields["max_position_embeddings"] = min(positions, original)
    return fields


def _longrope(raw: dict[str, Any], params: dict[str, Any], window: int, angles: int) -> dict[str, Any]:
    """Phi-3.5's and Phi-3 128k's LongRoPE, as transformers computes it: divisors from
    short_factor up to the original context, long_factor past it (chosen here once, by the
    window served, as llama.cpp chooses by its context size), and cos/sin scaled by
    attention_factor, by default sqrt(1 + ln(factor) / ln(original))."""
    # transformers takes the top-level original_max_position_embeddings first.
    original = int(raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or raw["max_position_embeddings"])
    factor = params.get("factor") or int(raw["max_position_embeddings"]) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
    if len(params["long_factor"]) != angles or len(params["short_factor"]) != angles:
        raise ValueError(f"LongRoPE needs long_factor and short_factor of {angles} values each")
    factors = params["long_factor"] if window > original else params["short_factor"]
    return dict(rope_freq_factors=tuple(float(f) for f in factors), rope_attention_factor=float(attention))


def _qwen2_window(raw: dict[str, Any], num_layers: int) -> int | None:
    """Qwen2 slides its window only in layers >= max_window_layers, and only if enabled."""
    layer_types = raw.get("layer_types")
    if layer_types:
        sliding = [t == "sliding_attention" for t in layer_types[:num_layers]]
    elif raw.get("use_sliding_window"):
        first = int(raw.get("max_window_layers", num_layers))
        sliding = [i >= first for i in range(num_layers)]
    else:
        return None
    if not any(sliding) or not raw.get("sliding_window"):
        return None
    if not all(sliding):
        raise ValueError("Qwen2 with sliding-window attention in some layers only is not supported")
    return int(raw["sliding_window"])


def pattern_of_layers(sliding: Sequence[bool]) -> int:
    """The period p with layer i global exactly when (i + 1) % p == 0 (ModelConfig's
    sliding_window_pattern): 1 when all are global, len + 1 when all slide."""
    for p in range(1, len(sliding) + 2):
        if all(s == ((i + 1) % p != 0) for i, s in enumerate(sliding)):
            return p
    raise ValueError(f"this layout of sliding and global layers is not supported: {list(sliding)}")
