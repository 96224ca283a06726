"""A random-weight GGUF of GLM-4's layers, for speed runs (bench/synthetic_gguf.py's method).

synthetic-glm4: 10 of GLM-4-9B-0414's 40 layers as its GGUF files hold them (llama.cpp's
conversion/glm.py Glm4Model): d = 4096, 32 query heads of 128 and 2 KV heads with q/k/v biases,
RoPE on half of each head, an MLP of 13,696 whose gate and up are one ffn_up, four norms a layer,
an untied 151,552-row head. Types as llama.cpp's Q4_K_M recipe gives them: Q4_K, Q6_K for attn_v in
the "more bits" layers and for the head; ffn_down, whose rows of 13,696 are no whole number of 256-value
super-blocks, in its fallbacks Q5_0 and (more bits) Q8_0; biases and norms F32.

    python bench/synthetic_glm4.py     # prints the path of synthetic-glm4, building it once
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_blocks import F32, Q4_K, Q5_0, Q6_K, Q8_0  # noqa: E402
from synthetic_gguf import SyntheticSpec, begin_file, more_bits, synthetic_path, write_tensors  # noqa: E402

SYNTHETIC_GLM4 = SyntheticSpec(name="synthetic-glm4", hidden=4096, layers=10, heads=32, kv_heads=2, ffn=13696,
                               context=32768, rope_base=10000.0, arch="glm4", key_length=128, vocab=151552, seed=15)
FORMAT = 1  # bump when the bytes written change: part of the cached file's name


def synthetic_glm4_path(spec: SyntheticSpec = SYNTHETIC_GLM4, tokenizer_source: Path | None = None) -> Path:
    return synthetic_path(spec, tokenizer_source, write=write_glm4, version=FORMAT)


def tensor_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, numpy shape (out, in), block type), in the converter's order."""
    d, q, kv, f = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.ffn
    plan = [("token_embd.weight", (vocab, d), Q4_K)]
    for i in range(spec.layers):
        wide = Q6_K if more_bits(i, spec.layers) else Q4_K
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32),
                 (f"blk.{i}.attn_q.weight", (q, d), Q4_K), (f"blk.{i}.attn_q.bias", (q,), F32),
                 (f"blk.{i}.attn_k.weight", (kv, d), Q4_K), (f"blk.{i}.attn_k.bias", (kv,), F32),
                 (f"blk.{i}.attn_v.weight", (kv, d), wide), (f"blk.{i}.attn_v.bias", (kv,), F32),
                 (f"blk.{i}.attn_output.weight", (d, q), Q4_K), (f"blk.{i}.post_attention_norm.weight", (d,), F32),
                 (f"blk.{i}.ffn_norm.weight", (d,), F32), (f"blk.{i}.ffn_up.weight", (2 * f, d), Q4_K),
                 (f"blk.{i}.ffn_down.weight", (d, f), Q8_0 if wide == Q6_K else Q5_0),
                 (f"blk.{i}.post_ffw_norm.weight", (d,), F32)]
    return plan + [("output_norm.weight", (d,), F32), ("output.weight", (vocab, d), Q6_K)]


def _f32(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1, small biases."""
    if name.endswith(".bias"):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def write_glm4(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> Path:
    w, fields, vocab, tmp = begin_file(spec, tokenizer_source, path)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim // 2)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.add_quantization_version(2)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    return write_tensors(w, tensor_plan(spec, vocab), np.random.default_rng(spec.seed), tmp, path, _f32)


if __name__ == "__main__":
    print(synthetic_glm4_path())
