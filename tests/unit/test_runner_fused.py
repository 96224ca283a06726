"""Fused Llama attention/MLP (runner/fused.py) compute what models/llama.py computes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from textmill.config import ModelConfig
from textmill.models import llama
from textmill.runner.fused import FusedAttention, FusedMLP, concatenating, fuse_llama_layers


class _Dense:
    """One sequence, no cache: causal attention over the step's own tokens."""

    def attend(self, layer, q, k, v, *, scale, sliding_window=None, logit_softcap=None, sinks=None):
        assert sinks is None, "no sinks here (gpt-oss: tests/parity/dense_attention.py)"
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
        n = q.shape[0]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


def _model(bias: bool, qk_norm: bool = False) -> nn.Module:
    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=48, intermediate_size=80,
                      num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
                      attention_bias=bias, qk_norm=qk_norm)
    torch.manual_seed(0)
    model = llama.LlamaForCausalLM(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("bias, qk_norm", [(False, False), (True, False), (False, True)])  # Qwen2, Qwen3
def test_fused_layers_match_the_model(bias, qk_norm):
    model = _model(bias, qk_norm)
    fused = copy.deepcopy(model)
    assert fuse_llama_layers(fused, concatenating(lambda lin: lin)) == 4
    assert isinstance(fused.layers[0].self_attn, FusedAttention) and isinstance(fused.layers[1].mlp, FusedMLP)
    ids, pos = torch.randint(0, 64, (9,)), torch.arange(9)
    with torch.inference_mode():
        want = model.forward(ids, pos, _Dense())
        got = fused.forward(ids, pos, _Dense())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rotation_is_bitwise_the_models():
    model = _model(False).to(torch.bfloat16)
    fused = copy.deepcopy(model)
    fuse_llama_layers(fused, concatenating(lambda lin: lin))
    seen = {}

    class Capture(_Dense):
        def __init__(self, tag):
            self.tag = tag

        def attend(self, layer, q, k, v, **kw):
            seen.setdefault(self.tag, []).append((q.clone(), k.clone()))
            return super().attend(layer, q, k, v, **kw)

    x = torch.randn(5, 48, dtype=torch.bfloat16)
    cos, sin = model.rotary(torch.arange(3, 8))
    with torch.inference_mode():
        model.layers[0].self_attn(x, cos, sin, Capture("model"))
        fused.layers[0].self_attn(x, cos, sin, Capture("fused"))
    (q0, k0), (q1, k1) = seen["model"][0], seen["fused"][0]
    # The q/k/v matmul is the same per column here (a small step); the rotation is exact.
    assert torch.equal(q0, q1) and torch.equal(k0, k1)


def test_other_modules_are_left_alone():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    m = nn.Sequential(Other())
    assert fuse_llama_layers(m, concatenating(lambda lin: lin)) == 0
    assert type(m[0].proj) is nn.Linear
