"""Random-weight GGUF files of Granite 4.0-H's shapes, for speed runs (bench/synthetic_gguf.py's method).

synthetic-granitehybrid: a dense Granite 4.0-H of the class llama.cpp calls 1B (d = 1536 and an MLP not
512 wide; conversion/granite.py GraniteHybridModel): 40 layers, attention (12 query heads of 128, 4 KV
heads, no RoPE) in four of them, Mamba-2 mixers in the other 36 (48 heads of 64, one group of B and C, a
state of 128, a causal convolution of 4 taps with a bias); an MLP of 4096; a tied 100,352-row embedding.
Each sequence's state is 36 x 48 x 128 x 64 float32 (54 MiB): what a step reads and writes per request
beyond the weights, three times Qwen3.5 0.8B's.

synthetic-granitehybridmoe: 10 of Granite-4.0-H-Tiny's 40 layers (7B-A1B), one of them attention: the same
mixers and attention at d = 1536, and in every layer 64 experts of 512, 6 a token by a softmax, beside an
ungated shared expert of 1024.

Both carry Granite's four multipliers, the attention's 1/128 and the logits' 1/6 as Granite 4.0-H's, the
embedding's and the residual's 1 (not 12 and 0.22: a random embedding times 12 outweighs every random
layer, so the random model's next token follows the last one, it repeats itself, and textmill's guessed
tokens would fire where a real model's seldom do). Types
as llama.cpp's Q4_K_M recipe gives them: Q4_K, Q6_K for attn_v and ffn_down in the "more bits" layers, the
tied embedding Q6_K; the convolution, A, D, dt and norms F32. Speed depends on shapes and block types,
not values.

    python bench/synthetic_granite.py granitehybrid     # prints the path, building the file once
    python bench/synthetic_granite.py granitehybridmoe
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_blocks import F32, Q4_K, Q6_K, tensor_bytes  # noqa: E402
from synthetic_gguf import SyntheticSpec, begin_file, more_bits, synthetic_path, write_tensors  # noqa: E402

SYNTHETIC_GRANITE = SyntheticSpec(name="synthetic-granitehybrid", hidden=1536, layers=40, heads=12, kv_heads=4,
                                  ffn=4096, context=2**20, rope_base=10000.0, arch="granitehybrid", key_length=128,
                                  vocab=100352, tied=True, seed=16)
SYNTHETIC_GRANITE_MOE = SyntheticSpec(name="synthetic-granitehybridmoe", hidden=1536, layers=10, heads=12,
                                      kv_heads=4, ffn=512, context=2**20, rope_base=10000.0, arch="granitehybrid",
                                      key_length=128, vocab=100352, tied=True, seed=17, experts=64, experts_used=6,
                                      expert_ffn=512, shared_ffn=1024)
SPECS = {"granitehybrid": SYNTHETIC_GRANITE, "granitehybridmoe": SYNTHETIC_GRANITE_MOE}
MAMBA_HEADS, MAMBA_HEAD_DIM, STATE, GROUPS, CONV = 48, 64, 128, 1, 4
FORMAT = 2  # bump when the bytes written change: part of the cached file's name


def synthetic_granite_path(spec: SyntheticSpec, tokenizer_source: Path | None = None) -> Path:
    return synthetic_path(spec, tokenizer_source, write=write_granite, version=FORMAT)


def attention_layers(spec: SyntheticSpec) -> tuple[int, ...]:
    """One layer in ten attends, the sixth of each ten."""
    return tuple(i for i in range(spec.layers) if i % 10 == 5)


def tensor_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, numpy shape (out, in), block type), in the converter's order."""
    d, hd = spec.hidden, spec.head_dim
    inner = MAMBA_HEADS * MAMBA_HEAD_DIM
    channels = inner + 2 * GROUPS * STATE
    plan = [("token_embd.weight", (vocab, d), Q6_K)]
    for i in range(spec.layers):
        wide = Q6_K if more_bits(i, spec.layers) else Q4_K
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32)]
        if i in attention_layers(spec):
            plan += [(f"blk.{i}.attn_q.weight", (spec.heads * hd, d), Q4_K),
                     (f"blk.{i}.attn_k.weight", (spec.kv_heads * hd, d), Q4_K),
                     (f"blk.{i}.attn_v.weight", (spec.kv_heads * hd, d), wide),
                     (f"blk.{i}.attn_output.weight", (d, spec.heads * hd), Q4_K)]
        else:
            plan += [(f"blk.{i}.ssm_in.weight", (inner + channels + MAMBA_HEADS, d), Q4_K),
                     (f"blk.{i}.ssm_conv1d.weight", (channels, CONV), F32),
                     (f"blk.{i}.ssm_conv1d.bias", (channels,), F32), (f"blk.{i}.ssm_dt.bias", (MAMBA_HEADS,), F32),
                     (f"blk.{i}.ssm_a", (MAMBA_HEADS, 1), F32), (f"blk.{i}.ssm_d", (MAMBA_HEADS, 1), F32),
                     (f"blk.{i}.ssm_norm.weight", (GROUPS, inner // GROUPS), F32),
                     (f"blk.{i}.ssm_out.weight", (d, inner), Q4_K)]
        plan += [(f"blk.{i}.ffn_norm.weight", (d,), F32)]
        if spec.experts:
            e, fe, fs = spec.experts, spec.expert_ffn, spec.shared_ffn
            plan += [(f"blk.{i}.ffn_gate_inp.weight", (e, d), F32),
                     (f"blk.{i}.ffn_gate_exps.weight", (e, fe, d), Q4_K),
                     (f"blk.{i}.ffn_up_exps.weight", (e, fe, d), Q4_K),
                     (f"blk.{i}.ffn_down_exps.weight", (e, d, fe), wide),
                     (f"blk.{i}.ffn_gate_shexp.weight", (fs, d), Q4_K), (f"blk.{i}.ffn_up_shexp.weight", (fs, d), Q4_K),
                     (f"blk.{i}.ffn_down_shexp.weight", (d, fs), wide)]
        else:
            plan += [(f"blk.{i}.ffn_gate.weight", (spec.ffn, d), Q4_K),
                     (f"blk.{i}.ffn_up.weight", (spec.ffn, d), Q4_K), (f"blk.{i}.ffn_down.weight", (d, spec.ffn), wide)]
    return plan + [("output_norm.weight", (d,), F32)]


def _f32(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1, decays that forget at different rates (A = -exp(A_log) of 1 to 16, as the
    reference initializes it), D near 1, a small convolution."""
    if name.endswith("ffn_gate_inp.weight"):  # a router: logits that differ from token to token
        return tensor_bytes(rng, shape, F32)
    if name.endswith(".ssm_a"):
        return -rng.uniform(1.0, 16.0, shape).astype(np.float32)
    if name.endswith((".ssm_dt.bias", ".ssm_conv1d.bias")):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".ssm_conv1d.weight"):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def write_granite(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> Path:
    w, fields, vocab, tmp = begin_file(spec, tokenizer_source, path)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv([spec.kv_heads if i in attention_layers(spec) else 0 for i in range(spec.layers)])
    w.add_rope_freq_base(spec.rope_base)
    w.add_rope_scaling_finetuned(False)  # Granite 4.0-H: no RoPE
    w.add_layer_norm_rms_eps(1e-5)
    w.add_attention_scale(1 / 128)
    w.add_embedding_scale(1.0)
    w.add_residual_scale(1.0)
    w.add_logit_scale(6.0)
    if spec.experts:
        w.add_expert_count(spec.experts)
        w.add_expert_used_count(spec.experts_used)
        w.add_expert_shared_feed_forward_length(spec.shared_ffn)
    w.add_ssm_conv_kernel(CONV)
    w.add_ssm_state_size(STATE)
    w.add_ssm_group_count(GROUPS)
    w.add_ssm_inner_size(MAMBA_HEADS * MAMBA_HEAD_DIM)
    w.add_ssm_time_step_rank(MAMBA_HEADS)
    w.add_vocab_size(vocab)
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.add_quantization_version(2)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    return write_tensors(w, tensor_plan(spec, vocab), np.random.default_rng(spec.seed), tmp, path, _f32)


if __name__ == "__main__":
    print(synthetic_granite_path(SPECS[sys.argv[1]]))
