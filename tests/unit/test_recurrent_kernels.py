"""kernels/csrc/recurrent.cpp against models/qwen35.py's and models/granite_hybrid.py's torch statements of
the same math: the causal convolution (with Mamba-2's bias), the gated delta rule with its gated norm,
Mamba-2's selective scan with its norm by groups, and the attention gate, over several sequences in one
call, each from its own state slot, with tiled and grouped value heads; and the property the runner
relies on: a row's result is the same bits whatever rows share its call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textmill import kernels
from textmill.linear_attention import LinearAttentionShape
from textmill.models import granite_hybrid, qwen35

ext = kernels.load("recurrent")
pytestmark = pytest.mark.skipif(ext is None, reason="textmill's C++ kernels are not built here")

SHAPE = LinearAttentionShape(key_heads=2, value_heads=6, key_dim=32, value_dim=48, conv_kernel=4)
ROWS = ((0, 5, 2), (5, 1, 0), (6, 3, 1))  # (first row, rows, slot): a prompt chunk, a decode, another chunk


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, n = SHAPE, sum(r[1] for r in ROWS)
    hv, dv = s.value_heads, s.value_dim
    return dict(mixed=torch.randn(n, s.conv_channels, generator=g), weight=torch.randn(s.conv_channels, 4, generator=g),
                conv=torch.randn(3, 3, s.conv_channels, generator=g), z=torch.randn(n, hv * dv, generator=g),
                b=torch.randn(n, hv, generator=g), a=torch.randn(n, hv, generator=g),
                A=-torch.rand(hv, generator=g) * 4, dt=torch.randn(hv, generator=g),
                norm=1 + 0.2 * torch.randn(dv, generator=g), ssm=0.1 * torch.randn(3, hv, s.key_dim, dv, generator=g))


def _reference(x, shape: LinearAttentionShape):
    """models/qwen35.py's GatedDeltaNet.forward from the projections on."""
    conv, ssm = x["conv"].clone(), x["ssm"].clone()
    n, s = x["mixed"].shape[0], shape
    mixed = qwen35.causal_conv(x["mixed"], x["weight"], conv, ROWS)
    q, k, v = mixed.split([s.key_heads * s.key_dim, s.key_heads * s.key_dim, s.value_heads * s.value_dim], -1)
    heads = qwen35.value_head_sources(s)
    q = (qwen35.l2_normalize(q.view(n, s.key_heads, -1)) * s.key_dim**-0.5).index_select(1, heads)
    k = qwen35.l2_normalize(k.view(n, s.key_heads, -1)).index_select(1, heads)
    g = x["A"] * F.softplus(x["a"] + x["dt"])
    o = qwen35.gated_delta_rule(q, k, v.reshape(n, s.value_heads, -1), g, torch.sigmoid(x["b"]), ssm, ROWS)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * x["norm"]
    o = o * F.silu(x["z"].view(n, s.value_heads, -1))
    return mixed, o.reshape(n, -1), conv, ssm


def _kernels(x, shape: LinearAttentionShape, rows=ROWS):
    conv, ssm = x["conv"].clone(), x["ssm"].clone()
    seqs = torch.tensor(rows).view(-1, 3)
    mixed = ext.causal_conv(x["mixed"], x["weight"].t().contiguous(), conv, seqs, True)
    o = ext.gated_delta(mixed, x["z"], x["b"], x["a"], x["A"], x["dt"], x["norm"], ssm, seqs, shape.key_heads,
                        shape.tiled_heads, 1e-6)
    return mixed, o, conv, ssm


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "grouped"])
def test_kernels_compute_the_model_statement(tiled):
    shape = LinearAttentionShape(**{**SHAPE.__dict__, "tiled_heads": tiled})
    x = _inputs()
    for got, want in zip(_kernels(x, shape), _reference(x, shape)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_row_is_the_same_bits_in_any_call():
    """Each sequence alone, one row a call, gives the rows and states of the batched call bitwise."""
    x = _inputs(1)
    batched = _kernels(x, SHAPE)
    conv, ssm = x["conv"].clone(), x["ssm"].clone()
    outs = []
    for first, count, slot in ROWS:
        for row in range(first, first + count):
            one = {k: (v[row:row + 1] if k in ("mixed", "z", "b", "a") else v) for k, v in x.items()}
            one["conv"], one["ssm"] = conv, ssm
            m, o, conv, ssm = _kernels(one, SHAPE, rows=((0, 1, slot),))
            outs.append((m, o))
    assert torch.equal(torch.cat([m for m, _ in outs]), batched[0])
    assert torch.equal(torch.cat([o for _, o in outs]), batched[1])
    assert torch.equal(conv, batched[2]) and torch.equal(ssm, batched[3])


def test_sigmoid_gate_and_bad_rows():
    x, gate = torch.randn(3, 40), torch.randn(3, 80)[:, 20:60]
    torch.testing.assert_close(ext.sigmoid_gate(x.clone(), gate), x * torch.sigmoid(gate))
    x = _inputs()
    with pytest.raises(RuntimeError, match="rows cover"):
        ext.causal_conv(x["mixed"], x["weight"].t().contiguous(), x["conv"], torch.tensor([[0, 2, 0]]), True)
    with pytest.raises(RuntimeError, match="slot"):
        ext.causal_conv(x["mixed"][:2], x["weight"].t().contiguous(), x["conv"], torch.tensor([[0, 2, 7]]), True)


# Mamba-2: 6 heads of P in 2 groups of B and C, a state of 16; P = 64 takes blocks of two registers
# (AVX-512) or one (AVX2), 80 (Nemotron-H's) one register, 12 the one-column loop.
MAMBA = dict(key_heads=2, value_heads=6, key_dim=16, conv_kernel=4, tiled_heads=False)


def _mamba_inputs(p: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, n = LinearAttentionShape(value_dim=p, **MAMBA), sum(r[1] for r in ROWS)
    inner, h = s.value_heads * p, s.value_heads
    c = s.conv_channels
    return s, dict(xbc=torch.randn(n, c, generator=g), weight=torch.randn(c, 4, generator=g),
                   bias=torch.randn(c, generator=g), conv=torch.randn(3, 3, c, generator=g),
                   z=torch.randn(n, inner, generator=g), dt=torch.randn(n, h, generator=g),
                   A=-torch.rand(h, generator=g) * 4, D=torch.randn(h, generator=g),
                   dt_bias=torch.randn(h, generator=g), norm=1 + 0.2 * torch.randn(inner, generator=g),
                   ssm=0.1 * torch.randn(3, h, s.key_dim, p, generator=g))


def _mamba_reference(s: LinearAttentionShape, x):
    """models/granite_hybrid.py's Mamba2.forward from the projection on."""
    conv, ssm = x["conv"].clone(), x["ssm"].clone()
    n, inner, ns = x["xbc"].shape[0], s.value_heads * s.value_dim, s.key_heads * s.key_dim
    xbc = granite_hybrid.causal_conv(x["xbc"], x["weight"], conv, ROWS, bias=x["bias"])
    xs, B, C = xbc.split([inner, ns, ns], -1)
    xs = xs.reshape(n, s.value_heads, -1)
    dt = F.softplus(x["dt"] + x["dt_bias"])
    y = granite_hybrid.selective_scan(xs, B.reshape(n, s.key_heads, -1), C.reshape(n, s.key_heads, -1), dt, x["A"],
                                      ssm, ROWS)
    y = (y + xs * x["D"][:, None]).reshape(n, inner) * F.silu(x["z"])
    groups = y.view(n, s.key_heads, -1)
    y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(n, -1) * x["norm"]
    return xbc, y, conv, ssm


def _mamba_kernels(s: LinearAttentionShape, x, rows=ROWS):
    conv, ssm = x["conv"].clone(), x["ssm"].clone()
    seqs = torch.tensor(rows).view(-1, 3)
    xbc = ext.causal_conv(x["xbc"], x["weight"].t().contiguous(), conv, seqs, True, x["bias"])
    y = ext.ssm_scan(xbc, x["z"], x["dt"], x["A"], x["D"], x["dt_bias"], x["norm"], ssm, seqs, s.key_heads, 1e-5)
    return xbc, y, conv, ssm


@pytest.mark.parametrize("p", [64, 80, 12])
def test_the_scan_computes_the_model_statement(p):
    s, x = _mamba_inputs(p)
    for got, want in zip(_mamba_kernels(s, x), _mamba_reference(s, x)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("p", [64, 80, 12])
def test_a_scanned_row_is_the_same_bits_in_any_call(p):
    s, x = _mamba_inputs(p, seed=1)
    batched = _mamba_kernels(s, x)
    conv, ssm, outs = x["conv"].clone(), x["ssm"].clone(), []
    for first, count, slot in ROWS:
        for row in range(first, first + count):
            one = {k: (v[row:row + 1] if k in ("xbc", "z", "dt") else v) for k, v in x.items()}
            one["conv"], one["ssm"] = conv, ssm
            xbc, y, conv, ssm = _mamba_kernels(s, one, rows=((0, 1, slot),))
            outs.append((xbc, y))
    assert torch.equal(torch.cat([a for a, _ in outs]), batched[0])
    assert torch.equal(torch.cat([y for _, y in outs]), batched[1])
    assert torch.equal(conv, batched[2]) and torch.equal(ssm, batched[3])
