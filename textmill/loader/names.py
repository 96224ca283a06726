"""GGUF tensor names -> model parameter names, and the q/k row order llama.cpp changes.

Models in textmill/models/ use Hugging Face parameter names without the leading "model."
(`layers.3.self_attn.q_proj.weight`). Everything format-specific about names and layouts
lives here so that no model's forward() knows where its weights came from.
"""
from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

import torch

from textmill.config import ModelConfig

GGUF_GLOBAL_NAMES: Mapping[str, str] = MappingProxyType({
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
})

# Per GGUF architecture: the name inside `blk.{i}.` -> the module path inside `layers.{i}.`.
# Families differ (gemma3's ffn_norm is a pre-feedforward norm, not llama's post-attention
# one), so each architecture spells out its own table.
_LLAMA_BLOCK_NAMES = MappingProxyType({
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
})
GGUF_BLOCK_NAMES: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "llama": _LLAMA_BLOCK_NAMES,
})

# llama.cpp's converter reorders the rows of q and k for these architectures so that ggml's
# interleaved ("GPT-J style") RoPE sees pairs (2i, 2i+1); the model here uses rotate-half
# pairs (i, i + D/2), so the loader puts the rows back.
QK_PERMUTED_ARCHS = frozenset({"llama"})

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def gguf_param_name(arch: str, gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; ValueError if unknown."""
    block_names = GGUF_BLOCK_NAMES.get(arch)
    if block_names is None:
        raise ValueError(f"no GGUF tensor names known for architecture {arch!r}")
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        if part in block_names:
            return f"layers.{layer}.{block_names[part]}.{kind}"
    elif m := _GLOBAL_RE.fullmatch(gguf_name):
        part, kind = m.groups()
        if part in GGUF_GLOBAL_NAMES:
            return f"{GGUF_GLOBAL_NAMES[part]}.{kind}"
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


def to_model_layout(arch: str, param_name: str, tensor: torch.Tensor,
                    config: ModelConfig) -> torch.Tensor:
    """A GGUF tensor (already in torch (out, in) order) in the layout the model expects."""
    if arch not in QK_PERMUTED_ARCHS:
        return tensor
    module = param_name.rsplit(".", 1)[0]  # weight and bias rows are permuted alike
    if module.endswith("self_attn.q_proj"):
        return unpermute_rope_rows(tensor, config.num_heads)
    if module.endswith("self_attn.k_proj"):
        return unpermute_rope_rows(tensor, config.num_kv_heads)
    return tensor
