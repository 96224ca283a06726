"""A random-weight GGUF with Qwen3.5 0.8B's shapes, for speed runs (bench/synthetic_gguf.py's method).

Qwen3.5 0.8B as its GGUF files hold it (llama.cpp's conversion/qwen.py Qwen3_5TextModel): d = 1024,
24 layers, every fourth full attention (8 query heads of 256 with a gate each, 2 KV heads, RoPE on
a quarter of each head), the others gated delta nets (16 key and 16 value heads of 128, a causal
convolution of 4 taps); an MLP of 3584; a tied 248,320-row embedding. Speed depends on shapes and
block types, not values; the delta nets' state per sequence (18 layers x 16 x 128 x 128 float32:
18 MiB) is what a hybrid adds to a step.

Types as llama.cpp's Q4_K_M recipe gives them: Q4_K, Q6_K for attn_v and ffn_down in the "more
bits" layers, the tied embedding Q6_K, the convolution, A, dt and norms F32.

    python bench/synthetic_qwen35.py            # prints the path of synthetic-qwen35, building it once
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_blocks import F32, Q4_K, Q6_K  # noqa: E402
from synthetic_gguf import (SyntheticSpec, cache_dir, cache_key, default_tokenizer_source, more_bits,  # noqa: E402
                            padded, tokenizer_fields, write_tensors)

SYNTHETIC_QWEN35 = SyntheticSpec(name="synthetic-qwen35", hidden=1024, layers=24, heads=8, kv_heads=2, ffn=3584,
                                 context=262144, rope_base=10_000_000.0, arch="qwen35", key_length=256,
                                 vocab=248320, tied=True, seed=11)
FULL_EVERY, KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM, CONV = 4, 16, 16, 128, 128, 4
ROTARY_FRACTION = 0.25
FORMAT = 2  # bump when the bytes written change: part of the cached file's name


def synthetic_qwen35_path(spec: SyntheticSpec = SYNTHETIC_QWEN35, tokenizer_source: Path | None = None) -> Path:
    source = tokenizer_source or default_tokenizer_source()
    path = cache_dir() / f"{spec.name}-v{FORMAT}-{cache_key(spec, source)}.gguf"
    if not path.is_file():
        write_qwen35(spec, source, path)
    return path


def recurrent(layer: int) -> bool:
    return (layer + 1) % FULL_EVERY != 0


def tensor_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, numpy shape (out, in), block type), in the converter's order."""
    d, n = spec.hidden, spec.layers
    channels, inner = 2 * KEY_HEADS * KEY_DIM + VALUE_HEADS * VALUE_DIM, VALUE_HEADS * VALUE_DIM
    plan = [("token_embd.weight", (vocab, d), Q6_K)]
    for i in range(n):
        wide = Q6_K if more_bits(i, n) else Q4_K
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32), (f"blk.{i}.post_attention_norm.weight", (d,), F32)]
        if recurrent(i):
            plan += [(f"blk.{i}.attn_qkv.weight", (channels, d), Q4_K), (f"blk.{i}.attn_gate.weight", (inner, d), Q4_K),
                     (f"blk.{i}.ssm_conv1d.weight", (channels, CONV), F32),
                     (f"blk.{i}.ssm_dt.bias", (VALUE_HEADS,), F32), (f"blk.{i}.ssm_a", (VALUE_HEADS,), F32),
                     (f"blk.{i}.ssm_beta.weight", (VALUE_HEADS, d), Q4_K),
                     (f"blk.{i}.ssm_alpha.weight", (VALUE_HEADS, d), Q4_K),
                     (f"blk.{i}.ssm_norm.weight", (VALUE_DIM,), F32), (f"blk.{i}.ssm_out.weight", (d, inner), Q4_K)]
        else:
            q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
            plan += [(f"blk.{i}.attn_q.weight", (2 * q, d), Q4_K), (f"blk.{i}.attn_k.weight", (kv, d), Q4_K),
                     (f"blk.{i}.attn_v.weight", (kv, d), wide), (f"blk.{i}.attn_output.weight", (d, q), Q4_K),
                     (f"blk.{i}.attn_q_norm.weight", (spec.head_dim,), F32),
                     (f"blk.{i}.attn_k_norm.weight", (spec.head_dim,), F32)]
        plan += [(f"blk.{i}.ffn_gate.weight", (spec.ffn, d), Q4_K), (f"blk.{i}.ffn_up.weight", (spec.ffn, d), Q4_K),
                 (f"blk.{i}.ffn_down.weight", (d, spec.ffn), wide)]
    return plan + [("output_norm.weight", (d,), F32)]


def _f32(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1 (stored with Qwen3.5's 1 added; q's and k's near D ** -1/4), decays that
    forget at different rates (A = -exp(A_log) of 1 to 16, as the reference initializes it), a small
    convolution."""
    if name.endswith(".ssm_a"):
        return -rng.uniform(1.0, 16.0, shape).astype(np.float32)
    if name.endswith(".ssm_dt.bias"):
        return rng.standard_normal(shape).astype(np.float32)
    if name.endswith(".ssm_conv1d.weight"):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    # q and k are unit-RMS per head, so norm weights of 1 would make scores q.k / sqrt(D) of ~sqrt(D) = 16:
    # a near one-hot softmax that any rounding flips (as synthetic_gemma4.py found). D ** -1/4 keeps them O(1).
    center = shape[0] ** -0.25 if name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")) else 1.0
    return (center * (1.0 + 0.05 * rng.standard_normal(shape))).astype(np.float32)


def write_qwen35(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> Path:
    fields = padded(list(tokenizer_fields(tokenizer_source)), spec.vocab)
    vocab = len(next(v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    w = GGUFWriter(tmp, "qwen35")
    w.add_name(f"{spec.name} (random weights, textmill bench)")
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.layers)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(int(spec.head_dim * ROTARY_FRACTION))
    w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_ssm_conv_kernel(CONV)
    w.add_ssm_state_size(KEY_DIM)
    w.add_ssm_group_count(KEY_HEADS)
    w.add_ssm_time_step_rank(VALUE_HEADS)
    w.add_ssm_inner_size(VALUE_HEADS * VALUE_DIM)
    w.add_full_attention_interval(FULL_EVERY)
    w.add_vocab_size(vocab)
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.add_quantization_version(2)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    return write_tensors(w, tensor_plan(spec, vocab), np.random.default_rng(spec.seed), tmp, path, _f32)


if __name__ == "__main__":
    print(synthetic_qwen35_path())
