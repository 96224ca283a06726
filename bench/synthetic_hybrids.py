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

synthetic-qwen35moe: 8 of Qwen3.5-35B-A3B's 40 layers (conversion/qwen.py Qwen3_5MoeTextModel): d = 2048,
16 query heads of 256 (2 KV heads) in every fourth, delta nets of 16 key and 32 value heads of 128
in the others, and in every layer 256 experts of 512, 8 a token by a softmax, beside a shared expert
of 512 behind a sigmoid gate; an untied 248,320-row head (4.6 GiB).

synthetic-lfm2moe: 12 of LFM2-8B-A1B's 24 layers (conversion/lfm2.py LFM2MoeModel): LFM2 1.2B's
attention and convolutions at d = 2048, two dense layers (an MLP of 7168), then 32 experts of 1792,
4 a token by the sigmoid of the router's logits plus a per-expert bias (2.2 GiB).

Types as llama.cpp's Q4_K_M recipe gives them: Q4_K, Q6_K for attn_v and ffn_down in the "more
bits" layers, the tied embedding Q6_K, the convolutions, A, dt and norms F32.

    python bench/synthetic_hybrids.py qwen35     # prints the path of synthetic-qwen35, building it once
    python bench/synthetic_hybrids.py lfm2     # or qwen35moe, lfm2moe
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_blocks import F32, Q4_K, Q6_K, router_and_decay  # noqa: E402
from synthetic_gguf import SyntheticSpec, begin_file, more_bits, synthetic_path, write_tensors  # noqa: E402

SYNTHETIC_QWEN35 = SyntheticSpec(name="synthetic-qwen35", hidden=1024, layers=24, heads=8, kv_heads=2, ffn=3584,
                                 context=262144, rope_base=10_000_000.0, arch="qwen35", key_length=256,
                                 vocab=248320, tied=True, seed=11)
FULL_EVERY, KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM, CONV = 4, 16, 16, 128, 128, 4
ROTARY_FRACTION = 0.25
SYNTHETIC_LFM2 = SyntheticSpec(name="synthetic-lfm2", hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192,
                               context=128000, rope_base=1_000_000.0, arch="lfm2", vocab=65536, tied=True, seed=12)
LFM2_ATTENTION, LFM2_TAPS = (2, 5, 8, 10, 12, 14), 3
SYNTHETIC_QWEN35MOE = SyntheticSpec(name="synthetic-qwen35moe", hidden=2048, layers=8, heads=16, kv_heads=2, ffn=0,
                                    context=262144, rope_base=10_000_000.0, arch="qwen35moe", key_length=256,
                                    vocab=248320, seed=13, experts=256, experts_used=8, expert_ffn=512,
                                    shared_ffn=512)
QWEN35MOE_VALUE_HEADS = 32
SYNTHETIC_LFM2MOE = SyntheticSpec(name="synthetic-lfm2moe", hidden=2048, layers=12, heads=32, kv_heads=8, ffn=7168,
                                  context=128000, rope_base=1_000_000.0, arch="lfm2moe", vocab=65536, tied=True,
                                  seed=14, experts=32, experts_used=4, expert_ffn=1792, dense_lead=2)
LFM2MOE_ATTENTION = (2, 6, 10)
SPECS = {"qwen35": SYNTHETIC_QWEN35, "lfm2": SYNTHETIC_LFM2, "qwen35moe": SYNTHETIC_QWEN35MOE,
         "lfm2moe": SYNTHETIC_LFM2MOE}
FORMAT = 3  # bump when the bytes written change: part of the cached file's name


def synthetic_hybrid_path(spec: SyntheticSpec, tokenizer_source: Path | None = None) -> Path:
    return synthetic_path(spec, tokenizer_source, write=write_qwen35 if spec.arch.startswith("qwen35") else write_lfm2,
                          version=FORMAT)


def lfm2_attention(spec: SyntheticSpec) -> tuple[int, ...]:
    return LFM2MOE_ATTENTION if spec.experts else LFM2_ATTENTION


def value_heads(spec: SyntheticSpec) -> int:
    return QWEN35MOE_VALUE_HEADS if spec.experts else VALUE_HEADS


def recurrent(layer: int) -> bool:
    return (layer + 1) % FULL_EVERY != 0


def tensor_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    return (qwen35_plan if spec.arch.startswith("qwen35") else lfm2_plan)(spec, vocab)


def _mlp(spec: SyntheticSpec, i: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """The layer's SwiGLU, or its router, (LFM2 MoE's selection bias), experts stacked per projection
    and (Qwen3.5 MoE's) gated shared expert."""
    wide = Q6_K if more_bits(i, spec.layers) else Q4_K
    d = spec.hidden
    if not spec.experts or i < spec.dense_lead:
        return [(f"blk.{i}.ffn_gate.weight", (spec.ffn, d), Q4_K), (f"blk.{i}.ffn_up.weight", (spec.ffn, d), Q4_K),
                (f"blk.{i}.ffn_down.weight", (d, spec.ffn), wide)]
    e, fe, fs = spec.experts, spec.expert_ffn, spec.shared_ffn
    plan = [(f"blk.{i}.ffn_gate_inp.weight", (e, d), F32)]
    if spec.arch == "lfm2moe":
        plan += [(f"blk.{i}.exp_probs_b.bias", (e,), F32)]
    plan += [(f"blk.{i}.ffn_gate_exps.weight", (e, fe, d), Q4_K), (f"blk.{i}.ffn_up_exps.weight", (e, fe, d), Q4_K),
             (f"blk.{i}.ffn_down_exps.weight", (e, d, fe), wide)]
    if fs:
        plan += [(f"blk.{i}.ffn_gate_inp_shexp.weight", (d,), F32), (f"blk.{i}.ffn_gate_shexp.weight", (fs, d), Q4_K),
                 (f"blk.{i}.ffn_up_shexp.weight", (fs, d), Q4_K), (f"blk.{i}.ffn_down_shexp.weight", (d, fs), wide)]
    return plan


def lfm2_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    d, hd = spec.hidden, spec.head_dim
    plan = [("token_embd.weight", (vocab, d), Q6_K)]
    for i in range(spec.layers):
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32)]
        if i in lfm2_attention(spec):
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
    d, n, hv = spec.hidden, spec.layers, value_heads(spec)
    channels, inner = 2 * KEY_HEADS * KEY_DIM + hv * VALUE_DIM, hv * VALUE_DIM
    plan = [("token_embd.weight", (vocab, d), Q6_K)]
    for i in range(n):
        wide = Q6_K if more_bits(i, n) else Q4_K
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32), (f"blk.{i}.post_attention_norm.weight", (d,), F32)]
        if recurrent(i):
            plan += [(f"blk.{i}.attn_qkv.weight", (channels, d), Q4_K), (f"blk.{i}.attn_gate.weight", (inner, d), Q4_K),
                     (f"blk.{i}.ssm_conv1d.weight", (channels, CONV), F32),
                     (f"blk.{i}.ssm_dt.bias", (hv,), F32), (f"blk.{i}.ssm_a", (hv,), F32),
                     (f"blk.{i}.ssm_beta.weight", (hv, d), Q4_K), (f"blk.{i}.ssm_alpha.weight", (hv, d), Q4_K),
                     (f"blk.{i}.ssm_norm.weight", (VALUE_DIM,), F32), (f"blk.{i}.ssm_out.weight", (d, inner), Q4_K)]
        else:
            q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
            plan += [(f"blk.{i}.attn_q.weight", (2 * q, d), Q4_K), (f"blk.{i}.attn_k.weight", (kv, d), Q4_K),
                     (f"blk.{i}.attn_v.weight", (kv, d), wide), (f"blk.{i}.attn_output.weight", (d, q), Q4_K),
                     (f"blk.{i}.attn_q_norm.weight", (spec.head_dim,), F32),
                     (f"blk.{i}.attn_k_norm.weight", (spec.head_dim,), F32)]
        plan += _mlp(spec, i)
    plan += [("output_norm.weight", (d,), F32)]
    return plan if spec.tied else plan + [("output.weight", (vocab, d), Q6_K)]


def _f32(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1 (stored with Qwen3.5's 1 added; q's and k's near D ** -1/4), decays that
    forget at different rates (A = -exp(A_log) of 1 to 16, as the reference initializes it), a small
    convolution."""
    if (drawn := router_and_decay(name, shape, rng)) is not None:
        return drawn
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
    if spec.ffn:  # not in a Qwen3.5 MoE file
        w.add_feed_forward_length(spec.ffn)
    if spec.experts:
        w.add_expert_count(spec.experts)
        w.add_expert_used_count(spec.experts_used)
        w.add_expert_feed_forward_length(spec.expert_ffn)
    if spec.shared_ffn:
        w.add_expert_shared_feed_forward_length(spec.shared_ffn)
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
    w.add_head_count_kv([spec.kv_heads if i in lfm2_attention(spec) else 0 for i in range(spec.layers)])
    if spec.experts:
        w.add_leading_dense_block_count(spec.dense_lead)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
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
    w.add_ssm_time_step_rank(value_heads(spec))
    w.add_ssm_inner_size(value_heads(spec) * VALUE_DIM)
    w.add_full_attention_interval(FULL_EVERY)
    return _finish(w, fields, spec, vocab, tmp, path)


if __name__ == "__main__":
    print(synthetic_hybrid_path(SPECS[sys.argv[1]]))
