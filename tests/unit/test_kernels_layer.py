"""kernels/csrc/layer.cpp against plain torch references written from the math.

References run in float64, so the tolerance measures the kernels' float32 error alone.
Where the machine can build the extension (x86-64 Linux with a compiler, like CI), a failed
build fails these tests instead of skipping them.
"""
from __future__ import annotations

import math
import platform
import shutil
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from textmill.kernels import load
from textmill.runner.kv_cache import quantize_int8_rows, write_kv  # the rule int8 pools follow

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ops():
    m = load("layer")
    if m is None:
        can_build = (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
                     and (shutil.which("c++") or shutil.which("g++")))
        if can_build:
            pytest.fail("textmill.kernels.load('layer') returned None on x86-64 Linux with a compiler: "
                        "the build failed (see the 'textmill.kernels' warning in the log)")
        pytest.skip("no C++ toolchain for the layer kernels on this machine")
    return m


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return (w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))).float()


# ---------------------------------------------------------------------------------------
# RMSNorm, residual add
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("c", [1, 7, 33, 576, 1001])
def test_rms_norm(ops, m, c):
    g = torch.Generator().manual_seed(m * 1000 + c)
    x = torch.randn(m, c, generator=g) * 3
    w = torch.randn(c, generator=g)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), _rms_ref(x, w, 1e-5), **TOL)


@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("c", [1, 7, 33, 576, 1001])
def test_add_rms_norm(ops, m, c):
    g = torch.Generator().manual_seed(m * 1000 + c + 1)
    x, residual = torch.randn(m, c, generator=g), torch.randn(m, c, generator=g) * 10
    w = torch.randn(c, generator=g)
    expected_residual = residual + x
    y = ops.add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(residual, expected_residual)  # a float add, updated in place
    torch.testing.assert_close(y, _rms_ref(expected_residual, w, 1e-6), **TOL)


def test_rms_norm_zero_row_uses_eps(ops):
    x = torch.zeros(2, 9)
    assert torch.equal(ops.rms_norm(x, torch.ones(9), 1e-5), torch.zeros(2, 9))


def test_norm_rejects_bad_arguments(ops):
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="w: expected"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(5), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.rms_norm(torch.ones(4, 2).t(), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="residual"):
        ops.add_rms_norm(torch.ones(2, 4), torch.ones(3, 4), torch.ones(4), 1e-5)


# ---------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 16, 64])
@pytest.mark.parametrize("f", [1, 7, 33, 1536])
def test_silu_mul(ops, n, f):
    g = torch.Generator().manual_seed(n * 100 + f)
    gate_up = torch.randn(n, 2 * f, generator=g) * 4
    gate_up[0, : min(f, 4)] = torch.tensor([-100.0, 100.0, -87.0, 0.0])[: min(f, 4)]  # exp's clamps
    ref = gate_up.double()
    ref = (torch.nn.functional.silu(ref[:, :f]) * ref[:, f:]).float()
    torch.testing.assert_close(ops.silu_mul(gate_up), ref, rtol=1e-5, atol=1e-6)


def test_silu_mul_rejects_odd_width(ops):
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_mul(torch.ones(2, 5))


# ---------------------------------------------------------------------------------------
# GeGLU
# ---------------------------------------------------------------------------------------
def _gelu_tanh_ref(gate_up: torch.Tensor) -> torch.Tensor:
    f = gate_up.shape[1] // 2
    ref = gate_up.double()
    return F.gelu(ref[:, :f], approximate="tanh") * ref[:, f:]


@pytest.mark.parametrize("n", [1, 3, 16, 64])
@pytest.mark.parametrize("f", [1, 7, 33, 1536])
def test_gelu_tanh_mul(ops, n, f):
    g = torch.Generator().manual_seed(n * 100 + f + 5)
    gate_up = torch.randn(n, 2 * f, generator=g) * 4
    gate_up[0, : min(f, 5)] = torch.tensor([-100.0, 100.0, -9.0, 0.0, 1e-4])[: min(f, 5)]  # tails, exp's clamps
    out = ops.gelu_tanh_mul(gate_up)
    assert out.shape == (n, f) and out.dtype == torch.float32
    # Against the math (float64): a few float32 roundings. The exp of a large negative gate
    # is where the relative error grows (|2u| times the argument's rounding).
    torch.testing.assert_close(out, _gelu_tanh_ref(gate_up).float(), rtol=1e-5, atol=1e-7)
    # Against torch's float32 op, which computes 0.5 x (1 + tanh(u)): within a few ulp of
    # the larger of the output and of x * up (torch's own rounding of 1 + tanh(u) is an
    # ulp of 1, times 0.5 x; in the deep negative tail it is all torch has).
    torch_out = F.gelu(gate_up[:, :f], approximate="tanh") * gate_up[:, f:]
    eps = torch.finfo(torch.float32).eps
    bound = 4 * eps * torch.maximum(torch_out.abs(), (gate_up[:, :f] * gate_up[:, f:]).abs())
    assert ((out - torch_out).abs() <= bound).all()


def test_gelu_tanh_mul_rejects_odd_width(ops):
    with pytest.raises(RuntimeError, match="even"):
        ops.gelu_tanh_mul(torch.ones(2, 5))


def test_gelu_tanh_mul_keeps_nan_and_infinity(ops):
    gate_up = torch.tensor([[float("nan"), float("inf"), 1.0, 1.0]])
    out = ops.gelu_tanh_mul(gate_up)
    assert out[0, 0].isnan() and out[0, 1] == float("inf")


# ---------------------------------------------------------------------------------------
# RoPE + KV write
# ---------------------------------------------------------------------------------------
def _rope_tables(num_positions: int, d: int, theta: float = 10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(num_positions, dtype=torch.float64), inv_freq)
    return freqs.cos().float(), freqs.sin().float()


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, D); cos/sin (N, D/2): out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin."""
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[:, None], sin.double()[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).float()


@pytest.mark.parametrize("n", [1, 3, 16, 64])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (6, 2, 128), (2, 1, 6)])
def test_rope_kv_write(ops, n, hq, hkv, d):
    g = torch.Generator().manual_seed(n * 7 + d)
    num_slots, num_positions = 200, 4096
    cos, sin = _rope_tables(num_positions, d)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g)
    positions = torch.randint(0, num_positions, (n,), generator=g)
    slots = torch.randperm(num_slots, generator=g)[:n]
    cache = torch.randn(num_slots, 2, hkv, d, generator=g)
    before = cache.clone()
    q = ops.rope_kv_write(qkv, positions, cos, sin, cache, slots, hq, hkv)

    heads = qkv.view(n, hq + 2 * hkv, d)
    c, s = cos[positions], sin[positions]
    assert q.shape == (n, hq, d) and q.is_contiguous()
    torch.testing.assert_close(q, _rotate_ref(heads[:, :hq], c, s), **TOL)
    torch.testing.assert_close(cache[slots, 0], _rotate_ref(heads[:, hq : hq + hkv], c, s), **TOL)
    assert torch.equal(cache[slots, 1], heads[:, hq + hkv :])  # v is copied, not rotated
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(cache[untouched], before[untouched])


def test_rope_kv_write_matches_the_model(ops):
    """The same rotation as models/llama.py's RotaryEmbedding + apply_rotary."""
    from textmill.models.llama import RotaryEmbedding, apply_rotary

    hq, hkv, d, n = 9, 3, 64, 5
    rotary = RotaryEmbedding(d, 512, 100000.0)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g)
    positions = torch.tensor([0, 1, 17, 300, 511])
    cache = torch.zeros(8, 2, hkv, d)
    cos, sin = rotary.table(positions)
    q = ops.rope_kv_write(qkv, torch.arange(n), cos, sin, cache, torch.arange(n), hq, hkv)
    cos, sin = rotary(positions)
    heads = qkv.view(n, hq + 2 * hkv, d)
    torch.testing.assert_close(q, apply_rotary(heads[:, :hq], cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache[:n, 0], apply_rotary(heads[:, hq : hq + hkv], cos, sin), rtol=1e-6, atol=1e-6)


def _qk_norm_weights(g: torch.Generator, d: int):
    """(1 + w) as Gemma 3's checkpoints make it: w small around 0, in float32."""
    return 1.0 + torch.randn(d, generator=g) * 0.3, 1.0 + torch.randn(d, generator=g) * 0.3


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (8, 4, 256), (2, 1, 6), (3, 1, 20)])
def test_rope_kv_write_with_qk_norm(ops, n, hq, hkv, d):
    """q and k of each head RMS-normalized over D, times the given weight, then rotated;
    v is still copied as is."""
    g = torch.Generator().manual_seed(n * 11 + d)
    num_slots, num_positions, eps = 50, 1024, 1e-6
    cos, sin = _rope_tables(num_positions, d)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g) * 5
    positions = torch.randint(0, num_positions, (n,), generator=g)
    slots = torch.randperm(num_slots, generator=g)[:n]
    qw, kw = _qk_norm_weights(g, d)
    cache = torch.zeros(num_slots, 2, hkv, d)
    q = ops.rope_kv_write(qkv, positions, cos, sin, cache, slots, hq, hkv, q_norm=qw, k_norm=kw, norm_eps=eps)

    heads = qkv.view(n, hq + 2 * hkv, d)
    c, s = cos[positions], sin[positions]
    q_ref = _rms_ref(heads[:, :hq].reshape(-1, d), qw, eps).view(n, hq, d)
    k_ref = _rms_ref(heads[:, hq : hq + hkv].reshape(-1, d), kw, eps).view(n, hkv, d)
    torch.testing.assert_close(q, _rotate_ref(q_ref, c, s), **TOL)
    torch.testing.assert_close(cache[slots, 0], _rotate_ref(k_ref, c, s), **TOL)
    assert torch.equal(cache[slots, 1], heads[:, hq + hkv :])


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 32), (8, 2, 64), (3, 1, 20)])
def test_rope_kv_write_with_a_norm_over_all_heads(ops, n, hq, hkv, d):
    """OLMo 2: weights of heads x D norm all of a side's heads together (one RMS over them),
    then each head is rotated as before."""
    g = torch.Generator().manual_seed(n * 7 + d)
    num_slots, num_positions, eps = 20, 256, 1e-6
    cos, sin = _rope_tables(num_positions, d)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g) * 3
    qkv[:, :d] *= 4  # one q head far louder than the rest: its own RMS is not the whole's
    positions = torch.randint(0, num_positions, (n,), generator=g)
    slots = torch.randperm(num_slots, generator=g)[:n]
    qw, kw = 1.0 + torch.randn(hq * d, generator=g) * 0.3, 1.0 + torch.randn(hkv * d, generator=g) * 0.3
    cache = torch.zeros(num_slots, 2, hkv, d)
    q = ops.rope_kv_write(qkv, positions, cos, sin, cache, slots, hq, hkv, q_norm=qw, k_norm=kw, norm_eps=eps)

    q_ref = _rms_ref(qkv[:, : hq * d], qw, eps).view(n, hq, d)
    k_ref = _rms_ref(qkv[:, hq * d : (hq + hkv) * d], kw, eps).view(n, hkv, d)
    c, s = cos[positions], sin[positions]
    torch.testing.assert_close(q, _rotate_ref(q_ref, c, s), **TOL)
    torch.testing.assert_close(cache[slots, 0], _rotate_ref(k_ref, c, s), **TOL)
    per_head = _rms_ref(qkv[:, : hq * d].reshape(-1, d), qw[:d], eps).view(n, hq, d)
    if hq > 1:
        assert not torch.allclose(q_ref, per_head, atol=1e-3)  # the two norms do differ here


def test_rope_kv_write_with_one_norm(ops):
    """Either norm may be given alone; the other side is rotated as without norms."""
    g = torch.Generator().manual_seed(4)
    hq, hkv, d, n = 4, 2, 32, 3
    cos, sin = _rope_tables(64, d)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g)
    positions, slots = torch.tensor([0, 5, 63]), torch.tensor([2, 0, 1])
    qw, kw = _qk_norm_weights(g, d)
    plain_cache, q_only_cache, k_only_cache = (torch.zeros(4, 2, hkv, d) for _ in range(3))
    plain = ops.rope_kv_write(qkv, positions, cos, sin, plain_cache, slots, hq, hkv)
    q_only = ops.rope_kv_write(qkv, positions, cos, sin, q_only_cache, slots, hq, hkv, q_norm=qw)
    k_only = ops.rope_kv_write(qkv, positions, cos, sin, k_only_cache, slots, hq, hkv, k_norm=kw)
    assert torch.equal(q_only_cache, plain_cache) and not torch.equal(q_only, plain)
    assert torch.equal(k_only, plain) and not torch.equal(k_only_cache, plain_cache)
    heads = qkv.view(n, hq + 2 * hkv, d)
    c, s = cos[positions], sin[positions]
    q_ref = _rms_ref(heads[:, :hq].reshape(-1, d), qw, 1e-6).view(n, hq, d)  # norm_eps defaults to 1e-6
    torch.testing.assert_close(q_only, _rotate_ref(q_ref, c, s), **TOL)


def test_rope_kv_write_qk_norm_matches_gemma3(ops):
    """The same float32 math as models/gemma3.py: GemmaRMSNorm (x * rsqrt(mean(x^2) + eps)
    * (1 + w)) on each head, then apply_rotary; equal to float32 rounding."""
    from textmill.models.gemma3 import GemmaRMSNorm
    from textmill.models.llama import RotaryEmbedding, apply_rotary

    hq, hkv, d, n, eps = 8, 4, 256, 6, 1e-6
    rotary = RotaryEmbedding(d, 4096, 1e6)
    g = torch.Generator().manual_seed(8)
    q_norm, k_norm = GemmaRMSNorm(d, eps).requires_grad_(False), GemmaRMSNorm(d, eps).requires_grad_(False)
    q_norm.weight.copy_(torch.randn(d, generator=g) * 0.5)
    k_norm.weight.copy_(torch.randn(d, generator=g) * 0.5)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g) * 20
    positions = torch.tensor([0, 1, 17, 300, 2047, 4095])
    cache = torch.zeros(8, 2, hkv, d)
    cos, sin = rotary.table(positions)
    q = ops.rope_kv_write(qkv, torch.arange(n), cos, sin, cache, torch.arange(n), hq, hkv,
                          q_norm=1.0 + q_norm.weight, k_norm=1.0 + k_norm.weight, norm_eps=eps)
    cos, sin = rotary(positions)
    heads = qkv.view(n, hq + 2 * hkv, d)
    torch.testing.assert_close(q, apply_rotary(q_norm(heads[:, :hq]), cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache[:n, 0], apply_rotary(k_norm(heads[:, hq : hq + hkv]), cos, sin),
                               rtol=1e-6, atol=1e-6)


def test_rope_kv_write_rejects_bad_norm_weights(ops):
    cos, sin = _rope_tables(8, 4)
    args = (torch.zeros(1, 3 * 4), torch.tensor([1]), cos, sin, torch.zeros(2, 2, 1, 4), torch.tensor([0]), 1, 1)
    with pytest.raises(RuntimeError, match="q_norm: expected"):
        ops.rope_kv_write(*args, q_norm=torch.ones(5))
    with pytest.raises(RuntimeError, match="k_norm: must be float32"):
        ops.rope_kv_write(*args, k_norm=torch.ones(4, dtype=torch.float64))


def test_rope_kv_write_rejects_bad_arguments(ops):
    cos, sin = _rope_tables(8, 4)
    cache = torch.zeros(4, 2, 1, 4)
    qkv = torch.zeros(1, 3 * 4)
    ok = dict(positions=torch.tensor([7]), slot_mapping=torch.tensor([3]))

    def call(**kw):
        args = {**ok, **kw}
        return ops.rope_kv_write(qkv, args["positions"], cos, sin, cache, args["slot_mapping"], 1, 1)

    call()
    with pytest.raises(RuntimeError, match="rope table"):
        call(positions=torch.tensor([8]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        call(slot_mapping=torch.tensor([4]))
    with pytest.raises(RuntimeError, match="int64"):
        call(slot_mapping=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="qkv: expected"):
        ops.rope_kv_write(torch.zeros(1, 16), ok["positions"], cos, sin, cache, ok["slot_mapping"], 1, 1)


def test_row_kernels_agree_across_thread_counts(ops):
    """Rows are independent: 1 and 2 threads give bitwise equal results (sizes large
    enough for the kernels to go parallel)."""
    g = torch.Generator().manual_seed(9)
    x, res, w = torch.randn(300, 576, generator=g), torch.randn(300, 576, generator=g), torch.randn(576, generator=g)
    gate_up = torch.randn(300, 2 * 1536, generator=g)
    cos, sin = _rope_tables(512, 64)
    qkv = torch.randn(300, 15 * 64, generator=g)
    positions, slots = torch.randint(0, 512, (300,), generator=g), torch.randperm(400, generator=g)[:300]
    results = []
    for n in (1, 2):
        with threads(n):
            cache, r = torch.zeros(400, 2, 3, 64), res.clone()
            normed_cache = torch.zeros(400, 2, 3, 64)
            results.append((ops.rms_norm(x, w, 1e-5), ops.add_rms_norm(x, r, w, 1e-5), r, ops.silu_mul(gate_up),
                            ops.gelu_tanh_mul(gate_up), ops.rope_kv_write(qkv, positions, cos, sin, cache, slots, 9, 3),
                            cache, ops.rope_kv_write(qkv, positions, cos, sin, normed_cache, slots, 9, 3,
                                                     q_norm=w[:64], k_norm=w[64:128]), normed_cache))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------
class PagedCase:
    """A random paged cache and a batch of sequences (start, query rows) over it, with each
    sequence's blocks scattered over the pool in scrambled order."""

    def __init__(self, seqs, hq, hkv, d, block_size, seed=0, extra_blocks=3):
        g = torch.Generator().manual_seed(seed)
        self.seqs, self.hq, self.hkv, self.d, self.block_size = seqs, hq, hkv, d, block_size
        need = [math.ceil((s + r) / block_size) for s, r in seqs]
        num_blocks = sum(need) + extra_blocks
        self.cache = torch.randn(num_blocks * block_size, 2, hkv, d, generator=g)
        perm = torch.randperm(num_blocks, generator=g)
        max_blocks = max(need) + 1  # one column of padding, as the runner's tables have
        self.block_table = torch.zeros(len(seqs), max_blocks, dtype=torch.int64)
        used = 0
        for b, k in enumerate(need):
            self.block_table[b, :k] = perm[used : used + k]
            used += k
        rows = [r for _, r in seqs]
        self.query_start = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int64)
        self.seq_start = torch.tensor([s for s, _ in seqs], dtype=torch.int64)
        self.context_lens = torch.tensor([s + r for s, r in seqs], dtype=torch.int64)
        self.q = torch.randn(sum(rows), hq, d, generator=g)

    def run(self, ops, q=None, scale=None, window=0, softcap=0.0, sinks=None):
        scale = self.d**-0.5 if scale is None else scale
        return ops.paged_attention(self.q if q is None else q, self.cache, self.block_table, self.query_start,
                                   self.seq_start, self.context_lens, self.block_size, scale, window, softcap,
                                   sinks)

    def reference(self, scale=None, window=0, softcap=0.0, sinks=None):
        """Gather each sequence's context through its block table, then masked softmax
        attention in float64 with the kv heads repeated for GQA (and each head's sink logit
        in the softmax, its weight dropped)."""
        scale = self.d**-0.5 if scale is None else scale
        group = self.hq // self.hkv
        out = torch.empty_like(self.q)
        for b, (start, rows) in enumerate(self.seqs):
            if rows == 0:
                continue
            ctx = start + rows
            keys = torch.arange(ctx)
            slots = self.block_table[b, keys // self.block_size] * self.block_size + keys % self.block_size
            kv = self.cache[slots].double()  # (L, 2, Hkv, D)
            k = kv[:, 0].repeat_interleave(group, dim=1)  # (L, Hq, D)
            v = kv[:, 1].repeat_interleave(group, dim=1)
            q = self.q[self.query_start[b] : self.query_start[b + 1]].double()  # (T, Hq, D)
            scores = torch.einsum("thd,lhd->htl", q, k) * scale
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            pos = torch.arange(start, ctx)[:, None]  # (T, 1)
            visible = keys[None] <= pos
            if window > 0:
                visible &= pos - keys[None] < window
            scores = scores.masked_fill(~visible[None], float("-inf"))
            if sinks is None:
                probs = torch.softmax(scores, dim=-1)
            else:
                sink = sinks.double()[:, None, None].expand(*scores.shape[:2], 1)
                probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
            out[self.query_start[b] : self.query_start[b + 1]] = torch.einsum("htl,lhd->thd", probs, v).float()
        return out


# GQA 3, plain multi-head, GQA 3 with few heads, GQA 4 (one full block of queries that
# share each key row in the kernel), GQA 7 (a full block and a remainder of 3)
HEADS = [(9, 3), (4, 4), (6, 2), (8, 2), (14, 2)]


@pytest.mark.parametrize("num_seqs", [1, 3, 16, 64])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_paged_attention_decode(ops, num_seqs, hq, hkv):
    g = torch.Generator().manual_seed(num_seqs)
    contexts = torch.randint(1, 300, (num_seqs,), generator=g).tolist()
    case = PagedCase([(c - 1, 1) for c in contexts], hq, hkv, 64, 16, seed=num_seqs + hq)
    torch.testing.assert_close(case.run(ops), case.reference(), **TOL)


@pytest.mark.parametrize("d", [4, 20, 32, 64, 128])
@pytest.mark.parametrize("block_size", [16, 1])
def test_paged_attention_mixed_batch(ops, d, block_size):
    # decode rows, first chunks, chunks after cached tokens, and chunks that cross the
    # kernel's 256-key chunk boundary; one sequence has no rows in this step.
    seqs = [(5, 6), (13, 1), (0, 7), (2, 1), (100, 64), (250, 20), (0, 1), (40, 0), (1023, 1), (300, 33)]
    case = PagedCase(seqs, 9, 3, d, block_size, seed=d + block_size)
    torch.testing.assert_close(case.run(ops), case.reference(), **TOL)


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_paged_attention_prefill_from_zero(ops, hq, hkv):
    case = PagedCase([(0, 64)], hq, hkv, 64, 16, seed=hq)
    torch.testing.assert_close(case.run(ops), case.reference(), **TOL)


@pytest.mark.parametrize("context", [1, 2, 255, 256, 257, 1100, 2048])
def test_paged_attention_long_and_short_contexts(ops, context):
    case = PagedCase([(context - 1, 1), (max(0, context - 3), min(3, context))], 9, 3, 64, 16, seed=context)
    torch.testing.assert_close(case.run(ops), case.reference(), **TOL)


def test_paged_attention_long_prefill_chunk_with_decodes(ops):
    case = PagedCase([(1000, 512), (7, 1), (0, 300), (1500, 1)], 9, 3, 64, 16, seed=11)
    with threads(2):
        out = case.run(ops)
    torch.testing.assert_close(out, case.reference(), **TOL)
    with threads(1):
        assert torch.equal(case.run(ops), out)


@pytest.mark.parametrize("window", [1, 5, 64, 300, 5000])
def test_paged_attention_sliding_window(ops, window):
    seqs = [(5, 6), (13, 1), (0, 7), (100, 64), (700, 1), (240, 40)]
    case = PagedCase(seqs, 6, 2, 64, 16, seed=window)
    torch.testing.assert_close(case.run(ops, window=window), case.reference(window=window), **TOL)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_paged_attention_sinks(ops, nthreads):
    """gpt-oss's sink logits, one a head, in every query's softmax: decode rows long enough to be
    split into key chunks on two threads, prefill tiles, a window; sinks high and low."""
    seqs = [(5, 6), (13, 1), (0, 7), (300, 20), (1500, 1), (2047, 1)]
    case = PagedCase(seqs, 8, 2, 64, 16, seed=3)
    sinks = torch.tensor([-3.0, 0.0, 1.0, 2.5, 4.0, -1.0, 0.5, 6.0])
    for window in (0, 17):
        with threads(nthreads):
            got = case.run(ops, window=window, sinks=sinks)
        torch.testing.assert_close(got, case.reference(window=window, sinks=sinks), **TOL)
        assert (got - case.run(ops, window=window)).abs().max() > 0.01  # the sinks take their share


@pytest.mark.parametrize("softcap,window", [(30.0, 0), (5.0, 0), (50.0, 17)])
def test_paged_attention_softcap(ops, softcap, window):
    seqs = [(5, 6), (13, 1), (0, 7), (300, 20)]
    case = PagedCase(seqs, 8, 4, 128, 16, seed=int(softcap))
    case.q *= 4  # scores large enough for the cap to matter
    kw = dict(softcap=softcap, window=window, scale=0.0625)
    torch.testing.assert_close(case.run(ops, **kw), case.reference(**kw), **TOL)


@pytest.mark.parametrize("hq,hkv", [(9, 3), (8, 2), (14, 2)])
def test_paged_attention_threads_and_batch_do_not_change_a_row(ops, hq, hkv):
    """Every row is computed the same way whatever the rest of the batch and the thread
    count (the kernel splits long decodes over threads only when it has few tasks): the
    outputs are bitwise equal, which keeps seeded sampling reproducible under load."""
    seqs = [(1099, 1), (2000, 1), (37, 1), (200, 90)]
    case = PagedCase(seqs, hq, hkv, 64, 16, seed=5)
    with threads(1):
        one = case.run(ops)
    with threads(2):
        two = case.run(ops)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, case.reference(), **TOL)
    # Each sequence alone (few tasks: long contexts are split over threads) gives the same rows.
    for b, (start, rows) in enumerate(seqs):
        alone = PagedCase([(start, rows)], hq, hkv, 64, 16)
        alone.cache, alone.block_table = case.cache, case.block_table[b : b + 1]
        alone.q = case.q[case.query_start[b] : case.query_start[b + 1]].clone()
        for n in (1, 2):
            with threads(n):
                assert torch.equal(alone.run(ops), one[case.query_start[b] : case.query_start[b + 1]])


@pytest.mark.parametrize("hq,hkv,num_seqs", [(9, 3, 64), (32, 8, 16), (32, 8, 1), (4, 1, 16)])
def test_paged_attention_many_decodes_same_bits_on_one_or_two_threads(ops, hq, hkv, num_seqs):
    """With enough decode rows, two threads claim a row's kv heads together (one thread
    reads a token slot's K and V rows for every head); with few, one task at a time. Either
    way each output has the bits of the one-thread run."""
    g = torch.Generator().manual_seed(hq + num_seqs)
    contexts = torch.randint(1, 300, (num_seqs,), generator=g).tolist()
    case = PagedCase([(c - 1, 1) for c in contexts], hq, hkv, 64, 16, seed=hkv)
    with threads(1):
        one = case.run(ops)
    with threads(2):
        assert torch.equal(case.run(ops), one)
    torch.testing.assert_close(one, case.reference(), **TOL)


def test_paged_attention_empty_batch(ops):
    case = PagedCase([(3, 0)], 4, 2, 32, 16)
    assert case.run(ops).shape == (0, 4, 32)


def test_paged_attention_rejects_bad_metadata(ops):
    case = PagedCase([(5, 2), (0, 3)], 4, 2, 32, 4)

    def call(**kw):
        args = dict(q=case.q, cache=case.cache, block_table=case.block_table, query_start=case.query_start,
                    seq_start=case.seq_start, context_lens=case.context_lens, block_size=4)
        args.update(kw)
        return ops.paged_attention(args["q"], args["cache"], args["block_table"], args["query_start"],
                                   args["seq_start"], args["context_lens"], args["block_size"], 0.1, 0, 0.0)

    call()
    bad_table = case.block_table.clone()
    bad_table[0, 1] = case.cache.shape[0]  # a block id past the pool
    with pytest.raises(RuntimeError, match="outside the cache"):
        call(block_table=bad_table)
    with pytest.raises(RuntimeError, match="context_lens"):
        call(context_lens=case.context_lens + 1)
    with pytest.raises(RuntimeError, match="query_start"):
        call(query_start=torch.tensor([0, 2, 4]))
    with pytest.raises(RuntimeError, match="need"):
        call(block_table=case.block_table[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        call(q=torch.randn(5, 3, 32))
    with pytest.raises(RuntimeError, match="float32"):
        call(q=case.q.double())
    with pytest.raises(RuntimeError, match="block_size"):
        call(block_size=0)


# ---------------------------------------------------------------------------------------
# 16-bit KV cache: k and v rounded once when written, widened exactly when read
# ---------------------------------------------------------------------------------------
KV16 = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("kv_dtype", KV16)
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (2, 1, 6), (3, 1, 20), (8, 4, 256)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_kv_write_to_a_16bit_cache(ops, kv_dtype, hq, hkv, d, qk_norm):
    """The cache gets exactly torch's rounding (.to(kv_dtype)) of what a float32 cache gets,
    vector lanes and scalar tails alike (d = 6, 20: a tail in every row); q is unchanged."""
    g = torch.Generator().manual_seed(d + hq)
    n, num_slots = 16, 40
    cos, sin = _rope_tables(128, d)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g) * 3
    positions = torch.randint(0, 128, (n,), generator=g)
    slots = torch.randperm(num_slots, generator=g)[:n]
    norms = dict(zip(("q_norm", "k_norm"), _qk_norm_weights(g, d))) if qk_norm else {}
    cache32 = torch.zeros(num_slots, 2, hkv, d)
    cache16 = torch.full((num_slots, 2, hkv, d), 7.0, dtype=kv_dtype)
    q32 = ops.rope_kv_write(qkv, positions, cos, sin, cache32, slots, hq, hkv, **norms)
    q16 = ops.rope_kv_write(qkv, positions, cos, sin, cache16, slots, hq, hkv, **norms)
    assert q16.dtype == torch.float32 and torch.equal(q16, q32)
    assert torch.equal(cache16[slots], cache32[slots].to(kv_dtype))
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert (cache16[untouched] == 7.0).all()


@pytest.mark.parametrize("kv_dtype", KV16)
def test_16bit_cache_write_rounds_special_values_like_torch(ops, kv_dtype):
    """Ties to even, float16's subnormals and overflow to infinity, bfloat16's full range:
    v is stored as given, so its values reach the cache unrotated. Bitwise torch's .to(),
    NaN aside (any NaN must stay a NaN)."""
    d, hkv = 40, 1  # 40: two whole 16-lane registers and a tail
    info = torch.finfo(kv_dtype)
    ulp1 = info.eps  # spacing at 1
    special = torch.tensor([
        1 + ulp1 / 2, 1 + 3 * ulp1 / 2, -(1 + ulp1 / 2), 1 + ulp1 / 2 + ulp1 / 8,  # ties and near-ties
        info.max, -info.max, info.max * 1.001, 1e30, -1e30, 65519.0, 65520.0, 3.0e38,  # the top of the range
        info.tiny, info.tiny / 3, 6e-8, 2.9e-8, 3e-8, 1e-10, 1e-39, -1e-39, 0.0, -0.0,  # the bottom
        float("inf"), float("-inf"), 0.1, -0.1, 1 / 3, 1e4, 12345.678, -5.5e-5,
    ])
    v = torch.cat([special, torch.linspace(-3, 3, 2 * d - len(special))])
    qkv = torch.cat([torch.zeros(2, 2 * d), v.view(2, d)], dim=1)  # q and k zero: one head each
    cos, sin = _rope_tables(4, d)
    cache = torch.zeros(3, 2, hkv, d, dtype=kv_dtype)
    ops.rope_kv_write(qkv, torch.tensor([0, 1]), cos, sin, cache, torch.tensor([2, 0]), 1, 1)
    stored = cache[torch.tensor([2, 0]), 1].reshape(-1)
    assert torch.equal(stored.view(torch.int16), v.to(kv_dtype).view(torch.int16))
    nan = torch.tensor([float("nan"), -float("nan")] + [1.0] * (d - 2)).repeat(2)
    ops.rope_kv_write(torch.cat([torch.zeros(2, 2 * d), nan.view(2, d)], dim=1), torch.tensor([0, 1]), cos, sin,
                      cache, torch.tensor([2, 0]), 1, 1)
    stored = cache[torch.tensor([2, 0]), 1].reshape(-1)
    assert stored[[0, 1, d, d + 1]].isnan().all() and (stored[2:d] == 1).all()


def _cases_16bit():
    return [
        ("decode", [(c - 1, 1) for c in (1, 17, 130, 300, 1025)], 9, 3, 64, 16),
        ("mixed", [(5, 6), (13, 1), (0, 7), (100, 64), (250, 20), (40, 0), (1023, 1), (300, 33)], 9, 3, 64, 16),
        ("mha, d=128", [(0, 20), (200, 1), (31, 9)], 4, 4, 128, 16),
        ("gqa 4, d=256", [(0, 20), (300, 1), (31, 9)], 4, 1, 256, 16),
        ("gqa 7", [(0, 20), (200, 1), (31, 9)], 14, 2, 64, 16),
        ("d=20, block 1", [(5, 6), (13, 1), (270, 3)], 6, 2, 20, 1),
        ("d=4", [(3, 2), (0, 5)], 2, 1, 4, 4),
    ]


@pytest.mark.parametrize("kv_dtype", KV16)
@pytest.mark.parametrize("name,seqs,hq,hkv,d,block_size", _cases_16bit())
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (64, 0.0), (0, 20.0)])
def test_paged_attention_on_a_16bit_cache_equals_the_float32_one(ops, kv_dtype, name, seqs, hq, hkv, d, block_size,
                                                                  window, softcap):
    """Keys and values widen exactly (vector loads and scalar tails), then the float32 math
    runs unchanged: bitwise the output of a float32 cache holding the same values."""
    case = PagedCase(seqs, hq, hkv, d, block_size, seed=d + len(seqs))
    cache16 = case.cache.to(kv_dtype)
    case.cache = cache16.float()
    want = case.run(ops, window=window, softcap=softcap)
    case.cache = cache16
    assert torch.equal(case.run(ops, window=window, softcap=softcap), want)


@pytest.mark.parametrize("kv_dtype", KV16)
def test_paged_attention_16bit_threads_and_splits(ops, kv_dtype):
    """Long decodes split over threads read the 16-bit pool alike: 1 and 2 threads equal."""
    case = PagedCase([(1099, 1), (2000, 1), (200, 90)], 9, 3, 64, 16, seed=6)
    case.cache = case.cache.to(kv_dtype)
    with threads(1):
        one = case.run(ops)
    with threads(2):
        assert torch.equal(case.run(ops), one)


# ---------------------------------------------------------------------------------------
# int8 pools: rows of D codes and a float32 scale (the row's last 4 bytes)
# ---------------------------------------------------------------------------------------
def dequantize_int8_rows(rows: torch.Tensor) -> torch.Tensor:
    codes, scale = rows[..., :-4], rows[..., -4:].contiguous().view(torch.float32)
    return codes.float() * scale


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (2, 1, 6), (3, 1, 20), (8, 4, 256)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_kv_write_to_an_int8_cache(ops, hq, hkv, d, qk_norm):
    """Each k row (rotated, normed) and v row is stored as the Python rule quantizes what a
    float32 cache gets, codes and scale bitwise; q is unchanged; other slots untouched."""
    g = torch.Generator().manual_seed(d + hq + 1)
    n, num_slots = 16, 40
    cos, sin = _rope_tables(128, d)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g) * 3
    qkv[3] = 0.0  # an all-zero row: scale 0, codes 0
    positions = torch.randint(0, 128, (n,), generator=g)
    slots = torch.randperm(num_slots, generator=g)[:n]
    norms = dict(zip(("q_norm", "k_norm"), _qk_norm_weights(g, d))) if qk_norm else {}
    cache32 = torch.zeros(num_slots, 2, hkv, d)
    cache8 = torch.full((num_slots, 2, hkv, d + 4), 7, dtype=torch.int8)
    q32 = ops.rope_kv_write(qkv, positions, cos, sin, cache32, slots, hq, hkv, **norms)
    q8 = ops.rope_kv_write(qkv, positions, cos, sin, cache8, slots, hq, hkv, **norms)
    assert torch.equal(q8, q32)
    assert torch.equal(cache8[slots], quantize_int8_rows(cache32[slots]))
    assert (cache8[slots[3]] == 0).all()
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert (cache8[untouched] == 7).all()
    # the stored rows are within half a step of what a float32 cache holds
    err = (dequantize_int8_rows(cache8[slots]) - cache32[slots]).abs()
    step = cache32[slots].abs().amax(-1, keepdim=True) / 127
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_write_kv_stores_int8_rows_as_rope_kv_write_does(ops):
    """The two writers of an int8 pool (kv_cache.write_kv, for the models whose forward is not
    fused, and the kernels' rope_kv_write) store the same bytes for the same values: v goes
    through rope_kv_write unrotated, so the v halves must match bitwise."""
    g = torch.Generator().manual_seed(11)
    n, hq, hkv, d, num_slots = 12, 4, 2, 20, 30  # d = 20: a vector tail in every row
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g) * 5
    qkv[4, (hq + hkv) * d:] = 0.0  # one token's v rows all zero
    slots = torch.randperm(num_slots, generator=g)[:n]
    cos, sin = _rope_tables(16, d)
    by_kernel = torch.zeros(num_slots, 2, hkv, d + 4, dtype=torch.int8)
    ops.rope_kv_write(qkv, torch.arange(n), cos, sin, by_kernel, slots, hq, hkv)
    by_torch = torch.zeros_like(by_kernel)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    write_kv(by_torch, slots, torch.randn(n, hkv, d, generator=g), v)
    assert torch.equal(by_torch[:, 1], by_kernel[:, 1])


@pytest.mark.parametrize("name,seqs,hq,hkv,d,block_size", _cases_16bit())
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (64, 0.0), (0, 20.0)])
def test_paged_attention_on_an_int8_cache_equals_the_float32_one(ops, name, seqs, hq, hkv, d, block_size, window,
                                                                 softcap):
    """The codes widen exactly and the scales multiply scores and probabilities: the output
    is a float32 pool's holding the dequantized values, to float32 rounding."""
    case = PagedCase(seqs, hq, hkv, d, block_size, seed=d + len(seqs) + 5)
    cache8 = quantize_int8_rows(case.cache)
    case.cache = dequantize_int8_rows(cache8)
    want = case.run(ops, window=window, softcap=softcap)
    case.cache = cache8
    torch.testing.assert_close(case.run(ops, window=window, softcap=softcap), want, rtol=2e-5, atol=2e-6)


def test_paged_attention_int8_rows_do_not_depend_on_batch_or_threads(ops):
    """A decode row read inline and the same row inside a prefill tile (widened keys) give
    the same bits; so do 1 and 2 threads and long decodes split into key chunks."""
    d, hq, hkv = 64, 9, 3
    case = PagedCase([(1099, 1), (2000, 1), (200, 90)], hq, hkv, d, 16, seed=8)
    case.cache = quantize_int8_rows(case.cache)
    with threads(1):
        one = case.run(ops)
    with threads(2):
        assert torch.equal(case.run(ops), one)
    # the prefill's last row (position 289), alone as a decode row over the same cache
    alone = PagedCase([(289, 1)], hq, hkv, d, 16, seed=8)
    alone.cache, alone.block_table = case.cache, case.block_table[2:3]
    alone.q = case.q[-1:].clone()
    assert torch.equal(alone.run(ops)[0], one[-1])


def test_int8_attention_error_is_small_against_float32(ops):
    """What the int8 pool costs in accuracy on Gaussian keys and values: about half a code
    step (max|row| / 254, ~1% of a unit Gaussian's row) per value read, averaged down by the
    softmax; relative RMS error under 2% (docs/performance.md has the perplexity)."""
    case = PagedCase([(c - 1, 1) for c in (17, 130, 300, 1025)], 9, 3, 64, 16, seed=3)
    exact = case.run(ops)
    case.cache = quantize_int8_rows(case.cache)
    rel = ((case.run(ops) - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.02, rel


def test_kv_kernels_reject_other_cache_dtypes(ops):
    case = PagedCase([(3, 2)], 4, 2, 32, 4)
    with pytest.raises(RuntimeError, match="kv_cache: must be float32, float16, bfloat16 or int8"):
        ops.paged_attention(case.q, case.cache.double(), case.block_table, case.query_start, case.seq_start,
                            case.context_lens, 4, 0.1, 0, 0.0)
    with pytest.raises(RuntimeError, match=r"kv_cache: expected \(S, 2, Hkv, 36\)"):  # int8 rows need the scale
        ops.paged_attention(case.q, case.cache.to(torch.int8), case.block_table, case.query_start, case.seq_start,
                            case.context_lens, 4, 0.1, 0, 0.0)
    cos, sin = _rope_tables(8, 4)
    with pytest.raises(RuntimeError, match="kv_cache: must be float32, float16, bfloat16 or int8"):
        ops.rope_kv_write(torch.zeros(1, 12), torch.tensor([1]), cos, sin, torch.zeros(2, 2, 1, 4, dtype=torch.int16),
                          torch.tensor([0]), 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("variant,flags", [
    ("avx2", ["-mno-avx512f"]),  # 8-wide registers: two queries share a key row, not four
    ("baseline-x86-64", ["-march=x86-64", "-mtune=generic"]),  # the scalar fallback
])
def test_other_builds_of_paged_attention(ops, variant, flags):
    """The paths this machine does not run, built here with the ISA extensions switched off
    (after -march=native): each against the float64 reference, with rows that do not
    depend on the batch or the thread count, on float32, 16-bit and int8 pools."""
    from textmill.kernels.build import build_variant

    if platform.machine() != "x86_64" or not shutil.which("c++"):
        pytest.skip("these variants are x86-64 builds")
    other = build_variant("layer", variant, flags)
    seqs = [(1099, 1), (37, 1), (0, 7), (200, 40), (300, 1)]
    for hq, hkv, d in [(9, 3, 64), (8, 2, 64), (14, 2, 20), (4, 1, 256)]:
        case = PagedCase(seqs, hq, hkv, d, 16, seed=hq + d)
        for kv_dtype in (torch.float32, *KV16):
            case.cache = case.cache.to(kv_dtype)
            with threads(2):
                out = case.run(other)
            torch.testing.assert_close(out, case.reference(), **TOL)
            with threads(1):
                assert torch.equal(case.run(other), out)
            start, rows = seqs[3]
            alone = PagedCase([(start, rows)], hq, hkv, d, 16)
            alone.cache, alone.block_table = case.cache, case.block_table[3:4]
            alone.q = case.q[case.query_start[3] : case.query_start[4]].clone()
            assert torch.equal(alone.run(other), out[case.query_start[3] : case.query_start[4]])
        case.cache = quantize_int8_rows(case.cache.float())  # an int8 pool: as this machine's build
        with threads(2):
            out = case.run(other)
        torch.testing.assert_close(out, case.run(ops), rtol=2e-5, atol=2e-6)
        alone = PagedCase([seqs[3]], hq, hkv, d, 16)
        alone.cache, alone.block_table = case.cache, case.block_table[3:4]
        alone.q = case.q[case.query_start[3] : case.query_start[4]].clone()
        assert torch.equal(alone.run(other), out[case.query_start[3] : case.query_start[4]])
    # The greedy argmax's vector-free path (and AVX2's): first maximum, first NaN, as torch.max.
    g = torch.Generator().manual_seed(3)
    for width in (1, 17, 16_385, 40_000):
        rows = torch.randn(4, width, generator=g).round(decimals=1)
        rows[1] = rows[1].max()
        if width > 20:
            rows[2, [width // 3, width - 2]] = float("nan")
        rows[3] = float("-inf")
        with threads(2):
            assert torch.equal(other.argmax_rows(rows), torch.max(rows, dim=-1).indices), width
