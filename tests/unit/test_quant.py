"""Packed bf16 and weight-only int8/int4 linear layers (runner/linear.py, runner/quant.py).

Kernels are checked against plain float math on the same (de)quantized weights; the swap
is checked on a small random Llama through the ModelRunner (prompt-logprob drift against
float32 stays bounded, and the small-step int kernels agree with the big-step bf16 path).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from textmill.config import CacheConfig, ModelConfig
from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput
from textmill.runner import ModelRunner
from textmill.runner.linear import PackedLinear, packing_supported
from textmill.runner.quant import (
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    install_linears,
    quantize_int4,
    quantize_int8,
)
from textmill.sampling_params import SamplingParams

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(not packing_supported(CPU, torch.bfloat16), reason="no oneDNN bf16")


def test_int8_roundtrip_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


def test_int4_roundtrip_error_and_exact_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q, scale, zero = quantize_int4(w)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize_int4(q, scale, zero) - w).abs().view(16, 2, 32)
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    # Weights already on a 4-bit grid per 32 (GGUF Q4_1) come back exactly.
    codes = torch.randint(0, 16, (16, 64)).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the full range
    d, m = torch.rand(16, 2, 1) + 0.1, torch.randn(16, 2, 1)
    grid = (codes.view(16, 2, 32) * d + m).view(16, 64)
    torch.testing.assert_close(dequantize_int4(*quantize_int4(grid)), grid, atol=1e-5, rtol=0)


@needs_packing
def test_packed_linear_equals_nn_linear_bitwise():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    packed = PackedLinear.from_linear(lin)
    for m in (1, 3, 17):
        x = torch.randn(m, 64, dtype=torch.bfloat16)
        assert torch.equal(packed(x), lin(x))


@needs_packing
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_linear_small_and_big_steps_match_dequantized_math(mode):
    torch.manual_seed(1)
    lin = nn.Linear(64, 48, bias=True)
    ql = QuantLinear.from_linear(lin, mode, max_small_rows=2)
    if mode == "int8":
        w = dequantize_int8(ql.q, ql.scale.float())
    else:
        w = dequantize_int4(*quantize_int4(lin.weight))
        w = w.to(torch.bfloat16).float()  # scales/zeros are bf16 in the kernel
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    ref = x.float() @ w.T + lin.bias.detach().to(torch.bfloat16).float()
    small = torch.cat([ql(x[i : i + 1]) for i in range(6)])  # int kernel, one row at a time
    big = ql(x)  # 6 rows > 2: packed bf16 of the dequantized weights
    scale = ref.abs().max()
    assert (small.float() - ref).abs().max() < 0.02 * scale
    assert (big.float() - ref).abs().max() < 0.02 * scale
    assert (small.float() - big.float()).abs().max() < 0.02 * scale


@needs_packing
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_linear_keeps_no_dense_copy(mode):
    """Only integer weights (and their scales) stay: no bf16 matrix beside them."""
    lin = nn.Linear(64, 48)
    ql = QuantLinear.from_linear(lin, mode, max_small_rows=2)
    held = [t for t in vars(ql).values() if torch.is_tensor(t)]
    held += [t for m in ql.children() for t in m.state_dict().values()]
    assert sum(t.numel() * t.element_size() for t in held) < 64 * 48 * 1.5  # bytes: <= 1.5 a weight
    assert not any(t.is_floating_point() and t.numel() >= 64 * 48 for t in held)


def test_float32_keeps_nn_linear_and_quantization_needs_bf16():
    model = nn.Sequential(nn.Linear(8, 8))
    assert install_linears(model, 32, CPU, torch.float32, "none") == "nn.Linear"
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="bfloat16"):
        install_linears(model, 32, CPU, torch.float32, "int8")
    with pytest.raises(ValueError, match="quantization"):
        install_linears(model, 32, CPU, torch.bfloat16, "int3")


# ---------------------------------------------------------------- through the runner
def _llama(tied: bool) -> tuple[nn.Module, ModelConfig]:
    from textmill.models import llama
    cfg = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = llama.LlamaForCausalLM(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        if p.dim() > 1:
            p.normal_(0, 0.08)
    return model, cfg


def _prompt_logprobs(model, cfg, dtype, quantization, tokens) -> torch.Tensor:
    model = model.to(dtype)
    runner = ModelRunner(model, cfg, CacheConfig(block_size=8, num_blocks=16), dtype=dtype,
                         quantization=quantization)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    chunk = ScheduledChunk("x", tuple(tokens), 0, tuple(range(8)), True, tuple(tokens[1:]))
    out = runner.execute(SchedulerOutput((NewRequestData("x", params),), (chunk,)))
    return torch.tensor([p.logprob for p in out.prompt_logprobs["x"]])


@needs_packing
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("quantization,bound", [("none", 0.02), ("int8", 0.04), ("int4", 0.25)])
def test_prompt_logprob_drift_against_float32_is_bounded(tied, quantization, bound):
    tokens = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    model, cfg = _llama(tied)
    ref = _prompt_logprobs(model, cfg, torch.float32, "none", tokens)
    model, cfg = _llama(tied)
    got = _prompt_logprobs(model, cfg, torch.bfloat16, quantization, tokens)
    drift = (got - ref).abs()
    assert drift.mean() < bound, f"mean |dlogprob| {drift.mean():.4f}"
    if quantization != "none":  # the swap reached the head too (tied or not)
        assert isinstance(model.lm_head, QuantLinear)


@pytest.mark.slow
@needs_packing
def test_bundled_model_drift_is_what_docs_performance_reports():
    """docs/performance.md: mean |prompt logprob - float32's| over ~480 tokens of English."""
    from textmill.loader import load_model
    from textmill.loader.bundled import bundled_model_path
    from textmill.tokenizer import load_gguf_tokenizer

    path = bundled_model_path()
    text = " ".join(["The quick brown fox jumps over the lazy dog while the farmer counts his sheep."] * 4
                    + [open(__file__).read()[:1500]])
    tokens = load_gguf_tokenizer(path).encode(text)[:480]

    def run(dtype, quantization):
        loaded = load_model(path, dtype=dtype)
        runner = ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=16, num_blocks=32),
                             dtype=dtype, quantization=quantization)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        chunk = ScheduledChunk("x", tuple(tokens), 0, tuple(range(31)), True, tuple(tokens[1:]))
        out = runner.execute(SchedulerOutput((NewRequestData("x", params),), (chunk,)))
        return torch.tensor([p.logprob for p in out.prompt_logprobs["x"]])

    ref = run(torch.float32, "none")
    for quantization, bound in (("none", 0.06), ("int8", 0.12), ("int4", 0.09)):
        drift = (run(torch.bfloat16, quantization) - ref).abs().mean()
        assert drift < bound, f"{quantization}: mean |dlogprob| {drift:.4f}"
