"""Random-weight GGUF files of the Mamba-2 hybrids' shapes (Granite 4.0-H, Nemotron-H), for speed runs
(bench/synthetic_gguf.py's method).

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

synthetic-nemotronh: 14 of NVIDIA-Nemotron-Nano-9B-v2's 56 layers, in its pattern's proportions
("M-M-M-MM-M-M*-": 7 Mamba-2 mixers of 128 heads of 80 in 8 groups with a state of 128, 6 ReLU^2 MLPs
of 15,680, one attention of 40 query heads of 128 and 8 KV heads, no RoPE) at d = 4480, an untied
131,072-row head. Its rows of 4480 and 15,680 values are no whole number of 256-value super-blocks, so
llama.cpp's Q4_K_M recipe gives those matrices its fallbacks, Q5_0 for Q4_K and Q8_0 for Q6_K, as
real files of the model hold them; ssm_out (rows of 10,240) stays Q4_K.

synthetic-nemotronhmoe: 8 of Nemotron 3 Nano 30B-A3B's 52 layers ("MEMEM*EM": 4 Mamba-2 mixers of 64
heads of 64 in 8 groups, 3 layers of 128 ReLU^2 experts of 1856, 6 a token by a biased sigmoid, weights
times 2.5, beside a shared expert of 3712, one attention of 32 query heads of 128 and 2 KV heads) at d =
2688, whose rows llama.cpp's recipe keeps in Q5_0 and Q8_0; an untied 131,072-row head.

synthetic-falconh1: a 1.5B-class Falcon-H1 (d = 2048, 24 layers), each layer attention (8 query heads
of 128, 2 KV heads, RoPE) beside a Mamba-2 mixer (48 heads of 64, one group, a state of 256, no gated
norm: Falcon-H1's mamba_rms_norm false), then an MLP of 6144; an untied 65,536-row head. Every layer
keeps both a KV cache and a state (75 MiB a sequence).

    python bench/synthetic_mamba2.py granitehybrid     # prints the path, building the file once
    python bench/synthetic_mamba2.py granitehybridmoe  # or nemotronh, nemotronhmoe, falconh1
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_blocks import F32, Q4_K, Q5_0, Q6_K, Q8_0, QK_K, router_and_decay  # noqa: E402
from synthetic_gguf import SyntheticSpec, begin_file, more_bits, synthetic_path, write_tensors  # noqa: E402

SYNTHETIC_GRANITE = SyntheticSpec(name="synthetic-granitehybrid", hidden=1536, layers=40, heads=12, kv_heads=4,
                                  ffn=4096, context=2**20, rope_base=10000.0, arch="granitehybrid", key_length=128,
                                  vocab=100352, tied=True, seed=16)
SYNTHETIC_GRANITE_MOE = SyntheticSpec(name="synthetic-granitehybridmoe", hidden=1536, layers=10, heads=12,
                                      kv_heads=4, ffn=512, context=2**20, rope_base=10000.0, arch="granitehybrid",
                                      key_length=128, vocab=100352, tied=True, seed=17, experts=64, experts_used=6,
                                      expert_ffn=512, shared_ffn=1024)
SYNTHETIC_NEMOTRONH = SyntheticSpec(name="synthetic-nemotronh", hidden=4480, layers=14, heads=40, kv_heads=8,
                                    ffn=15680, context=2**20, rope_base=10000.0, arch="nemotron_h", key_length=128,
                                    vocab=131072, seed=18)
SYNTHETIC_FALCONH1 = SyntheticSpec(name="synthetic-falconh1", hidden=2048, layers=24, heads=8, kv_heads=2, ffn=6144,
                                   context=262144, rope_base=100_000_000_000.0, arch="falcon-h1", key_length=128,
                                   vocab=65536, seed=19)
SYNTHETIC_NEMOTRONH_MOE = SyntheticSpec(name="synthetic-nemotronhmoe", hidden=2688, layers=8, heads=32, kv_heads=2,
                                        ffn=1856, context=2**20, rope_base=10000.0, arch="nemotron_h_moe",
                                        key_length=128, vocab=131072, seed=20, experts=128, experts_used=6,
                                        expert_ffn=1856, shared_ffn=3712)
SPECS = {"granitehybrid": SYNTHETIC_GRANITE, "granitehybridmoe": SYNTHETIC_GRANITE_MOE,
         "nemotronh": SYNTHETIC_NEMOTRONH, "nemotronhmoe": SYNTHETIC_NEMOTRONH_MOE, "falconh1": SYNTHETIC_FALCONH1}
CONV = 4
# (heads, head width, state size, groups) of each family's mixers
MAMBA = {"granitehybrid": (48, 64, 128, 1), "nemotron_h": (128, 80, 128, 8), "nemotron_h_moe": (64, 64, 128, 8),
         "falcon-h1": (48, 64, 256, 1)}
NEMOTRONH_PATTERN, NEMOTRONH_MOE_PATTERN = "M-M-M-MM-M-M*-", "MEMEM*EM"
FORMAT = 6  # bump when the bytes written change: part of the cached file's name


def synthetic_mamba2_path(spec: SyntheticSpec, tokenizer_source: Path | None = None) -> Path:
    return synthetic_path(spec, tokenizer_source, write=write_mamba2, version=FORMAT)


def layer_kinds(spec: SyntheticSpec) -> str:
    """Each layer's kind as Nemotron-H's pattern writes it: M a Mamba-2 mixer, * attention, - an MLP alone;
    Granite's layers are M or * (one in ten attends, the sixth of each ten), each with an MLP."""
    if spec.arch.startswith("nemotron_h"):
        return (NEMOTRONH_MOE_PATTERN if spec.experts else NEMOTRONH_PATTERN)[:spec.layers]
    if spec.arch == "falcon-h1":
        return "B" * spec.layers  # both, side by side
    return "".join("*" if i % 10 == 5 else "M" for i in range(spec.layers))


def _fitting(qtype: GGMLQuantizationType, width: int) -> GGMLQuantizationType:
    """llama.cpp's fallback where a row is no whole number of super-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0."""
    return qtype if width % QK_K == 0 else {Q4_K: Q5_0, Q6_K: Q8_0}[qtype]


def tensor_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, numpy shape (out, in), block type), in the converter's order."""
    return [(name, shape, qtype if qtype == F32 else _fitting(qtype, shape[-1]))
            for name, shape, qtype in _plan(spec, vocab)]


def _plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    d, hd = spec.hidden, spec.head_dim
    heads, head_width, state, groups = MAMBA[spec.arch]
    inner = heads * head_width
    channels = inner + 2 * groups * state
    plan = [("token_embd.weight", (vocab, d), Q6_K if spec.tied else Q4_K)]
    for i, kind in enumerate(layer_kinds(spec)):
        wide = Q6_K if more_bits(i, spec.layers) else Q4_K
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32)]
        if kind == "-":  # Nemotron-H's MLP layer: up and down, no gate, no norm of its own
            plan += [(f"blk.{i}.ffn_up.weight", (spec.ffn, d), Q4_K), (f"blk.{i}.ffn_down.weight", (d, spec.ffn), wide)]
            continue
        if kind == "E":  # Nemotron 3 Nano's: ReLU^2 experts (up and down) and a shared one, a biased router
            e, fe, fs = spec.experts, spec.expert_ffn, spec.shared_ffn
            plan += [(f"blk.{i}.ffn_gate_inp.weight", (e, d), F32), (f"blk.{i}.exp_probs_b.bias", (e,), F32),
                     (f"blk.{i}.ffn_up_exps.weight", (e, fe, d), Q4_K),
                     (f"blk.{i}.ffn_down_exps.weight", (e, d, fe), wide),
                     (f"blk.{i}.ffn_up_shexp.weight", (fs, d), Q4_K), (f"blk.{i}.ffn_down_shexp.weight", (d, fs), wide)]
            continue
        if kind in "*B":
            plan += [(f"blk.{i}.attn_q.weight", (spec.heads * hd, d), Q4_K),
                     (f"blk.{i}.attn_k.weight", (spec.kv_heads * hd, d), Q4_K),
                     (f"blk.{i}.attn_v.weight", (spec.kv_heads * hd, d), wide),
                     (f"blk.{i}.attn_output.weight", (d, spec.heads * hd), Q4_K)]
        if kind in "MB":
            plan += [(f"blk.{i}.ssm_in.weight", (inner + channels + heads, d), Q4_K),
                     (f"blk.{i}.ssm_conv1d.weight", (channels, CONV), F32),
                     (f"blk.{i}.ssm_conv1d.bias", (channels,), F32), (f"blk.{i}.ssm_dt.bias", (heads,), F32),
                     (f"blk.{i}.ssm_a", (heads, 1), F32), (f"blk.{i}.ssm_d", (heads, 1), F32)]
            if spec.arch != "falcon-h1":  # its mixers have no gated norm
                plan += [(f"blk.{i}.ssm_norm.weight", (groups, inner // groups), F32)]
            plan += [(f"blk.{i}.ssm_out.weight", (d, inner), Q4_K)]
        if spec.arch.startswith("nemotron_h"):
            continue  # a mixer alone
        # Falcon-H1's pre-MLP norm has no .weight in its files
        plan += [(f"blk.{i}.ffn_norm" + ("" if spec.arch == "falcon-h1" else ".weight"), (d,), F32)]
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
    plan += [("output_norm.weight", (d,), F32)]
    return plan if spec.tied else plan + [("output.weight", (vocab, d), Q6_K)]


def _f32(spec: SyntheticSpec, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1 (a tenth before Nemotron-H's MLPs), decays that forget at different rates
    (A = -exp(A_log) of 1 to 16, as the reference initializes it), D near 1, a small convolution."""
    if name.endswith(".attn_norm.weight") and layer_kinds(spec)[_layer(name)] in "-E":
        # relu(u)^2 of random u has a mean of half u's variance: at full scale each MLP adds one fixed
        # vector thirty times the embedding's size, the random model's next token stops depending on
        # the text, it repeats itself, and guessed tokens fire where a real model's seldom do.
        return (0.1 * (1.0 + 0.05 * rng.standard_normal(shape))).astype(np.float32)
    if (drawn := router_and_decay(name, shape, rng)) is not None:
        return drawn
    if name.endswith((".ssm_dt.bias", ".ssm_conv1d.bias")):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".ssm_conv1d.weight"):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def write_mamba2(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> Path:
    w, fields, vocab, tmp = begin_file(spec, tokenizer_source, path)
    kinds = layer_kinds(spec)
    w.add_head_count(spec.heads)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    if spec.arch == "falcon-h1":  # attention with RoPE in every layer
        w.add_head_count_kv(spec.kv_heads)
        w.add_feed_forward_length(spec.ffn)
    else:
        w.add_head_count_kv([spec.kv_heads if kind == "*" else 0 for kind in kinds])
        w.add_rope_scaling_finetuned(False)  # no RoPE
        w.add_feed_forward_length([spec.ffn if kind in "-E" else 0 for kind in kinds]
                                  if spec.arch.startswith("nemotron_h") else spec.ffn)
    if spec.arch.startswith("nemotron_h"):
        w.add_layer_norm_eps(1e-5)  # llama.cpp requires it (its MTP head's norm)
    if spec.arch == "granitehybrid":
        w.add_attention_scale(1 / 128)
        w.add_embedding_scale(1.0)
        w.add_residual_scale(1.0)
        w.add_logit_scale(6.0)
    else:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if spec.experts:
        w.add_expert_count(spec.experts)
        w.add_expert_used_count(spec.experts_used)
        w.add_expert_shared_feed_forward_length(spec.shared_ffn)
    if spec.arch == "nemotron_h_moe":  # conversion/nemotron.py's keys, Nemotron 3 Nano's values
        w.add_expert_feed_forward_length(spec.expert_ffn)
        w.add_expert_shared_count(1)
        w.add_expert_weights_norm(True)
        w.add_expert_weights_scale(2.5)
        w.add_expert_group_count(1)
    heads, head_width, state, groups = MAMBA[spec.arch]
    w.add_ssm_conv_kernel(CONV)
    w.add_ssm_state_size(state)
    w.add_ssm_group_count(groups)
    w.add_ssm_inner_size(heads * head_width)
    w.add_ssm_time_step_rank(heads)
    w.add_vocab_size(vocab)
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.add_quantization_version(2)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    return write_tensors(w, tensor_plan(spec, vocab), np.random.default_rng(spec.seed), tmp, path,
                         functools.partial(_f32, spec))


if __name__ == "__main__":
    print(synthetic_mamba2_path(SPECS[sys.argv[1]]))
