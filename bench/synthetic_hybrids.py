"""Random-weight GGUF files of the hybrids' shapes, for speed runs (bench/synthetic_gguf.py's method).

synthetic-qwen35: Qwen3.5 0.8B as its GGUF files hold it (llama.cpp's conversion/qwen.py Qwen3_5TextModel): d = 1024,
24 layers, every fourth full attention (8 query heads of 256 with a gate each, 2 KV heads, RoPE on
a quarter of each head), the others gated delta nets (16 key and 16 value heads of 128, a causal
convolution of 4 taps); an MLP of 3584; a tied 248,320-row embedding. Speed depends on shapes and
block types, not values; the delta nets' state per sequence (18 layers x 16 x 128 x 128 float32:
18 MiB) is what a hybrid adds to a step.

synthetic-lfm2: LFM2 1.2B as its GGUF files hold it (conversion/lfm2.py): d = 2048, 16 layers,
attention in layers 2, 5, 8, 10, 12 and 14 (32 query heads of 64, 8 KV heads, q/k norms), short
convolutions of 3 taps in the other ten (in_proj 3 x 2048 wide); an MLP of 8192; a tied
65,536-row embedding. Its state per sequence is tiny (10 x 2 x 2048 float32: 160 KiB).

Types as llama.cpp's Q4_K_M recipe gives them: Q4_K, Q6_K for attn_v and ffn_down in the "more
bits" layers, the tied embedding Q6_K, the convolutions, A, dt and norms F32.

    python bench/synthetic_hybrids.py qwen35     # prints the path of synthetic-qwen35, building it once
    python bench/synthetic_hybrids.py lfm2
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_blocks import F32, Q4_K, Q6_K  # noqa: E402
from synthetic_gguf import (SyntheticSpec, begin_file, cache_dir, cache_key, default_tokenizer_source,  # noqa: E402
                            more_bits, write_tensors)

SYNTHETIC_QWEN35 = SyntheticSpec(name="synthetic-qwen35", hidden=1024, layers=24, heads=8, kv_heads=2, ffn=3584,
                                 context=262144, rope_base=10_000_000.0, arch="qwen35", key_length=256,
                                 vocab=248320, tied=True, seed=11)
FULL_EVERY, KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM, CONV = 4, 16, 16, 128, 128, 4
ROTARY_FRACTION = 0.25
SYNTHETIC_LFM2 = SyntheticSpec(name="synthetic-lfm2", hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192,
                               context=128000, rope_base=1_000_000.0, arch="lfm2", vocab=65536, tied=True, seed=12)
LFM2_ATTENTION, LFM2_TAPS = (2, 5, 8, 10, 12, 14), 3
FORMAT = 3  # bump when the bytes written change: part of the cached file's name


def synthetic_hybrid_path(spec: SyntheticSpec, tokenizer_source: Path | None = None) -> Path:
    source = tokenizer_source or default_tokenizer_source()
    path = cache_dir() / f"{spec.name}-v{FORMAT}-{cache_key(spec, source)}.gguf"
    if not path.is_file():
        (write_qwen35 if spec.arch == "qwen35" else write_lfm2)(spec, source, path)
    return path


def recurrent(layer: int) -> bool:
    return (layer + 1) % FULL_EVERY != 0


def tensor_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    return (qwen35_plan if spec.arch == "qwen35" else lfm2_plan)(spec, vocab)


def _mlp(spec: SyntheticSpec, i: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    wide = Q6_K if more_bits(i, spec.layers) else Q4_K
    d = spec.hidden
    return [(f"blk.{i}.ffn_gate.weight", (spec.ffn, d), Q4_K), (f"blk.{i}.ffn_up.weight", (spec.ffn, d), Q4_K),
            (f"blk.{i}.ffn_down.weight", (d, spec.ffn), wide)]


def lfm2_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    d, hd = spec.hidden, spec.head_dim
    plan = [("token_embd.weight", (vocab, d), Q6_K)]
    for i in range(spec.layers):
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32)]
        if i in LFM2_ATTENTION:
            wide = Q6_K if more_bits(i, spec.layers) else Q4_K
            plan += [(f"blk.{i}.attn_q.weight", (spec.heads * hd, d), Q4_K),
                     (f"blk.{i}.attn_k.weight", (spec.kv_heads * hd, d), Q4_K),
                     (f"blk.{i}.attn_v.weight", (spec.kv_heads * hd, d), wide),
                     (f"blk.{i}.attn_output.weight", (d, spec.heads * hd), Q4_K),
                     (f"blk.{i}.attn_q_norm.weight", (hd,), F32), (f"blk.{i}.attn_k_norm.weight", (hd,), F32)]
        else:
            plan += [(f"blk.{i}.shortconv.in_proj.weight", (3 * d, d), Q4_K),
                     (f"blk.{i}.shortconv.conv.weight", (d, LFM2_TAPS), F32),
                     (f"blk.{i}.shortconv.out_proj.weight", (d, d), Q4_K)]
        plan += [(f"blk.{i}.ffn_norm.weight", (d,), F32)] + _mlp(spec, i)
    return plan + [("token_embd_norm.weight", (d,), F32)]


def qwen35_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
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
        plan += _mlp(spec, i)
    return plan + [("output_norm.weight", (d,), F32)]


def _f32(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1 (stored with Qwen3.5's 1 added; q's and k's near D ** -1/4), decays that
    forget at different rates (A = -exp(A_log) of 1 to 16, as the reference initializes it), a small
    convolution."""
    if name.endswith(".ssm_a"):
        return -rng.uniform(1.0, 16.0, shape).astype(np.float32)
    if name.endswith(".ssm_dt.bias"):
        return rng.standard_normal(shape).astype(np.float32)
    if name.endswith((".ssm_conv1d.weight", ".shortconv.conv.weight")):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    # q and k are unit-RMS per head, so norm weights of 1 would make scores q.k / sqrt(D) of ~sqrt(D) = 16:
    # a near one-hot softmax that any rounding flips (as synthetic_gemma4.py found). D ** -1/4 keeps them O(1).
    center = shape[0] ** -0.25 if name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")) else 1.0
    return (center * (1.0 + 0.05 * rng.standard_normal(shape))).astype(np.float32)


def _writer(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> tuple[GGUFWriter, list, int, Path]:
    """synthetic_gguf.begin_file and the keys both hybrids' files have."""
    w, fields, vocab, tmp = begin_file(spec, tokenizer_source, path)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_rope_freq_base(spec.rope_base)
    w.add_vocab_size(vocab)
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.add_quantization_version(2)
    return w, fields, vocab, tmp


def _finish(w: GGUFWriter, fields: list, spec: SyntheticSpec, vocab: int, tmp: Path, path: Path) -> Path:
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    return write_tensors(w, tensor_plan(spec, vocab), np.random.default_rng(spec.seed), tmp, path, _f32)


def write_lfm2(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> Path:
    w, fields, vocab, tmp = _writer(spec, tokenizer_source, path)
    w.add_head_count_kv([spec.kv_heads if i in LFM2_ATTENTION else 0 for i in range(spec.layers)])
    w.add_shortconv_l_cache(LFM2_TAPS)
    w.add_layer_norm_rms_eps(1e-5)
    return _finish(w, fields, spec, vocab, tmp, path)


def write_qwen35(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> Path:
    w, fields, vocab, tmp = _writer(spec, tokenizer_source, path)
    w.add_head_count_kv(spec.kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(int(spec.head_dim * ROTARY_FRACTION))
    w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_ssm_conv_kernel(CONV)
    w.add_ssm_state_size(KEY_DIM)
    w.add_ssm_group_count(KEY_HEADS)
    w.add_ssm_time_step_rank(VALUE_HEADS)
    w.add_ssm_inner_size(VALUE_HEADS * VALUE_DIM)
    w.add_full_attention_interval(FULL_EVERY)
    return _finish(w, fields, spec, vocab, tmp, path)


if __name__ == "__main__":
    print(synthetic_hybrid_path({"qwen35": SYNTHETIC_QWEN35, "lfm2": SYNTHETIC_LFM2}[sys.argv[1]]))
