"""QLinear and its C++ kernels (kernels/csrc/quant.cpp) against plain torch references.

Three references, from strict to loose:
1. The kernel's own arithmetic restated in torch: activations quantized per group of 32
   the same way (must match exactly), integer block dot products in float64 (exact),
   the same scale products. The kernel sums the blocks in float32, so it agrees to float32
   rounding: |y - ref| <= 1e-5 * the sum of the magnitudes of the terms it adds up.
   The scalar and SIMD paths do the same float32 operations in the same order: they must
   agree bit for bit, as must 1 and 2 threads.
2. F.linear(x, dequantized W): differs only by the activation rounding, |x - e*a| <= e/2
   per element, so |y - y_deq| <= sum_b (e_b / 2) * sum_{k in b} |W[n, k]|, plus float32
   rounding of both sums.
3. GGUF: weights that are Q4_1 / Q8_0 values (gguf's own quantizer, or d*q + m built here)
   pack and unpack to exactly themselves (Q5_x in q5, Q6_K in q6: tests/unit/test_group_codes.py).
q6 has a scale per 16 weights (d of shape (N, K/16)) and codes standing for code - 32; the
references below take it as groups of 16 with codes - 32 and no min.
"""
from __future__ import annotations

import itertools
import platform
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from textmill.kernels import load
from textmill.runner.qlinear import QLinear, available, reuse_output, supports
from textmill.runner.row_buffer import RowBuffer

G = 32
MS = (1, 2, 3, 5, 16, 17, 64, 300)
KS = (32, 96, 576, 1536)  # kb = 1 and 3: a lone last block after pairs (codes_at)
NS = (1, 7, 64, 960, 3072)


@pytest.fixture(scope="module")
def ext():
    m = load("quant")
    if m is None:
        # CI (x86-64 Linux with a compiler) must build it: a silent skip would hide a broken build.
        if platform.system() == "Linux" and platform.machine() == "x86_64" and (shutil.which("c++") or shutil.which("g++")):
            pytest.fail("the quant C++ extension did not build; see the textmill.kernels warning in the log")
        pytest.skip("no C++ toolchain for the kernels here")
    return m


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def acts(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    # A heavy-ish tail, like transformer activations.
    return torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, k, generator=g))


MODES = ("q4", "q8", "q6", "q5", "iq4", "mxfp4", "q3", "iq2", "q2", "q4k", "q5k", "q6k")


def pack(ext, mode: str, w: torch.Tensor) -> torch.Tensor:
    return getattr(ext, f"{mode}_pack")(w)


def linear(ext, mode, x, packed, n, bias=None, impl=0):
    return getattr(ext, f"{mode}_linear")(x, packed, n, bias, impl)


def unpack(ext, mode, packed, n, k):
    """-> codes (N, K) float, d (N, KB), m (N, KB) (zeros for q8); q6 (q3): codes - 32 (- 4)
    and d, m (N, 2 KB), one per 16 weights; iq2: its table values, d and m as q6's; q2: its
    codes, d and m (N, 2 KB)."""
    if mode in ("q4", "q5", "q2", "q4k", "q5k"):
        codes, d, m = getattr(ext, f"{mode}_unpack")(packed, n, k)
    elif mode in ("q6", "q3", "iq2", "q6k"):
        codes, d = getattr(ext, f"{mode}_unpack")(packed, n, k)
        return codes.float() - {"q6": 32, "q6k": 32, "q3": 4, "iq2": 0}[mode], d, torch.zeros_like(d)
    else:  # q8, or iq4's and mxfp4's table values
        codes, d = getattr(ext, f"{mode}_unpack")(packed, n, k)
        m = torch.zeros_like(d)
    return codes.float(), d, m


def dequant(codes, d, m):
    n, k = codes.shape
    return (codes.view(n, d.shape[1], -1) * d[..., None] + m[..., None]).view(n, k)


def quantize_acts_ref(x: torch.Tensor):
    """The kernel's activation quantization, restated: per row and group of 32,
    e = max|x| / 127, a = round-half-even(x * (1 / e)), s = e * sum(a); 1 / e taken as 0
    where it is not finite (e = 0, or e subnormal)."""
    mm, k = x.shape
    xb = x.float().view(mm, k // G, G)
    e = xb.abs().amax(-1) / 127
    inv = 1 / e
    inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
    a = torch.round(xb * inv[..., None]).clamp(-127, 127)
    s = e * a.sum(-1)
    return a.view(mm, k), e, s


def kernel_math_ref(x, codes, d, m, bias):
    """float64 result of the kernel's math, and the magnitude sum_b |term_b| it is summed from."""
    a, e, s = quantize_acts_ref(x)
    mm, k = x.shape
    n = codes.shape[0]
    g = k // d.shape[1]  # weights per scale: 32, or q6's 16
    isum = torch.einsum("mbg,nbg->mnb", a.double().view(mm, -1, g), codes.double().view(n, -1, g))
    de = (d[None, :, :] * e.repeat_interleave(G // g, dim=1)[:, None, :]).double()  # the kernel's float32 product
    t1 = isum * de
    # the min's term: m times e x the activations' sum over the min's group (q2's: 16)
    s_g = s if g == G else e.repeat_interleave(G // g, dim=1) * a.view(mm, -1, g).sum(-1)
    t2 = m.double()[None] * s_g.double()[:, None, :]
    ref, scale = (t1 + t2).sum(-1), (t1.abs() + t2.abs()).sum(-1)
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    return ref, scale


def shapes(max_work: float):
    """(M, K, N) from the product of the lists, bounded by M*N*K/32 (the reference's size)."""
    return [(mm, k, n) for mm, k, n in itertools.product(MS, KS, NS) if mm * n * k / G <= max_work]


# --- activations ------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [0, 1], ids=["simd", "scalar"])
# groups of 32: 3 x 16 (12 x 4 on AVX2); 16 and 3 more (4 x 4 and 3); 16, 4 and 3 (5 x 4 and 3);
# 4 x 16 in one run of the 512-bit path's, then 16, 4 and 3 (21 x 4 and 3); 3 alone
@pytest.mark.parametrize("k", [1536, 608, 736, 2784, 96])
def test_activation_quantization_matches_reference(ext, impl, k):
    """The 512-bit path quantizes sixteen groups at a time (up to four runs of 16 together),
    then four, then the rest one by one (AVX2: four, then one): every path gives the
    reference's codes, scales and half sums."""
    x = acts(37, k, 0)
    x[3] = 0  # a zero row: scale 0, codes 0
    x[5, 64:96] = 0  # one zero group
    x[7] *= 1e-20  # tiny, still normal floats
    x[9] *= 1e20
    # A group whose scale is subnormal (its largest |x| below ~3.7e-37): 1 / e overflows,
    # and x * inf would turn its zeros into NaN; the codes are all 0 instead.
    x[11, :32] = 0
    x[11, 0], x[11, 5] = 1e-37, -5e-38
    a, e, s, half = ext.quantize_act(x, impl)
    ra, re, rs = quantize_acts_ref(x)
    assert torch.equal(e, re)
    assert torch.equal(a.float(), ra)
    assert torch.equal(s, rs)
    # HalfSums per block: -32 x each half's code sum (int32), then e x each sum (float32)
    sums = ra.view(37, k // 32, 2, 16).sum(-1)  # exact: integers below 2**24
    half = half.view(37, k // 32, 16)
    assert torch.equal(half[..., :8].contiguous().view(torch.int32), (-32 * sums).to(torch.int32))
    assert torch.equal(half[..., 8:].contiguous().view(torch.float32), re[..., None] * sums)
    assert a.abs().max() <= 127
    assert 0 < e[11, 0] < torch.finfo(torch.float32).tiny and not a[11, :32].any()


# --- the kernel's own math --------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mm,k,n", shapes(3e6))
def test_matches_integer_reference(ext, mode, mm, k, n):
    w, x = weights(n, k, mm + k + n), acts(mm, k, mm * k + n)
    bias = torch.randn(n) if (mm + n) % 2 else None
    packed = pack(ext, mode, w)
    y = linear(ext, mode, x, packed, n, bias)
    assert y.shape == (mm, n) and y.dtype == torch.float32
    ref, scale = kernel_math_ref(x, *unpack(ext, mode, packed, n, k), bias)
    err = (y.double() - ref).abs()
    assert (err <= 1e-5 * scale + 1e-30).all(), f"max err/scale {(err / scale.clamp(min=1e-30)).max():.3g}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mm,k,n", shapes(4e6) + [(300, 1536, 960), (64, 576, 3072)])
def test_simd_equals_scalar_bitwise(ext, mode, mm, k, n):
    w, x = weights(n, k, 7 * mm + k + n), acts(mm, k, mm + 3 * n)
    bias = torch.randn(n) if (mm + k) % 3 else None
    packed = pack(ext, mode, w)
    y = linear(ext, mode, x, packed, n, bias, impl=0)
    assert torch.equal(y, linear(ext, mode, x, packed, n, bias, impl=1))


@pytest.mark.parametrize("mode", MODES)
def test_register_tiles_and_threads_agree(ext, mode, threads):
    """Every split of the rows into register tiles (1..4 rows), and 1 or 2 threads, gives
    the same bits: each output is one float32 sum in a fixed order."""
    mm, k, n = 67, 576, 200
    w, x, bias = weights(n, k, 1), acts(mm, k, 2), torch.randn(n)
    packed = pack(ext, mode, w)
    fn = getattr(ext, f"{mode}_linear")
    torch.set_num_threads(1)
    base = fn(x, packed, n, bias, 0, 0)
    for mr in (1, 2, 3, 4):
        assert torch.equal(fn(x, packed, n, bias, 0, mr), base)
    torch.set_num_threads(2)
    assert torch.equal(fn(x, packed, n, bias, 0, 0), base)
    big = acts(300, 1536, 5)
    pb = pack(ext, mode, weights(960, 1536, 5))
    two = fn(big, pb, 960, None, 0, 0)
    torch.set_num_threads(1)
    assert torch.equal(fn(big, pb, 960, None, 0, 0), two)


def assert_orders_give_scalar_bits(ext, mode, mm, k, n, seed, mr_maxes=(0, 4), impls=(0, 2, 3)):
    """The SIMD paths on one and two threads (mr_max 0: the kernel's own order for the
    batch; impl 0 the order this CPU takes, 2 with the panel order, 3 without it, whichever
    this CPU prefers) give the scalar path's bits for an (mm, k) x (n, k) product."""
    w, x, bias = weights(n, k, seed), acts(mm, k, seed + 1), torch.randn(n)
    packed = pack(ext, mode, w)
    fn = getattr(ext, f"{mode}_linear")
    scalar = fn(x, packed, n, bias, 1, 0)
    for t in (1, 2):
        torch.set_num_threads(t)
        for impl in impls:
            for mr_max in mr_maxes if impl == 0 else (0,):  # row groups (mr_max > 0) take no panel
                assert torch.equal(fn(x, packed, n, bias, impl, mr_max), scalar), (t, impl, mr_max)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mm", [2, 5, 16, 33, 128, 129, 300])
# n = 70: a lone partial tile after pairs; 56: a pair whose second tile is partial
@pytest.mark.parametrize("k,n", [(640, 70), (5632, 70), (640, 56)])
def test_batch_orders_agree(ext, mode, mm, k, n, threads):
    """Batches of 2+ rows run block-major on the 512-bit path (one pass over each tile,
    every row per block), in passes of up to 128 rows (fewer where K is long: 46 at
    K = 5632, 48 for Q8), tile pairs of passes of 16-48 rows and up (by form) on the panel
    order (four rows at a time over the pair's unpacked blocks) where the CPU gains by it
    and where a test asks (impl=2), as register-tile requests (mr_max) run by row groups:
    every order gives the bits of the scalar path."""
    assert_orders_give_scalar_bits(ext, mode, mm, k, n, seed=3)


def test_panel_order_where_it_was_measured_to_pay(ext):
    """Batches take the panel order except on Zen 4 (AMD family 25, which also holds Zen 3,
    whose AVX2 path has no panel), where block-major measured faster at every size
    (quant.cpp, panel_pays): the kernels' cpuid reading agrees with the kernel's
    /proc/cpuinfo."""
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    family25 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    assert ext.panel_pays() is (not family25)


@pytest.mark.parametrize("mode", MODES)
def test_panel_pieces_agree(ext, mode, threads):
    """Past 384 blocks (K = 12288) the 512-bit panel order unpacks a tile pair's blocks in
    pieces, the rows' sums carried from one piece to the next: K = 12800 is two pieces
    (384 + 16 blocks), in passes of 20 and 17 rows (four-row groups and a lone row; Q4's
    and Q6's forms, on the panel from 24 rows, in passes of 24 and 13, the second
    block-major; Q8, from 48, 53 rows in passes of 48 and 5), and gives the scalar path's
    bits."""
    rows = 53 if mode == "q8" else 37
    assert_orders_give_scalar_bits(ext, mode, rows, 12800, 40, seed=6, mr_maxes=(0,), impls=(2,))


# --- against F.linear on the dequantized weights -----------------------------------------

def assert_within_activation_rounding(x, w_deq, y, bias=None):
    mm, k = x.shape
    ref = F.linear(x.double(), w_deq.double(), None if bias is None else bias.double())
    _, e, _ = quantize_acts_ref(x)
    wabs = w_deq.double().abs().view(w_deq.shape[0], -1, G).sum(-1)  # (N, KB)
    bound = (e.double() / 2) @ wabs.T  # half a step per element, times |w|
    # float32 rounding of the kernel's sum, relative to the magnitudes summed
    slack = 1e-5 * (x.double().abs() @ w_deq.double().abs().T + (0 if bias is None else bias.double().abs()))
    err = (y.double() - ref).abs()
    assert (err <= bound + slack).all(), f"worst excess {(err - bound - slack).max():.3g}"
    return err, bound


@pytest.mark.parametrize("mode", ["q4k", "q5k", "q6k"])
@pytest.mark.parametrize("size", [1e-2, 1e-4, 1e-6])
def test_super_block_packers_keep_small_weights_within_half_a_step(ext, mode, size):
    """The float packers of the super-block forms store D (and Dm) as halves: for small
    weights those are subnormal, and a D rounded down would leave the largest group past
    its 6-bit (Q6K: 8-bit) scale's reach. Every weight stays within half its step."""
    n, k = 48, 512
    w = weights(n, k, 5) * size / 0.05
    codes, d, m = unpack(ext, mode, getattr(ext, f"{mode}_pack")(w), n, k)
    w_err = (dequant(codes, d, m) - w).abs().view(n, d.shape[1], -1)
    assert (d > 0).all()
    assert (w_err <= d[..., None] * 0.5 * (1 + 1e-3) + 1e-12).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mm,k,n", [(1, 576, 960), (5, 1536, 576), (17, 32, 3072), (300, 1536, 960), (64, 64, 7)])
def test_close_to_float_linear_on_dequantized_weights(ext, mode, mm, k, n):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(weights(n, k, k + n))
    q = QLinear.from_linear(lin, mode)
    x = acts(mm, k, n)
    y = q(x)
    err, bound = assert_within_activation_rounding(x, q.dequantized_weight(), y, lin.bias.detach())
    # And the bound is not vacuous: the error uses a fair part of it somewhere.
    assert err.max() > 0.01 * bound.max()
    # The weight rounding itself: half a step per weight (iq4, in units of d: at most 14.1, a
    # value of up to 127 (and d's rounding to a half, 127 * 2^-11) on a group whose largest
    # magnitude is negative against the table's top, 113; its widest gap, 24, rounds by 12;
    # q3: a whole step, where a half's largest magnitude, at code -4, has an opposite as
    # large, which stops at +3; iq2, in units of d: half its widest gap, 43 - 25; mxfp4, in
    # units of d: up to 4, where a group's largest magnitude, 8..16, clips at 12).
    step = unpack(ext, mode, q.packed, n, k)[1].abs() * {"iq4": 28.2, "q3": 2.01, "iq2": 18.02,
                                                         "mxfp4": 8.0}.get(mode, 1)
    w_err = (q.dequantized_weight() - lin.weight.detach()).abs().view(n, step.shape[1], -1)
    assert (w_err <= step[..., None] * 0.5 * (1 + 1e-3) + 1e-7).all()


@pytest.mark.parametrize("mode", MODES)
def test_zero_rows_give_the_bias_and_magnitudes_scale(ext, mode):
    k, n = 576, 64
    w, bias = weights(n, k, 3), torch.randn(n)
    packed = pack(ext, mode, w)
    x = acts(6, k, 3)
    x[1] = 0
    y = linear(ext, mode, x, packed, n, bias)
    assert torch.equal(y[1], bias)
    assert torch.equal(linear(ext, mode, torch.zeros(3, k), packed, n), torch.zeros(3, n))
    # Per-group scales: a row at 1e-30 or 1e30 gives the same codes, so the same result
    # scaled by exactly that power of two.
    base = linear(ext, mode, x, packed, n)
    for f in (2.0**-100, 2.0**100):
        assert torch.equal(linear(ext, mode, x * f, packed, n), base * f)
    # Groups of very different magnitude in one row: each keeps its own precision.
    x2 = acts(4, k, 4)
    x2[:, :G] *= 1e6
    x2[:, G:2 * G] *= 1e-6
    codes, d, m = unpack(ext, mode, packed, n, k)
    assert_within_activation_rounding(x2, dequant(codes, d, m), linear(ext, mode, x2, packed, n))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_computes_in_float32(ext, dtype):
    k, n = 576, 96
    packed = pack(ext, "q4", weights(n, k, 9))
    x = acts(3, k, 9).to(dtype)
    y = ext.q4_linear(x, packed, n)
    assert y.dtype == dtype
    assert torch.equal(y, ext.q4_linear(x.float(), packed, n).to(dtype))


# --- GGUF weights requantize exactly ----------------------------------------------------

def test_q4_of_q4_1_grid_is_exact(ext):
    n, k = 24, 256
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (n, k), generator=g).float()
    codes[:, 0::G], codes[:, 1::G] = 0, 15  # every group spans 0..15, as Q4_1's quantizer makes it
    d = (torch.rand(n, k // G, generator=g) * 0.05 + 1e-3).half().float()  # halves, as in GGUF
    m = (torch.randn(n, k // G, generator=g) * 0.1).half().float()
    w = dequant(codes, d, m)
    c2, d2, m2 = unpack(ext, "q4", ext.q4_pack(w), n, k)
    assert torch.equal(c2, codes) and torch.equal(d2, d) and torch.equal(m2, m)
    assert torch.equal(dequant(c2, d2, m2), w)


@pytest.mark.parametrize("qtype_name,mode", [("Q4_1", "q4"), ("Q8_0", "q8")])
def test_gguf_quantized_weights_requantize_exactly(ext, qtype_name, mode):
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as T

    from textmill.loader.dequant import dequantize

    qtype = getattr(T, qtype_name)
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((40, 576)) * 0.05).astype(np.float32)
    w[3, :G] = 0.25  # a constant group: d = 0
    stored = torch.from_numpy(dequantize(quants.quantize(w, qtype), qtype).reshape(w.shape))
    n, k = stored.shape
    packed = ext.q4_pack(stored) if mode == "q4" else ext.q8_pack(stored)
    assert torch.equal(dequant(*unpack(ext, mode, packed, n, k)), stored)


# --- the module ---------------------------------------------------------------------------

def test_module_api(ext):
    assert available()
    lin = nn.Linear(64, 10)
    for mode in MODES:
        assert supports(lin, mode)
        q = QLinear.from_linear(lin, mode)
        assert (q.in_features, q.out_features) == (64, 10)
        assert f"mode={mode}" in repr(q) and "in_features=64" in repr(q)
        x = torch.randn(2, 3, 64)
        y = q(x)
        assert y.shape == (2, 3, 10)
        assert torch.equal(y.view(6, 10), q(x.view(6, 64)))
        assert torch.equal(y.view(6, 10), linear(ext, mode, x.view(6, 64), q.packed, 10, q.bias))
    nobias = QLinear.from_linear(nn.Linear(32, 5, bias=False), "q4")
    assert nobias.bias is None and nobias(torch.zeros(1, 32)).abs().max() == 0
    assert not supports(nn.Linear(48, 10), "q4")
    big = nn.Linear(32, 2)
    with torch.no_grad():
        big.weight[0, 0] = 1e6
    assert not supports(big, "q4")
    with pytest.raises(ValueError):
        QLinear.from_linear(nn.Linear(48, 10), "q8")
    with pytest.raises(ValueError):
        supports(lin, "int3")


def test_bad_shapes_are_refused(ext):
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ext.q4_pack(torch.randn(4, 48))
    packed = ext.q8_pack(torch.randn(8, 64))
    with pytest.raises(RuntimeError):
        ext.q8_linear(torch.randn(2, 32), packed, 8)  # K does not match the packing
    with pytest.raises(RuntimeError):
        ext.q8_linear(torch.randn(2, 64), packed, 17)  # N needs a second tile of 16 rows
    assert ext.q8_linear(torch.randn(0, 64), packed, 8).shape == (0, 8)


def test_out_receives_the_result_bit_for_bit(ext):
    packed = ext.q8_pack(torch.randn(48, 64))
    x = torch.randn(5, 64)
    fresh = ext.q8_linear(x, packed, 48)
    out = torch.full((5, 48), float("nan"))
    y = ext.q8_linear(x, packed, 48, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.equal(out, fresh)
    for bad in (torch.empty(5, 47), torch.empty(4, 48), torch.empty(48, 5).t(), torch.empty(5, 48, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="out must be"):
            ext.q8_linear(x, packed, 48, out=bad)
    with pytest.raises(RuntimeError, match="only for float32 x"):
        ext.q8_linear(x.to(torch.bfloat16), packed, 48, out=out)


def test_output_buffer_is_reused_and_capped(ext):
    """The runner's LM head writes each step's logits into one buffer (RowBuffer): the
    same memory from call to call, grown to the most rows asked for, the same bits as a
    fresh result; past max_bytes a call allocates as before."""
    head = QLinear.from_linear(nn.Linear(64, 96), "q4")
    assert not reuse_output(nn.Linear(64, 96), max_bytes=1 << 20) and head.output is None
    assert reuse_output(head, max_bytes=8 * 96 * 4)
    x = torch.randn(8, 64)
    fresh = QLinear.from_linear(nn.Linear(64, 96), "q4")
    fresh.load_state_dict(head.state_dict())
    first = head(x[:3])
    assert torch.equal(first, fresh(x[:3]))
    again = head(x[3:6])
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, fresh(x[3:6]))
    grown = head(x)  # 8 rows: the buffer grows to them, still within max_bytes
    assert torch.equal(grown, fresh(x)) and head.output.buffer.shape == (8, 96)
    assert head(x[:2]).data_ptr() == grown.data_ptr()
    past = head(torch.cat([x, x[:1]]))  # 9 rows: more than max_bytes, a tensor of its own
    assert past.data_ptr() != grown.data_ptr() and torch.equal(past, fresh(torch.cat([x, x[:1]])))
    assert head(x.to(torch.bfloat16)).dtype == torch.bfloat16  # other dtypes never use it
    assert RowBuffer(96, max_bytes=0).rows(1) is None and RowBuffer(96).rows(1000).shape == (1000, 96)


# Parts as real files mix them: a Q4_K_M file's Q4_K q/k beside a Q6_K v; Q8 beside others
# (its 512-bit kernels read flipped activations, the others the codes as they are); Q8 alone
# twice; three forms; widths that leave a last tile half padding.
PART_MIXES = [("q4k", "q6k"), ("q8", "q4k"), ("q6k", "q8", "q5"), ("q8", "q8"), ("q4", "iq4", "q2"),
              ("mxfp4", "q8")]


@pytest.mark.parametrize("forms", PART_MIXES, ids="+".join)
def test_parts_in_one_call_are_their_own_results_side_by_side(ext, forms, threads):
    """linear_parts computes several weights over one input in one call: each part's columns
    must be bitwise that part's own <form>_linear, on every path (SIMD, scalar, the row
    groups), at decode and prefill row counts, with and without a bias, on 1 and 2 threads."""
    k, widths = 576, (96, 40, 24)
    parts = [(form, pack(ext, form, weights(n, k, i)), n, torch.randn(n) if i == 1 else None)
             for i, (form, n) in enumerate(zip(forms, widths))]
    for nthreads, mm, (impl, mr_max) in itertools.product((1, 2), (1, 3, 16, 20, 64, 130, 300),
                                                          ((0, 0), (1, 0), (0, 2))):
        torch.set_num_threads(nthreads)
        x = acts(mm, k, nthreads)
        alone = torch.cat([getattr(ext, f"{form}_linear")(x, packed, n, b, impl=impl, mr_max=mr_max)
                           for form, packed, n, b in parts], dim=-1)
        together = ext.linear_parts(x, [(ext.mode_number(form), packed, n, b) for form, packed, n, b in parts],
                                    impl=impl, mr_max=mr_max)
        assert torch.equal(together, alone), (nthreads, mm, impl, mr_max)


def test_side_by_side_quantized_parts_run_as_one_call(ext, monkeypatch):
    """SideBySide of QLinears (a Q4_K_M file's q/k and v) calls the kernel once for all of
    them, not each part's forward, and gives the parts' results side by side; 3-D input and
    half precision as QLinear takes them. Any other part (a float nn.Linear) goes part by part."""
    from textmill.runner.qlinear import SideBySide

    qk = QLinear.from_linear(nn.Linear(128, 64), "q4k")
    v = QLinear.from_linear(nn.Linear(128, 40), "q6k")
    both = SideBySide([qk, v])
    x = torch.randn(2, 5, 128)
    expected = torch.cat([qk(x), v(x)], dim=-1)
    half = torch.cat([qk(x.to(torch.bfloat16)), v(x.to(torch.bfloat16))], dim=-1)

    def refuse(self, x):
        raise AssertionError("a part's own forward ran")

    monkeypatch.setattr(QLinear, "forward", refuse)
    y = both(x)
    assert y.shape == (2, 5, 104) and torch.equal(y, expected)
    assert torch.equal(both(x.to(torch.bfloat16)), half)
    with pytest.raises(AssertionError, match="own forward"):
        SideBySide([qk, nn.Linear(128, 8)])(x)


def test_bad_parts_are_refused(ext):
    a, b = ext.q8_pack(torch.randn(16, 64)), ext.q4k_pack(torch.randn(16, 256))
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError):  # K of the second part does not match x
        ext.linear_parts(x, [(ext.mode_number("q8"), a, 16, None), (ext.mode_number("q4k"), b, 16, None)])
    with pytest.raises(RuntimeError, match="no form numbered"):
        ext.linear_parts(x, [(99, a, 16, None)])
    with pytest.raises(RuntimeError, match="at least one part"):
        ext.linear_parts(x, [])
    with pytest.raises(RuntimeError, match="bias must be"):
        ext.linear_parts(x, [(ext.mode_number("q8"), a, 16, torch.zeros(15))])
    assert ext.linear_parts(torch.randn(0, 64), [(ext.mode_number("q8"), a, 16, None)] * 2).shape == (0, 32)


@pytest.mark.slow
@pytest.mark.parametrize("variant,flags,isa", [
    # the 256-bit VNNI path (half tiles, dpbusd) with an exact AVX2 emulation of dpbusd
    ("emulated-vnni", ["-mno-avx512vnni", "-mno-avxvnni", "-DTM_EMULATE_VNNI"], "avx2+vnni(emulated)"),
    # the AVX2 path without VNNI (maddubs and madd)
    ("avx2", ["-mno-avx512vnni", "-mno-avxvnni"], "avx2"),
    # the scalar fallback of a CPU without AVX2
    ("baseline-x86-64", ["-march=x86-64", "-mtune=generic"], "scalar"),
])
def test_other_builds_give_the_same_bits(ext, variant, flags, isa):
    """The paths this machine does not run, built here with the ISA extensions switched off
    (after -march=native): each must give this machine's bits, packing included."""
    from textmill.kernels.build import build_variant

    if platform.machine() != "x86_64" or ext.isa() not in ("avx2", "avx2+vnni", "avx512+vnni"):
        pytest.skip("these variants are x86-64 builds compared with a SIMD build")
    if variant == ext.isa().replace("+", "-"):
        pytest.skip("this machine runs that path natively")
    other = build_variant("quant", variant, flags)
    assert other.isa() == isa
    for mode, (mm, k, n) in itertools.product(MODES, [(1, 576, 960), (7, 1536, 70), (65, 64, 33)]):
        w, x, b = weights(n, k, mm), acts(mm, k, n), torch.randn(n)
        packed = pack(ext, mode, w)
        assert torch.equal(pack(other, mode, w), packed)
        assert torch.equal(linear(other, mode, x, packed, n, b), linear(ext, mode, x, packed, n, b))
    # Parts in one call (run_parts): the Q8 part reads the flipped codes, every other part q's.
    for forms, mm in itertools.product(PART_MIXES, (1, 7, 65)):
        parts = [(ext.mode_number(form), pack(ext, form, weights(n, 576, i)), n, torch.randn(n) if i else None)
                 for i, (form, n) in enumerate(zip(forms, (48, 40, 24)))]
        x = acts(mm, 576, 3)
        assert torch.equal(other.linear_parts(x, parts), ext.linear_parts(x, parts)), (forms, mm)
    # The quantizer alone: K/32 = 19 and 18 take four groups at a time and then the rest one
    # by one, 2 only the latter (the AVX2 and 512-bit paths have a four-group step each).
    for k in (608, 576, 64):
        x = acts(9, k, k)
        for mine, theirs in zip(ext.quantize_act(x, 0), other.quantize_act(x, 0)):
            assert torch.equal(mine, theirs)
