"""A mixture of experts on the CPU kernels (runner/moe.py): the router, the grouped expert
projections and the weighted sum each against a plain torch statement of the same math, then
a GGUF with experts in k-quant blocks end to end against the eager float reference, and a
token's results bitwise the same however the steps group it (guessed tokens rely on that)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T, GGUFWriter

from textmill import kernels
from textmill.config import CacheConfig
from textmill.loader import load_model
from textmill.models.moe import route
from textmill.runner import ModelRunner
from textmill.runner.kernel_forward import KernelForward
from textmill.runner.moe import KernelMoE
from textmill.runner.qlinear import QLinear
from tests.unit.test_file_weights import _blocks, _prompt_logprobs
from tests.unit.test_kernel_forward import _exactly, _workload
from tests.unit.test_model_runner import drive

C, LAYERS, HEADS, KV_HEADS, VOCAB, EXPERTS, USED, WIDTH = 256, 2, 4, 2, 320, 8, 3, 256
D = C // HEADS


@pytest.fixture(scope="module")
def ops():
    layer, quant = kernels.load("layer"), kernels.load("quant")
    assert layer is not None and quant is not None, "the C++ kernels did not build"
    return layer, quant


def test_experts_linear_is_each_expert_alone(ops):
    """Rows [offsets[e], offsets[e + 1]) against expert e of a stacked weight, bitwise the
    expert's own linear on those rows; experts without rows are skipped."""
    _, quant = ops
    torch.manual_seed(0)
    for mode in ("q4k", "q8", "q6k", "mxfp4"):
        n, k = 48, 256
        weights = [torch.randn(n, k) * 0.05 for _ in range(5)]
        packed = [getattr(quant, f"{mode}_pack")(w) for w in weights]
        counts = [3, 0, 1, 7, 0]
        offsets = torch.tensor([0] + list(np.cumsum(counts)), dtype=torch.long)
        x = torch.randn(sum(counts), k)
        y = quant.experts_linear(x, offsets, quant.mode_number(mode), torch.cat(packed), n)
        for e, p in enumerate(packed):
            rows = slice(int(offsets[e]), int(offsets[e + 1]))
            if counts[e]:
                expected = getattr(quant, f"{mode}_linear")(x[rows], p, n)
                assert torch.equal(y[rows], expected), (mode, e)
    with pytest.raises(RuntimeError, match="whole tiles"):
        quant.experts_linear(x, offsets, quant.mode_number("q8"), torch.cat(packed), 40)


def test_route_and_combine_state_the_routers_math(ops):
    layer, _ = ops
    torch.manual_seed(1)
    n, e, k, c = 37, 16, 4, 64
    logits = torch.randn(n, e) * 2
    bias = torch.randn(e) * 0.1  # ERNIE 4.5 MoE's selection bias: chooses, does not weigh
    # LFM2 MoE's: sigmoid probabilities, chosen with a bias, renormalized
    for normalize, selection, sigmoid in ((True, None, False), (False, None, False), (True, bias, False),
                                          (False, None, True), (True, bias, True)):
        tok, w, offsets = layer.moe_route(logits, k, normalize, selection, sigmoid)
        weights, ids = route(logits, k, normalize, selection, sigmoid)
        assert offsets[0] == 0 and offsets[-1] == n * k and bool((offsets[1:] >= offsets[:-1]).all())
        expert = torch.repeat_interleave(torch.arange(e), offsets[1:] - offsets[:-1])
        got = {(int(t), int(x)): float(v) for t, x, v in zip(tok, expert, w)}
        want = {(t, int(ids[t, j])): float(weights[t, j]) for t in range(n) for j in range(k)}
        assert got.keys() == want.keys()
        assert max(abs(got[key] - want[key]) for key in want) < 1e-6
        for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist()):  # tokens ascending within an expert
            assert tok[lo:hi].tolist() == sorted(tok[lo:hi].tolist())
    assert not torch.equal(ids, route(logits, k, True, None, True)[1])  # the bias chose other experts
    assert not torch.allclose(route(logits, k, False, sigmoid=True)[0], route(logits, k, False)[0])
    d = torch.randn(n * k, c)
    out = layer.moe_combine(d, tok, w, n)
    expected = torch.zeros(n, c).index_add_(0, tok, d * w[:, None])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_gpt_oss_glu_and_biased_combine_state_their_math(ops):
    """moe_glu: each routed row's expert's gate|up bias, then the clamped SwiGLU (the clamps
    biting); moe_combine with a down bias: w (d + b) of each row's expert."""
    layer, _ = ops
    from textmill.models.llama import SWIGLU_ALPHA, swiglu_clamped

    torch.manual_seed(2)
    counts = [3, 0, 5, 1]
    offsets = torch.tensor([0] + list(np.cumsum(counts)), dtype=torch.long)
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    g, bias = torch.randn(9, 2 * 40) * 6, torch.randn(4, 2 * 40)
    b = g + bias[ids]
    expected = swiglu_clamped(b[:, :40], b[:, 40:], 7.0)
    torch.testing.assert_close(layer.moe_glu(g, offsets, bias, 7.0, SWIGLU_ALPHA), expected, rtol=1e-5, atol=1e-5)
    d, down, tok, w = torch.randn(9, 24), torch.randn(4, 24), torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0]), torch.rand(9)
    expected = torch.zeros(5, 24).index_add_(0, tok, w[:, None] * (d + down[ids]))
    torch.testing.assert_close(layer.moe_combine(d, tok, w, 5, bias=down, offsets=offsets), expected)
    with pytest.raises(RuntimeError, match="offsets"):
        layer.moe_glu(g, offsets[:-1], bias[:3], 7.0, SWIGLU_ALPHA)


def test_dense_rows_is_row_independent(ops):
    """The float router's logits: each row's the same bits alone as in any batch."""
    layer, _ = ops
    torch.manual_seed(2)
    x, w = torch.randn(23, 200), torch.randn(13, 200)
    whole = layer.dense_rows(x, w)
    torch.testing.assert_close(whole, F.linear(x, w), rtol=1e-5, atol=1e-5)
    for i in (0, 7, 22):
        assert torch.equal(layer.dense_rows(x[i:i + 1].contiguous(), w), whole[i:i + 1])


def _write_moe(path, gate_up: T, down: T, arch: str = "qwen3moe", fused: bool = False) -> None:
    """A Qwen3 MoE file as llama.cpp writes one: stacked experts in k-quant blocks, a float router;
    as `arch` "qwen2moe", q/k/v biases instead of q/k norms and a shared expert behind a gate;
    as "gpt-oss", biases on q/k/v/o, the router and every expert, attention sinks and a window
    in every other layer; as "ernie4_5-moe", an ungated shared expert and the router's
    selection bias; `fused`: each expert's gate and up rows in one ffn_gate_up_exps stack
    (newer converters)."""
    rng = np.random.default_rng(3)
    w = GGUFWriter(str(path), arch)
    for key, value in (("embedding_length", C), ("block_count", LAYERS), ("feed_forward_length", 4 * C),
                       ("attention.head_count", HEADS), ("attention.head_count_kv", KV_HEADS),
                       ("context_length", 256), ("attention.key_length", D), ("expert_count", EXPERTS),
                       ("expert_used_count", USED), ("expert_feed_forward_length", WIDTH)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if arch == "gpt-oss":
        w.add_uint32(f"{arch}.attention.sliding_window", 8)
    w.add_tensor("token_embd.weight", _blocks(T.Q8_0, (VOCAB, C), rng), raw_dtype=T.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(C, dtype=np.float32))
    for i in range(LAYERS):
        qk_norms = (("attn_q_norm", D), ("attn_k_norm", D)) if arch == "qwen3moe" else ()
        mlp_norm = "post_attention_norm" if arch == "gpt-oss" else "ffn_norm"
        for norm, width in (("attn_norm", C), (mlp_norm, C), *qk_norms):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(width)).astype(np.float32))
        if arch in ("qwen2moe", "gpt-oss"):
            out_bias = (("attn_output", C), ("ffn_gate_inp", EXPERTS)) if arch == "gpt-oss" else ()
            for name, width in (("attn_q", C), ("attn_k", KV_HEADS * D), ("attn_v", KV_HEADS * D), *out_bias):
                w.add_tensor(f"blk.{i}.{name}.bias", (0.1 * rng.standard_normal(width)).astype(np.float32))
        if arch == "gpt-oss":
            w.add_tensor(f"blk.{i}.attn_sinks.weight", rng.standard_normal(HEADS).astype(np.float32))
            for name, width in (("gate", WIDTH), ("up", WIDTH), ("down", C)):
                bias = (0.1 * rng.standard_normal((EXPERTS, width))).astype(np.float32)
                w.add_tensor(f"blk.{i}.ffn_{name}_exps.bias", bias)
        if arch in ("qwen2moe", "ernie4_5-moe"):  # a shared expert, gated in Qwen2 MoE
            for name, shape in (("ffn_gate_shexp", (2 * WIDTH, C)), ("ffn_up_shexp", (2 * WIDTH, C)),
                                ("ffn_down_shexp", (C, 2 * WIDTH))):
                w.add_tensor(f"blk.{i}.{name}.weight", _blocks(T.Q4_K, shape, rng), raw_dtype=T.Q4_K)
        if arch == "qwen2moe":
            w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", (rng.standard_normal((1, C)) * 0.3).astype(np.float32))
        if arch == "ernie4_5-moe":  # the router's selection bias
            w.add_tensor(f"blk.{i}.exp_probs_b.bias", (0.1 * rng.standard_normal(EXPERTS)).astype(np.float32))
        for name, shape in (("attn_q", (C, C)), ("attn_k", (KV_HEADS * D, C)), ("attn_v", (KV_HEADS * D, C)),
                            ("attn_output", (C, C))):
            w.add_tensor(f"blk.{i}.{name}.weight", _blocks(T.Q4_K, shape, rng), raw_dtype=T.Q4_K)
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", (rng.standard_normal((EXPERTS, C)) * 0.3).astype(np.float32))
        stacks = {name: _blocks(qtype, (EXPERTS * rows, k), rng).reshape(EXPERTS, rows, -1)
                  for name, qtype, (rows, k) in (("gate", gate_up, (WIDTH, C)), ("up", gate_up, (WIDTH, C)),
                                                 ("down", down, (C, WIDTH)))}
        if fused:
            stacks = {"gate_up": np.concatenate([stacks["gate"], stacks["up"]], axis=1), "down": stacks["down"]}
        for name, stack in stacks.items():
            w.add_tensor(f"blk.{i}.ffn_{name}_exps.weight", stack, raw_dtype=down if name == "down" else gate_up)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=[(T.Q4_K, T.Q6_K, "qwen3moe"), (T.Q8_0, T.Q5_K, "qwen3moe"),
                                        (T.Q4_K, T.Q6_K, "qwen2moe"), (T.MXFP4, T.MXFP4, "qwen3moe"),
                                        (T.MXFP4, T.MXFP4, "gpt-oss"), (T.Q4_K, T.Q6_K, "ernie4_5-moe")],
                ids=["q4k-q6k", "q8-q5k", "qwen2moe", "mxfp4", "gpt-oss", "ernie"])
def moe_path(request, ops, tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / f"{request.param[2]}-{request.param[0].name}.gguf"
    _write_moe(path, *request.param)
    return path


def _kernel_runner(path) -> ModelRunner:
    loaded = load_model(path, codes=True)
    return ModelRunner(loaded.model, loaded.config, CacheConfig(16, 16), file_weights=loaded)


def test_a_moe_file_runs_its_experts_stacked_and_tracks_the_float_reference(moe_path):
    tokens = random.Random(0).choices(range(VOCAB), k=40)
    ref_model = load_model(moe_path, dtype=torch.float32)
    ref = _prompt_logprobs(ModelRunner(ref_model.model, ref_model.config, CacheConfig(16, 8), kernels=False), tokens)
    runner = _kernel_runner(moe_path)
    assert isinstance(runner.forward, KernelForward) and runner.chunks_match_steps
    moes = [layer.mlp for layer in runner.forward.layers]
    assert all(isinstance(m, KernelMoE) for m in moes)
    assert all(isinstance(m.gate_up, QLinear) and m.gate_up.out_features == EXPERTS * 2 * WIDTH for m in moes)
    assert type(moes[0].router) is torch.nn.Linear  # the file's float router, read row by row
    if "MXFP4" in moe_path.name:  # gpt-oss's experts' type: its own 4-bit form, both projections
        assert all(m.gate_up.mode == m.down.mode == "mxfp4" for m in moes)
    shared, gated = ("qwen2moe" in moe_path.name or "ernie" in moe_path.name), "qwen2moe" in moe_path.name
    assert (moes[0].shared_expert is not None, moes[0]._shared_gate is not None) == (shared, gated)
    assert (moes[0]._selection_bias is not None) == ("ernie" in moe_path.name)
    got = _prompt_logprobs(runner, tokens)
    assert ref.std() > 0.5
    assert (got - ref).abs().mean() < 0.04 * ref.std()
    assert torch.corrcoef(torch.stack([got, ref]))[0, 1] > 0.995


def test_a_tokens_results_do_not_depend_on_its_step(moe_path):
    """Chunks of 3 and of 64 tokens, decode beside prefill or alone: the same bits."""
    runner = _kernel_runner(moe_path)
    _exactly(drive(runner, _workload(), budget=3), drive(_kernel_runner(moe_path), _workload(), budget=64))


def test_a_mixture_computes_each_row_alone(moe_path):
    """A layer's mixture over 100 rows gives each row the bits it gets alone (a shared expert's
    sigmoid gate included: torch.sigmoid's vector body and its tail round differently)."""
    moe = _kernel_runner(moe_path).forward.layers[0].mlp
    y = torch.randn(100, C, generator=torch.Generator().manual_seed(3))
    assert torch.equal(moe(y), torch.cat([moe(y[i:i + 1]) for i in range(len(y))]))


def test_float_weights_keep_the_models_own_moe_on_kernel_attention():
    """A float checkpoint's experts (a folder): no packed stack to run, so the model's own
    forward runs (its experts fused as any MLP), on the kernels' attention, and matches the
    eager path."""
    from tests.unit.test_kernel_forward import _compare, _random_llama, _runner

    moe = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False)
    eager = drive(_runner(*_random_llama(seed=5, **moe), False), _workload(), budget=7)
    runner = _runner(*_random_llama(seed=5, **moe), True)
    assert not isinstance(runner.forward, KernelForward) and not runner.chunks_match_steps
    _compare(eager, drive(runner, _workload(), budget=7), tol=1e-4)


def test_a_fused_gate_and_up_stack_is_read_as_the_two(ops, tmp_path):
    """Newer converters may write each expert's gate and up rows in one ffn_gate_up_exps stack:
    the same weights in either layout give the same bits."""
    tokens = random.Random(1).choices(range(VOCAB), k=24)
    got = []
    for fused in (False, True):
        path = tmp_path / f"moe-{fused}.gguf"
        _write_moe(path, T.Q4_K, T.Q6_K, fused=fused)
        got.append(_prompt_logprobs(_kernel_runner(path), tokens))
    assert torch.equal(got[0], got[1])
