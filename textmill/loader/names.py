"""Checkpoint tensor names -> model parameter names, and the layout changes formats make.

Models in textmill/models/ use Hugging Face parameter names without the leading "model."
(or "transformer." for GPT-2): `layers.3.self_attn.q_proj.weight`, `h.3.attn.c_attn.weight`.
Everything format-specific about names and layouts lives here, so that no model's forward()
knows where its weights came from:

- GGUF (llama.cpp's converter): its own tensor names; q/k rows permuted for Llama; Gemma's
  norm weights stored with the 1 of (1 + weight) already added.
- Hugging Face safetensors: a prefix to strip, buffers to skip, and GPT-2's Conv1D weights
  stored (in, out) rather than nn.Linear's (out, in).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch

from textmill.config import ModelConfig


@dataclass(frozen=True)
class GGUFNames:
    """One architecture's table: GGUF name -> model module path."""

    block_prefix: str  # the model's name for block i: f"{block_prefix}.{i}."
    globals: Mapping[str, str]  # "token_embd" -> "embed_tokens"
    blocks: Mapping[str, str]  # inside `blk.{i}.`: "attn_q" -> "self_attn.q_proj"


_DECODER_GLOBALS = MappingProxyType({
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
})
_ATTENTION = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}
_GATED_MLP = {
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama and Qwen2 (whose q/k/v biases follow the same names with `.bias`).
_LLAMA = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({
    "attn_norm": "input_layernorm",
    **_ATTENTION,
    "ffn_norm": "post_attention_layernorm",
    **_GATED_MLP,
}))
# Qwen3: Llama's, plus each head's q and k norm.
_QWEN3 = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({
    **_LLAMA.blocks,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}))
# Gemma 2 and 3 have four norms per block: llama.cpp's ffn_norm is its pre-feedforward norm, and
# post_attention_norm is applied to the attention output, not before the MLP as in Llama.
_GEMMA3 = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({
    "attn_norm": "input_layernorm",
    **_ATTENTION,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    **_GATED_MLP,
    "post_ffw_norm": "post_feedforward_layernorm",
}))
# Gemma 4: Gemma 3's names, its per-layer embeddings' (globals and three in each block) and the
# layer's output scale.
_GEMMA4 = GGUFNames("layers", MappingProxyType({
    **_DECODER_GLOBALS,
    "per_layer_token_embd": "embed_tokens_per_layer",
    "per_layer_model_proj": "per_layer_model_projection",
    "per_layer_proj_norm": "per_layer_projection_norm",
}), MappingProxyType({
    **_GEMMA3.blocks,
    "inp_gate": "per_layer_input_gate",
    "proj": "per_layer_projection",
    "post_norm": "post_per_layer_input_norm",
    "layer_output_scale": "layer_scalar",
}))
# OLMo 2 norms only the attention's and the MLP's outputs (Gemma's names for those), and q and
# k over all heads.
_OLMO2 = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({
    **_ATTENTION,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    **_GATED_MLP,
    "post_ffw_norm": "post_feedforward_layernorm",
}))
# A mixture of experts' router and experts (models/moe.py); the loader names each expert's
# tensors `ffn_gate.{e}` and so on (gguf_experts.expert_parts), as older Mixtral files do.
_EXPERTS = {"ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
            "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
            "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
_LLAMA_MOE = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({**_LLAMA.blocks, **_EXPERTS}))
# Qwen3 MoE; OLMoE (q and k normed over all heads, the same names).
_QWEN3_MOE = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({**_QWEN3.blocks, **_EXPERTS}))
# gpt-oss: Llama's names but for its pre-MLP norm, plus each layer's attention sinks.
_GPT_OSS = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({
    **_LLAMA_MOE.blocks,
    "post_attention_norm": "post_attention_layernorm",
    "attn_sinks": "self_attn.sinks",
}))
# ERNIE 4.5 MoE: Llama's names with experts, and the router's selection bias (exp_probs_b).
_ERNIE_MOE = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({**_LLAMA_MOE.blocks,
                                                                     "exp_probs_b": "mlp.selection_bias"}))
# Parameters of a module itself, not a submodule's weight: the file's `.weight` (`.bias`) is dropped.
# Qwen3.5 (models/qwen35.py): Qwen3's attention (q_proj with each head's gate) in one layer of four,
# gated delta nets in the others. Its convolution, dt bias and A (-exp(A_log)) are parameters of
# their own; `ssm_a` has no .weight in the file.
_QWEN35 = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({
    **_QWEN3.blocks,
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_conv1d": "linear_attn.conv_weight",
    "ssm_dt": "linear_attn.dt_bias",
    "ssm_a": "linear_attn.A",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
}))
# LFM2 (models/lfm2.py): Llama's blocks with short convolutions in most layers; its final norm is
# `token_embd_norm` in the file.
_LFM2 = GGUFNames("layers", MappingProxyType({**_DECODER_GLOBALS, "token_embd_norm": "norm"}), MappingProxyType({
    **_QWEN3.blocks,
    "shortconv.in_proj": "conv.in_proj",
    "shortconv.conv": "conv.conv_weight",
    "shortconv.out_proj": "conv.out_proj",
}))
# Their mixtures of experts (Qwen3.5 MoE: Qwen2 MoE's gated shared expert; LFM2 MoE: a selection bias).
_QWEN35_MOE = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({**_QWEN35.blocks, **_EXPERTS}))
# Qwen3-Next: Qwen3.5 MoE's names, beta's and alpha's projections in one tensor.
_QWEN3NEXT = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({**_QWEN35_MOE.blocks,
                                                                  "ssm_ba": "linear_attn.in_proj_ba"}))
_LFM2_MOE = GGUFNames("layers", _LFM2.globals, MappingProxyType({**_LFM2.blocks, **_EXPERTS,
                                                                 "exp_probs_b": "mlp.selection_bias"}))
# GLM-4 (models/glm4.py): its norms after attention and after the MLP are llama.cpp's post norms, its
# pre-MLP norm the ffn_norm; gate and up are one ffn_up (FUSED_GGUF).
_GLM4 = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({
    **_LLAMA.blocks,
    "post_attention_norm": "post_self_attn_layernorm",
    "post_ffw_norm": "post_mlp_layernorm",
}))
# Granite 4.0-H and Nemotron-H (models/granite_hybrid.py, nemotron_h.py): Llama's names (experts and a shared
# one in H-Tiny's; Nemotron 3 Nano's with a selection bias), Mamba-2's in the recurrent layers; its A and D
# (`ssm_a`, `ssm_d`) have no .weight in the file.
_GRANITE_HYBRID = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({
    **_LLAMA_MOE.blocks, "exp_probs_b": "mlp.selection_bias", "ssm_in": "mamba.in_proj", "ssm_conv1d": "mamba.conv1d",
    "ssm_dt": "mamba.dt_bias", "ssm_a": "mamba.A", "ssm_d": "mamba.D", "ssm_norm": "mamba.norm",
    "ssm_out": "mamba.out_proj"}))
# Falcon-H1 (models/falcon_h1.py): Llama's attention and MLP names and Granite 4.0-H's mixer in every
# layer; its pre-MLP norm is `ffn_norm` with no .weight in the file.
_FALCON_H1 = GGUFNames("layers", _DECODER_GLOBALS, MappingProxyType({**_GRANITE_HYBRID.blocks,
                                                                   "ffn_norm": "pre_ff_layernorm"}))
_BARE_PARAMS = frozenset({"self_attn.sinks", "mlp.selection_bias", "layer_scalar", "linear_attn.conv_weight",
                          "linear_attn.dt_bias", "linear_attn.A", "conv.conv_weight", "mamba.dt_bias", "mamba.A",
                          "mamba.D"})
_GPT2 = GGUFNames("h", MappingProxyType({
    "token_embd": "wte",
    "position_embd": "wpe",
    "output_norm": "ln_f",
    "output": "lm_head",
}), MappingProxyType({
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}))

# Keyed by GGUF `general.architecture`.
GGUF_NAMES: Mapping[str, GGUFNames] = MappingProxyType({
    "llama": _LLAMA_MOE,  # Mixtral's files are "llama" files with experts
    "smollm3": _LLAMA,
    "granite": _LLAMA,
    "granitemoe": _LLAMA_MOE,  # Granite 3.x MoE (1B-A400M, 3B-A800M): Granite's multipliers, experts
    "granitemoeshared": _LLAMA_MOE,  # ... and a shared expert
    "ernie4_5": _LLAMA,
    "ernie4_5-moe": _ERNIE_MOE,
    "mistral3": _LLAMA,
    "exaone": _LLAMA,  # its rows unpermuted (not in QK_PERMUTED_ARCHS)
    "internlm2": _LLAMA,  # q, k and v split out of its wqkv by the converter
    "phi3": _LLAMA,  # after its fused tensors are split (FUSED_GGUF)
    "qwen2": _LLAMA,
    "qwen2vl": _LLAMA,
    "qwen2moe": _LLAMA_MOE,
    "qwen3": _QWEN3,
    "qwen3vl": _QWEN3,
    "qwen3moe": _QWEN3_MOE,
    "qwen3vlmoe": _QWEN3_MOE,
    "olmoe": _QWEN3_MOE,
    "gpt-oss": _GPT_OSS,
    "olmo2": _OLMO2,  # unpermuted q/k rows (rotate-half RoPE in ggml too)
    "glm4": _GLM4,  # its q/k rows' rotated part reordered (unpermute_partial_rope_rows)
    "exaone4": _OLMO2,  # the same names, its q/k norms one head wide
    "gemma": _GEMMA3,  # the same names; Gemma 1 has only attn_norm and ffn_norm
    "gemma2": _GEMMA3,  # the same names; Gemma 2 has no attn_q_norm / attn_k_norm
    "gemma3": _GEMMA3,
    "gemma4": _GEMMA4,  # its norms as they are: Gemma 4's RMSNorm multiplies by the weight itself
    "qwen35": _QWEN35,  # its norms as stored (1 + w), multiplied plainly as Gemma 4's
    "qwen35moe": _QWEN35_MOE,
    "qwen3next": _QWEN3NEXT,
    "lfm2": _LFM2,
    "lfm2moe": _LFM2_MOE,
    "granitehybrid": _GRANITE_HYBRID,
    "nemotron_h": _GRANITE_HYBRID,  # the same names: attn_norm the layer's one norm, ffn_up/ffn_down its MLP's
    "nemotron_h_moe": _GRANITE_HYBRID,
    "falcon-h1": _FALCON_H1,
    "gpt2": _GPT2,
})

# llama.cpp's converter reorders the rows of q and k for these architectures so that ggml's
# interleaved ("GPT-J style") RoPE sees pairs (2i, 2i+1); the models here use rotate-half
# pairs (i, i + D/2), so the loader puts the rows back. Qwen2 and Gemma 2/3 use ggml's NEOX
# (rotate-half) RoPE and are stored unpermuted, as is Qwen3. SmolLM3's, Granite's (Nemotron-H's
# too) and Ministral 3's converters are Llama's, and InternLM2's permutes its q and k so. ERNIE
# 4.5's leaves its rows alone, but its own RoPE pairs (2i, 2i + 1) already: put back the same way.
QK_PERMUTED_ARCHS = frozenset({"llama", "smollm3", "granite", "granitemoe", "granitemoeshared", "granitehybrid",
                               "nemotron_h", "nemotron_h_moe", "ernie4_5", "ernie4_5-moe", "mistral3", "internlm2"})
# Qwen3.5's layers in a file: q_proj with each head's gate, maybe multi-token-prediction blocks at the end.
QWEN35_ARCHS = frozenset({"qwen35", "qwen35moe", "qwen3next"})
# llama.cpp's converter stores Gemma norm weights as 1 + weight (ggml multiplies plainly).
NORM_PLUS_ONE_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})

_BLOCK_RE = re.compile(r"blk\.(\d+)\.([\w.]+?)(?:\.(weight|bias))?")
_EXPERT_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


# Tensors an architecture stores fused, split by rows into the model's own parts, in order,
# each with its width: "q" (heads x head_dim), "kv" (kv heads x head_dim), "ffn". Phi-3
# keeps q, k and v in one attn_qkv (qkv_proj) and gate and up in one ffn_up (gate_up_proj)
# of twice the width; SwiGLU takes the gate from its first half, as llama.cpp and HF do.
_Parts = tuple[tuple[str, str], ...]
_QKV_GATE_UP = MappingProxyType({"attn_qkv": (("attn_q", "q"), ("attn_k", "kv"), ("attn_v", "kv")),
                                  "ffn_up": (("ffn_gate", "ffn"), ("ffn_up", "ffn"))})
FUSED_GGUF: Mapping[str, Mapping[str, _Parts]] = MappingProxyType({"phi3": _QKV_GATE_UP, "glm4": _QKV_GATE_UP})
FUSED_HF: Mapping[str, Mapping[str, _Parts]] = MappingProxyType({
    "phi3": MappingProxyType({
        "self_attn.qkv_proj": (("self_attn.q_proj", "q"), ("self_attn.k_proj", "kv"), ("self_attn.v_proj", "kv")),
        "mlp.gate_up_proj": (("mlp.gate_proj", "ffn"), ("mlp.up_proj", "ffn"))}),
})


def fused_parts(table: Mapping[str, Mapping[str, _Parts]], arch: str, name: str, config: ModelConfig,
                rows: int) -> list[tuple[str, int, int]] | None:
    """A fused tensor's parts as (name, first row, end row) in the checkpoint's own naming
    (`blk.3.attn_qkv.weight` -> `blk.3.attn_q.weight`, rows 0..q, ...); None for the rest.
    `rows`: the tensor's, which the parts must cover exactly."""
    widths = {"q": config.num_heads * config.head_dim, "kv": config.num_kv_heads * config.head_dim,
              "ffn": config.intermediate_size}
    for whole, parts in table.get(arch, {}).items():
        for kind in ("weight", "bias"):
            suffix = f"{whole}.{kind}"
            if name == suffix or name.endswith("." + suffix):
                base, out, start = name[:len(name) - len(suffix)], [], 0
                for part, width in parts:
                    out.append((f"{base}{part}.{kind}", start, start + widths[width]))
                    start += widths[width]
                if start != rows:
                    raise ValueError(f"{name} has {rows} rows, not the {start} its parts need")
                return out
    return None


def gguf_param_name(arch: str, gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; ValueError if unknown."""
    names = GGUF_NAMES.get(arch)
    if names is None:
        raise ValueError(f"no GGUF tensor names known for architecture {arch!r}")
    if (m := _EXPERT_RE.fullmatch(gguf_name)) and "ffn_gate_inp" in names.blocks:
        layer, part, expert, kind = m.groups()
        return f"{names.block_prefix}.{layer}.mlp.experts.{expert}.{part}_proj.{kind}"
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        target = names.blocks.get(part)
        if target in _BARE_PARAMS:
            return f"{names.block_prefix}.{layer}.{target}"
        if target is not None:  # a module's weight the file names without .weight (Falcon-H1's ffn_norm)
            return f"{names.block_prefix}.{layer}.{target}.{kind or 'weight'}"
    elif m := _GLOBAL_RE.fullmatch(gguf_name):
        part, kind = m.groups()
        if part in names.globals:
            return f"{names.globals[part]}.{kind}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a GGUF file of architecture {arch!r}")


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. weight: (num_heads * D, ...) -> same shape.

    The converter views each head's D rows as (2, D/2) and transposes them to (D/2, 2), so
    row 2i holds HF row i and row 2i + 1 holds HF row i + D/2. Transposing back restores
    HF order.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def ungate_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Qwen3.5's q_proj rows, each head's D of query then D of gate, as all heads' queries then all
    heads' gates: the queries are then one block of the output, as other families' are (and
    Qwen3-Next's beta/alpha rows, each key head's b then its a, as every b then every a)."""
    w = weight.reshape(num_heads, 2, -1, *weight.shape[1:])
    return w.transpose(0, 1).reshape(weight.shape)


def unpermute_partial_rope_rows(weight: torch.Tensor, num_heads: int, rotary_dim: int) -> torch.Tensor:
    """GLM-4's q/k rows: in each head the first rotary_dim rows pair (2i, 2i + 1) (ggml's "normal"
    RoPE, as GLM's own); as the rotate-half pairs (i, i + rotary_dim / 2), the rest as they are."""
    w = weight.reshape(num_heads, -1, *weight.shape[1:]).clone()
    turned = w[:, :rotary_dim].reshape(num_heads, rotary_dim // 2, 2, *weight.shape[1:])
    w[:, :rotary_dim] = turned.transpose(1, 2).reshape(num_heads, rotary_dim, *weight.shape[1:])
    return w.reshape(weight.shape)


def to_model_layout(arch: str, param_name: str, tensor: torch.Tensor,
                    config: ModelConfig) -> torch.Tensor:
    """A GGUF tensor (already in torch (out, in) order) in the layout the model expects."""
    if arch in NORM_PLUS_ONE_ARCHS and param_name.endswith("norm.weight"):
        return tensor - 1.0
    if param_name.endswith("shared_expert_gate.weight") and tensor.dim() == 1:  # ggml's {n_embd}: one row
        return tensor[None]
    if arch in QWEN35_ARCHS and param_name.endswith("self_attn.q_proj.weight"):
        return ungate_rows(tensor, config.num_heads)  # each head's q, then its gate
    if arch == "qwen3next" and param_name.endswith("linear_attn.in_proj_ba.weight"):  # [b | a] per key head
        return ungate_rows(tensor, config.linear_attention.key_heads)
    if param_name.endswith(("mamba.A", "mamba.D", "mamba.norm.weight")):  # ggml's {1, heads}, {width, groups}
        return tensor.reshape(-1)
    module = param_name.rsplit(".", 1)[0]  # weight and bias rows are permuted alike
    if arch == "glm4" and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        heads = config.num_heads if module.endswith("q_proj") else config.num_kv_heads
        return unpermute_partial_rope_rows(tensor, heads, config.rotary_dim or config.head_dim)
    if arch not in QK_PERMUTED_ARCHS:
        return tensor
    if module.endswith("self_attn.q_proj"):
        return unpermute_rope_rows(tensor, config.num_heads)
    if module.endswith("self_attn.k_proj"):
        return unpermute_rope_rows(tensor, config.num_kv_heads)
    return tensor


# --- Hugging Face safetensors -----------------------------------------------------------

# Per registry key: the prefix HF puts before our names. Checkpoints saved by older code
# sometimes lack it (the original gpt2 files), so it is stripped only where present.
HF_PREFIXES: Mapping[str, str] = MappingProxyType({
    "llama": "model.",
    "qwen2": "model.",
    "qwen3": "model.",
    "olmo2": "model.",
    "phi3": "model.",
    "gemma": "model.",
    "gemma2": "model.",
    "gemma3": "model.",
    "gpt2": "transformer.",
})
# Per registry key: HF module names the family spells its own way -> ours. Gemma 1 calls its
# pre-MLP norm what Gemma 2 and 3 call the norm after attention.
HF_RENAMES: Mapping[str, tuple[tuple[str, str], ...]] = MappingProxyType({
    "gemma": ((".post_attention_layernorm.", ".pre_feedforward_layernorm."),),
    # Mixtral's experts: block_sparse_moe.experts.3.w1 is Qwen3 MoE's mlp.experts.3.gate_proj
    "llama": ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
              (".w2.", ".down_proj.")),
})
# Buffers some checkpoints carry that the models compute themselves.
_HF_SKIPPED = re.compile(r".*(\.rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)")
# GPT-2's Conv1D modules store weight as (in, out).
_HF_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


def hf_param_name(arch: str, hf_name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.self_attn.q_proj.weight`;
    None for tensors the model does not hold (cached buffers)."""
    if _HF_SKIPPED.fullmatch(hf_name):
        return None
    name = hf_name.removeprefix(HF_PREFIXES[arch])
    for theirs, ours in HF_RENAMES.get(arch, ()):
        name = name.replace(theirs, ours)
    return name


def hf_to_model_layout(arch: str, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
    if arch == "gpt2" and _HF_CONV1D.fullmatch(param_name):
        return tensor.t().contiguous()
    return tensor
