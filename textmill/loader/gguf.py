"""GGUF files -> (ModelConfig, state dict of torch tensors in the model's names and layout).

The file is memory-mapped by our lean reader (gguf_file.py); each tensor is dequantized once into the
requested dtype, so the float32 copy of one tensor at a time is the peak extra memory. The caller
may pass a faster decoder for whole quantized tensors (the composition root passes the C++
kernels' one, runner/file_weights.file_decoder: 1.2 s for a 1B Q4_K_M file where numpy took
10-27 s, bench/float_load.py); numpy's decoders stay the reference and the fallback.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from textmill.config import ModelConfig
from textmill.loader.dequant import dequantize
from textmill.loader.ggml_types import GGMLQuantizationType
from textmill.loader.gguf_experts import expert_fields, expert_parts
from textmill.loader.gguf_file import GGUFFile, GGUFMetadata, TensorInfo
from textmill.loader.gguf_gemma4 import gemma4_config, unused_kv_tensor
from textmill.loader.gguf_hybrid import HYBRID_CONFIGS, MTP_ARCHS, granite_fields, mtp_tensor
from textmill.loader.group_codes import CodesRef, GGUFRows, convertible
from textmill.loader.hf_config import pattern_of_layers
from textmill.loader.names import FUSED_GGUF, fused_parts, gguf_param_name, to_model_layout
from textmill.loader.rope_scaling import yarn
from textmill.models.registry import resolve_architecture

SMOLLM3_NOPE_EVERY = 4  # llama.cpp's n_no_rope_layer_step for "smollm3" files


def _rope_scaling(meta: GGUFMetadata, theta: float, rotary_dims: int, context: int) -> dict[str, Any]:
    kind = meta.arch_get("rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind == "linear":
        return dict(rope_scaling_factor=float(meta.arch_get("rope.scaling.factor")))
    if kind == "yarn":
        return _yarn(meta, theta, rotary_dims, context)
    raise ValueError(f"RoPE scaling {kind!r} is not supported (only linear and yarn)")


def _yarn(meta: GGUFMetadata, theta: float, rotary_dims: int, context: int) -> dict[str, Any]:
    """YaRN as llama.cpp reads a file (Qwen3's 128k files, Ministral 3): the factor, the
    original context (default: the whole), beta_fast/slow (32/1 where absent), cos and sin
    times 0.1 ln(factor) + 1, or with `yarn_log_multiplier` (Ministral 3's mscale_all_dim)
    the ratio of two such terms, times `rope.scaling.attn_factor`. Where the converter wrote
    the config's own attention_factor (`yarn_attn_factor`), that is taken, as transformers
    takes it (llama.cpp recomputes it). Ministral 3's query temperature
    (`attention.temperature_scale`) is exactly 1 below the original context: its window is
    capped there rather than the temperature modelled."""
    original = int(meta.arch_get("rope.scaling.original_context_length", context))
    log_mul = float(meta.arch_get("rope.scaling.yarn_log_multiplier", 0.0))
    explicit = meta.arch_get("rope.scaling.yarn_attn_factor", None)
    fields = yarn(theta=theta, rotary_dims=rotary_dims, factor=float(meta.arch_get("rope.scaling.factor", 0.0)) or 1.0,
                  original=original, beta_fast=float(meta.arch_get("rope.scaling.yarn_beta_fast", 32.0)),
                  beta_slow=float(meta.arch_get("rope.scaling.yarn_beta_slow", 1.0)),
                  attention_factor=None if explicit is None else float(explicit),
                  mscale=1.0 if log_mul else None, mscale_all_dim=log_mul or None)
    fields["rope_attention_factor"] *= float(meta.arch_get("rope.scaling.attn_factor", 1.0))
    if float(meta.arch_get("attention.temperature_scale", 0.0)):
        fields["max_position_embeddings"] = min(context, original)
    return fields


def _vocab_size(gguf: GGUFFile) -> int:
    """The embedding's rows: what the model computes logits over (a GGUF's token list or
    vocab_size key may differ from it by padding)."""
    embd = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError("the GGUF file has no token_embd.weight tensor")
    return embd.shape[0]  # (vocab, hidden)


def read_config(gguf: GGUFFile, context_window: int | None = None) -> ModelConfig:
    """`context_window`: the longest sequence the model will serve (default: its whole
    window); it picks LongRoPE's factors, as llama.cpp's context size does."""
    meta = GGUFMetadata(gguf)
    if meta.arch == "gemma4":  # per-layer arrays where other files hold one number
        return gemma4_config(gguf, meta, _vocab_size(gguf), _tensor_values(gguf, ROPE_FREQS))
    if meta.arch in HYBRID_CONFIGS:  # recurrent layers beside attention: keys of their own
        return HYBRID_CONFIGS[meta.arch](gguf, meta, _vocab_size(gguf))
    hidden = int(meta.arch_get("embedding_length"))
    heads = int(meta.arch_get("attention.head_count"))
    head_dim = int(meta.arch_get("attention.key_length", hidden // heads))
    rope_dims = int(meta.arch_get("rope.dimension_count", head_dim))
    # Partial rotary: NEOX RoPE with rows unpermuted (Phi-4-mini), or rows reordered at load (GLM-4, not its M-RoPE
    # files, which the converter reordered); other files' interleaved RoPE over part of a head turns other pairs.
    partial = meta.arch == "phi3" or meta.arch == "glm4" and meta.arch_get("rope.dimension_sections", None) is None
    if rope_dims != head_dim and (not partial or rope_dims > head_dim or rope_dims % 2):
        raise ValueError(f"RoPE over {rope_dims} of a head's {head_dim} values is not supported ({meta.arch!r} file)")
    if float(meta.arch_get("rope.scaling.attn_factor", 1.0)) != 1.0 and meta.arch != "phi3" and (
            meta.arch_get("rope.scaling.type", "none") != "yarn"):
        raise ValueError("a RoPE attention factor outside LongRoPE (Phi-3) and YaRN is not supported")
    window = meta.arch_get("attention.sliding_window", None)
    tensor_names = {t.name for t in gguf.tensors}
    fields = dict(
        architecture=resolve_architecture(meta.arch),
        vocab_size=_vocab_size(gguf),
        hidden_size=hidden,
        intermediate_size=int(meta.arch_get("feed_forward_length", 4 * hidden)),
        num_layers=int(meta.arch_get("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.arch_get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta.arch_get("context_length")),
        norm_eps=float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.arch_get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_freq_factors=_tensor_values(gguf, ROPE_FREQS),
        attention_bias=bool({"blk.0.attn_q.bias", "blk.0.attn_qkv.bias"} & tensor_names),  # (Phi-3's is fused)
        sliding_window=int(window) if window else None,
        name=str(meta.get("general.name", "")),
        rotary_dim=rope_dims if rope_dims < head_dim else None,  # partial rotary (Phi-4-mini)
    )
    scaling = _rope_scaling(meta, fields["rope_theta"], rope_dims, fields["max_position_embeddings"])
    if fields["rope_freq_factors"] and scaling.get("rope_freq_factors"):  # both divide, as in ggml's rope
        scaling["rope_freq_factors"] = tuple(a * b for a, b in zip(fields["rope_freq_factors"],
                                                                   scaling["rope_freq_factors"]))
    fields |= scaling | expert_fields(meta, gguf)
    family = fields["architecture"]
    if family in ("gemma2", "gemma3"):
        fields |= _gemma_fields(meta, fields, family)
    elif family == "gemma":  # Gemma 1: no windows, no soft-caps, no output norms; queries by head_dim
        fields |= dict(post_norms=False, query_pre_attn_scalar=float(fields["head_dim"]), hidden_act="gelu_tanh",
                       sliding_window=None)
    elif meta.arch == "olmoe":  # Llama's block, q and k normed over all heads
        fields |= dict(qk_norm=True, qk_norm_whole=True)
    elif family == "qwen3":
        if fields["attention_bias"]:  # transformers' Qwen3 puts a bias on o_proj too: not modelled
            raise ValueError("Qwen3 files with attention biases are not supported")
        fields |= dict(qk_norm=True)
    elif family == "olmo2":
        if fields["sliding_window"] and meta.arch != "olmo2":  # EXAONE 4.0 32B: NoPE in its global layers
            raise ValueError(f"{meta.arch!r} files with sliding-window layers (EXAONE 4.0 32B) are not supported")
        fields |= dict(qk_norm=True, qk_norm_whole=meta.arch == "olmo2")
        if fields["sliding_window"]:  # OLMo 3's "olmo2" files
            fields |= _olmo3_fields(meta, fields)
    elif meta.arch == "smollm3":
        # The file says nothing of its NoPE layers: llama.cpp leaves RoPE out of every 4th
        # layer by rule (n_no_rope_layer_step = 4), as SmolLM3's config does.
        fields |= dict(no_rope_layers=tuple(range(SMOLLM3_NOPE_EVERY - 1, fields["num_layers"], SMOLLM3_NOPE_EVERY)))
    elif meta.arch == "gpt-oss":
        fields |= _gpt_oss_fields(meta)
    elif meta.arch in ("granite", "granitemoe", "granitemoeshared"):
        fields |= granite_fields(meta, fields["num_layers"])
    elif family == "phi3":
        fields |= dict(sliding_window=None)  # llama.cpp ignores Phi-3's window too
        if LONGROPE & tensor_names:
            fields |= _longrope(gguf, meta, context_window or fields["max_position_embeddings"],
                                fields["max_position_embeddings"], (fields["rotary_dim"] or head_dim) // 2)
    if LONGROPE & tensor_names and family != "phi3":
        raise ValueError(f"LongRoPE factors in a {meta.arch!r} file are not supported (only Phi-3's)")
    elif family == "gpt2":
        fields |= dict(norm_eps=float(meta.arch_get("attention.layer_norm_epsilon", 1e-5)),
                       hidden_act="gelu_tanh")  # ggml's GELU is the tanh approximation
    return ModelConfig(**fields)


def _olmo3_fields(meta: GGUFMetadata, fields: dict[str, Any]) -> dict[str, Any]:
    """OLMo 3 as llama.cpp reads its files: the window in the layers the pattern names (per
    layer, or a period; by default three of every four), which turn by plain RoPE on
    `rope.freq_base_swa` (default: the global base); the others are global and take the
    file's RoPE scaling (YaRN)."""
    pattern = meta.arch_get("attention.sliding_window_pattern", 4)
    if isinstance(pattern, list):  # one flag per layer, True = sliding
        pattern = pattern_of_layers([bool(p) for p in pattern])
    return dict(sliding_window_pattern=int(pattern),
                rope_local_theta=float(meta.arch_get("rope.freq_base_swa", fields["rope_theta"])))


def _gpt_oss_fields(meta: GGUFMetadata) -> dict[str, Any]:
    """gpt-oss as llama.cpp builds it: biases on all four attention projections, the router and
    the experts; a sink per head; the window in every other layer from the first (a file's
    pattern where it has one), all on the file's RoPE; the experts' SwiGLU clamped at 7."""
    pattern = meta.arch_get("attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):  # one flag per layer, True = sliding
        pattern = pattern_of_layers([bool(p) for p in pattern])
    return dict(attention_out_bias=True, attention_sinks=True, moe_bias=True, swiglu_limit=7.0,
                sliding_window_pattern=int(pattern))


def _gemma_fields(meta: GGUFMetadata, fields: dict[str, Any], family: str) -> dict[str, Any]:
    """What llama.cpp knows about Gemma 2 and 3 without reading it from the file."""
    layers, hidden, heads = fields["num_layers"], fields["hidden_size"], fields["num_heads"]
    # llama.cpp: the 27B models (Gemma 2's 46 layers, Gemma 3's 62) scale queries by
    # hidden / heads, the others by head_dim (the query_pre_attn_scalar of their HF configs).
    scalar = hidden // heads if layers == {"gemma2": 46, "gemma3": 62}[family] else fields["head_dim"]
    if family == "gemma2":
        # llama.cpp's defaults where a file lacks the keys: every other layer local on a
        # 4096-token window, on the global RoPE base, scores and logits capped at 50 and 30.
        if fields.get("rope_scaling_factor") is not None:  # llama.cpp would scale the local layers too
            raise ValueError("Gemma 2 files with RoPE scaling are not supported")
        defaults = dict(pattern=2, local_theta=fields["rope_theta"], window=4096, attn_cap=50.0, final_cap=30.0)
    else:
        defaults = dict(pattern=6, local_theta=10000.0, window=fields["sliding_window"], attn_cap=None,
                        final_cap=None)
    pattern = meta.arch_get("attention.sliding_window_pattern", defaults["pattern"])
    if isinstance(pattern, list):  # one flag per layer, True = sliding
        pattern = pattern_of_layers([bool(p) for p in pattern])
    window = meta.arch_get("attention.sliding_window", defaults["window"])
    return dict(
        qk_norm=family == "gemma3",
        rope_local_theta=float(meta.arch_get("rope.freq_base_swa", defaults["local_theta"])),
        sliding_window=int(window) if window else None,
        sliding_window_pattern=int(pattern),
        query_pre_attn_scalar=float(scalar),
        final_logit_softcap=_optional_float(meta.arch_get("final_logit_softcapping", defaults["final_cap"])),
        attn_logit_softcap=_optional_float(meta.arch_get("attn_logit_softcapping", defaults["attn_cap"])),
        hidden_act="gelu_tanh",
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# llama.cpp stores Llama 3.1+ RoPE scaling as this tensor of per-frequency divisors; it
# becomes ModelConfig.rope_freq_factors rather than a weight.
ROPE_FREQS = "rope_freqs.weight"


# LongRoPE (Phi-3.5, Phi-3's 128k models): divisors for windows up to the original context
# and divisors past it. They become ModelConfig.rope_freq_factors too, not weights.
LONGROPE = frozenset({"rope_factors_long.weight", "rope_factors_short.weight"})
_ROPE_TENSORS = LONGROPE | {ROPE_FREQS}


def _tensor_values(gguf: GGUFFile, name: str) -> tuple[float, ...] | None:
    tensor = next((t for t in gguf.tensors if t.name == name), None)
    if tensor is None:
        return None
    return tuple(float(f) for f in dequantize(tensor.data, tensor.qtype))


def _longrope(gguf: GGUFFile, meta: GGUFMetadata, window: int, context: int, angles: int) -> dict[str, Any]:
    """llama.cpp's rule: the long factors when the context exceeds the original one (by
    default the model's whole context), else the short; cos and sin scaled by the file's
    attention factor either way (1 where the file names none, as in llama.cpp)."""
    long, short = (_tensor_values(gguf, n) for n in ("rope_factors_long.weight", "rope_factors_short.weight"))
    if long is None or short is None or len(long) != angles or len(short) != angles:
        raise ValueError(f"LongRoPE needs rope_factors_long and rope_factors_short of {angles} values each")
    original = int(meta.arch_get("rope.scaling.original_context_length", context))
    return dict(rope_freq_factors=long if window > original else short,
                rope_attention_factor=float(meta.arch_get("rope.scaling.attn_factor", 1.0)))


def model_tensors(gguf: GGUFFile, config: ModelConfig) -> list[TensorInfo]:
    """The file's tensors, with fused ones (Phi-3's attn_qkv, its gate-and-up ffn_up) split
    into the parts the model holds: row ranges of the mapped bytes, whole rows of blocks, so
    each part is read, packed or decoded as a tensor of its own."""
    arch = GGUFMetadata(gguf).arch
    out = []
    for t in gguf.tensors:
        if arch == "gemma4" and unused_kv_tensor(config, t.name) or arch in MTP_ARCHS and mtp_tensor(config, t.name):
            continue
        if (experts := expert_parts(t)) is not None:
            out += experts
            continue
        parts = fused_parts(FUSED_GGUF, arch, t.name, config, t.shape[0])
        if parts is None:
            out.append(t)
            continue
        row_bytes = t.data.size // t.shape[0]
        out += [TensorInfo(name, (end - start, *t.shape[1:]), t.qtype, t.data[start * row_bytes:end * row_bytes])
                for name, start, end in parts]
    return out


def _show_progress() -> bool:
    return sys.stderr.isatty()


# A whole 2-D tensor's values as float32 (N, K), exactly numpy's, or None where it does not
# decode that tensor (its type, its width): numpy's decoders do.
RowsDecoder = Callable[[GGUFRows], "torch.Tensor | None"]


def _float_type(qtype: GGMLQuantizationType) -> bool:
    return qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _values(t: TensorInfo, decode: RowsDecoder | None) -> torch.Tensor:
    # Float tensors stay numpy's: an F32 tensor is a view of the mapped file, not a copy.
    if decode is not None and len(t.shape) == 2 and not _float_type(t.qtype):
        values = decode(GGUFRows(t.data, t.qtype, t.shape))
        if values is not None:
            return values
    return torch.from_numpy(dequantize(t.data, t.qtype).reshape(t.shape))


def read_state_dict(gguf: GGUFFile, config: ModelConfig, *, dtype: torch.dtype, device: str,
                    decode: RowsDecoder | None = None) -> dict[str, torch.Tensor]:
    arch = GGUFMetadata(gguf).arch
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(model_tensors(gguf, config), desc="loading", unit="tensor", disable=not _show_progress()):
        if t.name in _ROPE_TENSORS:
            continue  # read into the config
        name = gguf_param_name(arch, t.name)
        tensor = to_model_layout(arch, name, _values(t, decode), config)
        state[name] = tensor.to(device=device, dtype=dtype)
    return state


@dataclass(frozen=True)
class QuantizedState:
    """A GGUF read for the CPU kernels: the model's linear weights as group codes (no float
    copy), the embedding table left in the mapped file, everything else as float32."""

    floats: dict[str, torch.Tensor]
    codes: dict[str, CodesRef]  # "layers.0.self_attn.q_proj.weight" -> codes; a tied head
    # is "lm_head.weight", made from the embedding's blocks
    embedding: GGUFRows
    tables: dict[str, GGUFRows]  # other lookup tables left in the file (ROW_TABLES)


def read_quantized_state(gguf: GGUFFile, config: ModelConfig, linear_names: frozenset[str]) -> QuantizedState:
    """`linear_names`: the parameter names of the model's nn.Linear weights."""
    arch = GGUFMetadata(gguf).arch
    floats, codes, embedding, tables = {}, {}, None, {}
    for t in tqdm(model_tensors(gguf, config), desc="loading", unit="tensor", disable=not _show_progress()):
        if t.name in _ROPE_TENSORS:
            continue
        name = gguf_param_name(arch, t.name)
        if name == EMBED and convertible(t.qtype, t.shape):
            embedding = GGUFRows(t.data, t.qtype, t.shape)
            if config.tie_word_embeddings:
                codes[HEAD] = CodesRef(t.data, t.qtype, t.shape)
        elif name in ROW_TABLES:  # read row by row like the embedding, whatever its type
            tables[name] = GGUFRows(t.data, t.qtype, t.shape)
        elif name in linear_names and convertible(t.qtype, t.shape) and not name.endswith(ROUTERS):
            codes[name] = CodesRef(t.data, t.qtype, t.shape, _row_order(arch, name, t.shape[0], config))
        else:
            values = torch.from_numpy(dequantize(t.data, t.qtype).reshape(t.shape))
            floats[name] = to_model_layout(arch, name, values, config).float()
    if embedding is None:
        raise ValueError("the GGUF file's token embedding cannot be read in groups of 32")
    return QuantizedState(floats, codes, embedding, tables)


EMBED, HEAD = "embed_tokens.weight", "lm_head.weight"
# Gemma 4's per-layer embeddings: 262,144 rows of 35 x 256 values on E2B, more weights than the
# rest of the model, of which a step reads a row per token.
ROW_TABLES = frozenset({"embed_tokens_per_layer.weight"})
# A mixture of experts' router (and Qwen2 MoE's shared expert's gate) stays float, as llama.cpp computes
# it (its quantizer leaves ffn_gate_inp float too): a token's experts are chosen from exact logits.
ROUTERS = (".mlp.gate.weight", ".mlp.shared_expert_gate.weight")


def _row_order(arch: str, name: str, rows: int, config: ModelConfig) -> torch.Tensor | None:
    """llama.cpp's q/k row order to undo on the codes, as to_model_layout does on floats."""
    order = torch.arange(rows)
    moved = to_model_layout(arch, name, order[:, None], config)[:, 0]
    return None if torch.equal(moved, order) else moved


def load_gguf(path: Path, *, dtype: torch.dtype, device: str, decode: RowsDecoder | None = None,
              context_window: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    gguf = GGUFFile(path)
    config = read_config(gguf, context_window)
    return config, read_state_dict(gguf, config, dtype=dtype, device=device, decode=decode)


# Bits per weight of GGML's block types, as far as `--quantization auto` cares: the width of
# the integer kernel that holds the file's weights best (3-, 5- and 6-bit types need int8).
_TYPE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "MXFP4": 4, "Q3_K": 8, "Q2_K": 8,
              "IQ3_S": 8, "IQ3_XXS": 8, "IQ2_S": 8, "IQ2_XS": 8, "IQ2_XXS": 8, "IQ1_S": 8, "IQ1_M": 8,  # requantized: int8
              "Q5_0": 8, "Q5_1": 8, "Q5_K": 8, "Q6_K": 8, "Q8_0": 8, "Q8_1": 8, "Q8_K": 8}


def layer_weight_bits(path: Path) -> int | None:
    """4 or 8 when most of the file's layer matrices (blk.*) are stored in a 4-bit type or
    in one the kernels hold in 3 or 5 to 8 bits (Q2_K, Q3_K and the 5- to 8-bit types); None for
    float files (F32/F16/BF16)."""
    counts: dict[int | None, int] = {}
    for t in GGUFFile(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) in (2, 3):  # 3: a stack of experts
            bits = _TYPE_BITS.get(t.qtype.name)
            counts[bits] = counts.get(bits, 0) + math.prod(int(d) for d in t.shape)
    return max(counts, key=counts.get) if counts else None
