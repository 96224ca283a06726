"""GGUF blocks -> 32-value group codes (loader/group_codes.py), and their packing for the
kernels: the codes stand for the file's own weights (exactly where the table in the module
says so), and packing from codes gives the same bytes as packing the float weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from textmill.kernels import load
from textmill.loader.dequant import dequantize
from textmill.loader.group_codes import GGUFRows, concat, from_gguf, iq_grid_tensor, requantize_8bit
from tests.unit.test_dequant import F16_FIELDS, iq1_m_blocks

N, K = 16, 512


def blocks_for(qtype: T, seed: int = 0) -> np.ndarray:
    """Random blocks of an (N, K) tensor with small, finite f16 scales."""
    rng = np.random.default_rng(seed + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    nb = N * K // block_size
    if qtype == T.IQ1_M:
        return iq1_m_blocks(rng, nb)  # its d is spread over four scale words
    if qtype == T.MXFP4:
        return mxfp4_blocks(rng)
    blocks = rng.integers(0, 256, size=(nb, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = rng.uniform(-0.02, 0.02, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return blocks


def mxfp4_blocks(rng: np.random.Generator) -> np.ndarray:
    """A real MXFP4 tensor: random (N, K) weights quantized by gguf-py, each group of 32 at a
    magnitude of its own, so that the exponents spread over what a half holds (scales
    2^-24..2^12), and one group of zeros (gguf-py writes e = 0 for it: 2^-128)."""
    w = rng.standard_normal((N, K // 32, 32)) * np.exp2(rng.integers(-20, 14, (N, K // 32, 1)))
    w[0, 1] = 0
    return quants.quantize(w.reshape(N, K).astype(np.float32), T.MXFP4).reshape(-1, 17)


@pytest.mark.parametrize("qtype,bits", [(T.Q4_0, 4), (T.Q4_1, 4), (T.Q8_0, 8), (T.Q5_0, 8), (T.IQ4_NL, 8),
                                        (T.MXFP4, 8)], ids=lambda v: str(v))
def test_exact_types_keep_the_files_weights(qtype, bits):
    raw = blocks_for(qtype)
    codes = from_gguf(raw, qtype, (N, K))
    assert codes.bits == bits and codes.shape == (N, K) and codes.source == qtype.name
    expected = dequantize(raw, qtype).reshape(N, K)
    assert torch.equal(codes.dequantize(), torch.from_numpy(expected))


def test_q4_k_differs_only_by_half_scales():
    raw = blocks_for(T.Q4_K)
    codes = from_gguf(raw, T.Q4_K, (N, K))
    assert codes.bits == 4
    expected = torch.from_numpy(dequantize(raw, T.Q4_K).reshape(N, K))
    # each sub-block's scale and min are rounded to a half: relative error <= 2^-11 of each
    step = (codes.scale.float().abs() * 15 + codes.min.float().abs()).repeat_interleave(32, dim=1)
    assert ((codes.dequantize() - expected).abs() <= step * 2.0**-10).all()


def test_iq4_xs_keeps_its_codes_and_rounds_only_its_sub_block_scales_to_half():
    # IQ4_XS: 8-bit codes are the file's table values (-127..113); each 32-value sub-block's
    # scale d * (ls - 32) (a half times a 6-bit integer) is rounded to a half, as Q4_K's.
    raw = blocks_for(T.IQ4_XS)
    codes = from_gguf(raw, T.IQ4_XS, (N, K))
    assert codes.bits == 8 and codes.min is None
    assert set(torch.unique(codes.codes).tolist()) <= set(IQ4_VALUES)
    expected = torch.from_numpy(dequantize(raw, T.IQ4_XS).reshape(N, K))
    step = (codes.scale.float().abs() * 127).repeat_interleave(32, dim=1)
    assert ((codes.dequantize() - expected).abs() <= step * 2.0**-11).all()
    assert (codes.dequantize() != expected).any()  # the rounding is real, not vacuous


IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q5_K, T.Q5_1, T.Q3_K, T.Q2_K, T.IQ3_S, T.IQ3_XXS, T.IQ2_S, T.IQ2_XS,
                                   T.IQ2_XXS, T.IQ1_S], ids=lambda t: t.name)
def test_other_types_round_to_eight_bits_within_a_fraction_of_their_step(qtype):
    raw = blocks_for(qtype)
    codes = from_gguf(raw, qtype, (N, K))
    assert codes.bits == 8 and codes.min is None
    w = torch.from_numpy(dequantize(raw, qtype).reshape(N, K))
    group_max = w.view(N, K // 32, 32).abs().amax(-1).repeat_interleave(32, dim=1)
    err = (codes.dequantize() - w).abs()
    assert (err <= group_max / 254 * 1.01 + 1e-12).all()


def test_packing_codes_round_trips_through_the_kernel_layout():
    """The packed tiles hold exactly the codes, scales and mins they were given (q4_pack
    from floats would re-derive its own min and max, so the codes are the reference)."""
    ext = load("quant")
    if ext is None:
        pytest.skip("the C++ kernels cannot be built here")
    for qtype in (T.Q4_1, T.Q4_K, T.Q8_0, T.Q5_0):
        c = from_gguf(blocks_for(qtype), qtype, (N, K))
        if c.bits == 4:
            codes, d, m = ext.q4_unpack(ext.q4_pack_codes(c.codes, c.scale, c.min), N, K)
            assert torch.equal(m, c.min.float()), qtype
        else:
            codes, d = ext.q8_unpack(ext.q8_pack_codes(c.codes, c.scale), N, K)
            # -128 (random bytes; llama.cpp's quantizer never writes it) is clamped to -127
            assert (codes == c.codes.clamp(min=-127)).all(), qtype
            continue
        assert torch.equal(codes, c.codes) and torch.equal(d, c.scale.float()), qtype


def test_concat_and_row_order():
    a, b = from_gguf(blocks_for(T.Q8_0, 1), T.Q8_0, (N, K)), from_gguf(blocks_for(T.Q5_0, 2), T.Q5_0, (N, K))
    both = concat([a, b])
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    order = torch.arange(N - 1, -1, -1)
    assert torch.equal(a.rows(order).dequantize(), a.dequantize()[order])


def test_requantize_rejects_weights_halves_cannot_scale():
    with pytest.raises(ValueError, match="half"):
        requantize_8bit(torch.full((1, 32), 1e7), "F32")


def test_rows_reads_only_the_asked_rows():
    raw = blocks_for(T.Q8_0)
    table = GGUFRows(raw, T.Q8_0, (N, K))
    full = dequantize(raw, T.Q8_0).reshape(N, K)
    ids = torch.tensor([3, 0, 3, 15])
    assert torch.equal(table(ids), torch.from_numpy(full[ids.numpy()]))


# --- the C++ converter (kernels/csrc/gguf_blocks.h): packs from the file's bytes in one pass,
# and must give the bytes the Python reference above gives.

C_TYPES = [T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K, T.IQ4_NL, T.IQ4_XS,
           T.MXFP4, T.F16, T.F32, T.BF16]
# The IQ types with a grid: the C++ converter gives gguf-py's values (ggml's, for IQ1_M);
# in 8 bits (beside an 8-bit part), those with a scale per 16 weights it rounds as the Python
# path does, the others keep their codes (test_c_iq_forms_*).
IQ_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
IQ_REQUANTIZED = [T.IQ2_XS, T.IQ2_S, T.IQ1_M]


def _float_blocks(qtype: T, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 100 + int(qtype))
    w = rng.normal(0, 0.05, (N, K)).astype(np.float32)
    if qtype == T.F32:
        return w.view(np.uint8).reshape(N, -1)
    if qtype == T.F16:
        return w.astype(np.float16).view(np.uint8).reshape(N, -1)
    return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(N, -1)  # bf16


def _raw(qtype: T, seed: int = 0) -> np.ndarray:
    return _float_blocks(qtype, seed) if qtype in (T.F16, T.F32, T.BF16) else blocks_for(qtype, seed)


def _python_packed(parts: list[tuple[np.ndarray, T]], order=None) -> torch.Tensor:
    ext = load("quant")
    codes = [from_gguf(raw, qt, (N, K)) for raw, qt in parts]
    if order is not None:
        codes[0] = codes[0].rows(order)
    c = concat(codes) if len(codes) > 1 else codes[0]
    return ext.q4_pack_codes(c.codes, c.scale, c.min) if c.bits == 4 else ext.q8_pack_codes(c.codes, c.scale)


def _c_packed(bits: int | str, parts: list[tuple[np.ndarray, T]], order=None) -> torch.Tensor:
    """bits: 2, 3, 4, 5, 6 or 8 for the q<bits> form, or a form's name ("iq4")."""
    ext = load("quant")
    raws = [torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)) for raw, _ in parts]
    orders = [order if (i == 0 and order is not None) else torch.empty(0, dtype=torch.long) for i in range(len(parts))]
    form = bits if isinstance(bits, str) else f"q{bits}"
    return ext.pack_gguf(form, raws, [int(qt) for _, qt in parts], orders, K, [iq_grid_tensor(qt) for _, qt in parts])


@pytest.mark.parametrize("qtype", C_TYPES + IQ_REQUANTIZED, ids=lambda t: t.name)
def test_c_packing_gives_the_python_references_bytes(qtype):
    raw = _raw(qtype)
    bits = 4 if qtype in (T.Q4_0, T.Q4_1, T.Q4_K) else 8
    assert torch.equal(_c_packed(bits, [(raw, qtype)]), _python_packed([(raw, qtype)]))


def test_c_packing_stacks_parts_and_undoes_a_row_order():
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    four = [(_raw(T.Q4_K, 1), T.Q4_K), (_raw(T.Q4_0, 2), T.Q4_0), (_raw(T.Q4_1, 3), T.Q4_1)]
    assert torch.equal(_c_packed(4, four, order), _python_packed(four, order))
    eight = [(_raw(T.Q6_K, 1), T.Q6_K), (_raw(T.Q8_0, 2), T.Q8_0), (_raw(T.F16, 3), T.F16)]
    assert torch.equal(_c_packed(8, eight, order), _python_packed(eight, order))


def test_c_packing_refuses_what_halves_cannot_hold_and_types_it_does_not_decode():
    raw = blocks_for(T.Q4_0)
    raw[:, 0:2] = np.array([60000.0], dtype=np.float16).view(np.uint8)  # -8 d overflows a half
    with pytest.raises(RuntimeError, match="half range"):
        _c_packed(4, [(raw, T.Q4_0)])
    with pytest.raises(RuntimeError, match="not decoded here"):
        load("quant").pack_gguf("q8", [torch.zeros(N * K // 256 * 66, dtype=torch.uint8)], [int(T.TQ2_0)],
                                [torch.empty(0, dtype=torch.long)], K)
    with pytest.raises(RuntimeError, match="no 4-bit form"):
        _c_packed(4, [(blocks_for(T.Q6_K), T.Q6_K)])


def _assert_runs_as(op, packed: torch.Tensor, w: torch.Tensor, seed: int) -> None:
    """op (a form's linear) on `packed` against F.linear on the weights w it stands for,
    within the activations' rounding (the kernels' only approximation); SIMD = scalar."""
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(seed))
    y = op(x, packed, N)
    assert torch.equal(y, op(x, packed, N, None, 1))  # SIMD = scalar, bit for bit
    e = x.view(5, -1, 32).abs().amax(-1) / 127
    bound = (e.double() / 2) @ w.double().abs().view(N, -1, 32).sum(-1).T + 1e-4
    assert ((y.double() - x.double() @ w.double().T).abs() <= bound).all()


def _six_bit_weights(raw: np.ndarray, qtype: T) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights the 6-bit form packed from the file stands for, and its scales (N, K/16)."""
    codes, d = load("quant").q6_unpack(_c_packed(6, [(raw, qtype)]), N, K)
    return ((codes.float() - 32).view(N, -1, 16) * d[..., None]).view(N, K), d


def _five_bit_weights(raw: np.ndarray, qtype: T) -> torch.Tensor:
    codes, d, m = load("quant").q5_unpack(_c_packed(5, [(raw, qtype)]), N, K)
    assert int(codes.max()) <= 31
    return (codes.float().view(N, -1, 32) * d[..., None] + m[..., None]).view(N, K)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_c_five_bit_form_keeps_q5_0_and_q5_1_weights_exactly(qtype):
    raw = _raw(qtype)
    assert torch.equal(_five_bit_weights(raw, qtype), torch.from_numpy(dequantize(raw, qtype).reshape(N, K)))


def test_c_five_bit_form_rounds_only_q5_ks_sub_block_scales_to_half():
    raw = _raw(T.Q5_K)
    w = _five_bit_weights(raw, T.Q5_K)
    expected = torch.from_numpy(dequantize(raw, T.Q5_K).reshape(N, K))
    # d * sc and dmin * mn each rounded to a half (2^-11 relative), as Q4_K's in the 4-bit form
    codes, d, m = load("quant").q5_unpack(_c_packed(5, [(raw, T.Q5_K)]), N, K)
    step = (d.abs() * 31 + m.abs()).repeat_interleave(32, dim=1)
    assert ((w - expected).abs() <= step * 2.0**-10).all()
    assert not torch.equal(w, expected)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q3_K], ids=lambda t: t.name)
def test_c_six_bit_form_keeps_the_codes_and_rounds_only_the_scales_to_half(qtype):
    raw = _raw(qtype)
    w, d = _six_bit_weights(raw, qtype)
    expected = torch.from_numpy(dequantize(raw, qtype).reshape(N, K))
    # the 16-weight scale d * sc rounded to a half: 2^-11 of each weight (2^-10 leaves room
    # for the reference's own float32 rounding)
    assert ((w - expected).abs() <= expected.abs() * 2.0**-10).all()
    assert not torch.equal(w, expected)  # the rounding is real: the check above is not vacuous
    assert d.shape == (N, K // 16)


@pytest.mark.parametrize("rows", [1, 5, 17, 40])
def test_c_three_bit_form_holds_q3_k_as_it_is_and_computes_as_the_six_bit_form(rows):
    ext = load("quant")
    parts = [(_raw(T.Q3_K, seed), T.Q3_K) for seed in range(3)]  # 48 rows: a tile pair and a lone tile
    n = 16 * len(parts)
    q3, q6 = _c_packed(3, parts), _c_packed(6, parts)
    assert q3.numel() * 7 == q6.numel() * 4  # 4 bits a weight against 7
    codes3, d3 = ext.q3_unpack(q3, n, K)
    codes6, d6 = ext.q6_unpack(q6, n, K)
    assert int(codes3.max()) <= 7 and torch.equal(codes3.int() + 28, codes6.int()) and torch.equal(d3, d6)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    y = ext.q3_linear(x, q3, n)
    assert torch.equal(y, ext.q6_linear(x, q6, n))  # the same integer sums and float steps
    assert torch.equal(y, ext.q3_linear(x, q3, n, None, 1))  # SIMD = scalar, bit for bit


def test_c_six_bit_form_refuses_other_types_and_scales_past_a_half():
    for other in (T.Q8_0, T.Q2_K):
        with pytest.raises(RuntimeError, match="no 6-bit form"):
            _c_packed(6, [(blocks_for(other), other)])
    with pytest.raises(RuntimeError, match="no 3-bit form"):
        _c_packed(3, [(blocks_for(T.Q6_K), T.Q6_K)])
    with pytest.raises(RuntimeError, match="no 5-bit form"):
        _c_packed(5, [(blocks_for(T.Q6_K), T.Q6_K)])
    q5 = blocks_for(T.Q5_0)
    q5[:, 0:2] = np.array([5000.0], dtype=np.float16).view(np.uint8)  # -16 d overflows a half
    with pytest.raises(RuntimeError, match="half range"):
        _c_packed(5, [(q5, T.Q5_0)])
    raw = blocks_for(T.Q6_K)
    raw[:, 208:210] = np.array([1000.0], dtype=np.float16).view(np.uint8)  # d * sc past 65504
    with pytest.raises(RuntimeError, match="half range"):
        _c_packed(6, [(raw, T.Q6_K)])
    raw = blocks_for(T.Q3_K)
    raw[:, 96:108] = 0xFF  # every scale 63 - 32 = 31
    raw[:, 108:110] = np.array([3000.0], dtype=np.float16).view(np.uint8)  # d * 31 past 65504
    with pytest.raises(RuntimeError, match="half range"):
        _c_packed(6, [(raw, T.Q3_K)])


@pytest.mark.parametrize("qtype,bits", [(T.Q5_0, 5), (T.Q5_K, 5), (T.Q6_K, 6), (T.Q3_K, 6)], ids=str)
def test_c_five_and_six_bit_forms_run_as_their_weights(qtype, bits):
    """q5/q6_linear on the file's blocks against F.linear on the weights they stand for,
    within the activations' rounding (the kernels' only approximation)."""
    ext = load("quant")
    packed = _c_packed(bits, [(_raw(qtype), qtype)])
    w = _five_bit_weights(_raw(qtype), qtype) if bits == 5 else _six_bit_weights(_raw(qtype), qtype)[0]
    _assert_runs_as(getattr(ext, f"q{bits}_linear"), packed, w, 4)


@pytest.mark.parametrize("qtype", C_TYPES + IQ_TYPES, ids=lambda t: t.name)
def test_c_rows_give_the_dequantized_values(qtype):
    raw = _raw(qtype)
    ids = torch.tensor([5, 0, 5, N - 1])
    grid = iq_grid_tensor(qtype) if qtype in IQ_TYPES else None
    got = load("quant").gguf_rows(torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)), int(qtype), ids, K,
                                  grid)
    expected = dequantize(raw, qtype).reshape(N, K)[ids.numpy()]
    assert torch.equal(got, torch.from_numpy(expected))


def test_release_file_pages_drops_read_pages_and_keeps_the_map_readable(tmp_path):
    from textmill.loader.group_codes import release_file_pages

    path = tmp_path / "blob"
    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    view = mapped[4096:1 << 20]
    resident = lambda: int(open("/proc/self/statm").read().split()[1])  # noqa: E731 - pages
    before = resident()
    assert int(mapped.sum()) == int(data.sum())  # every page read: resident
    assert resident() - before > 1500
    assert release_file_pages([view]) == data.size
    assert resident() - before < 500  # given back ...
    assert np.array_equal(view[:100], data[4096:4196])  # ... and read again from the file
    writable = np.zeros(10, dtype=np.uint8)
    assert release_file_pages([writable]) == 0


# --- the IQ4 form: the file's 4-bit indices and one half scale per 32, looked up in the kernel
# (and the MXFP4 form: the same on MXFP4's table)


@pytest.mark.parametrize("qtype,form", [(T.IQ4_NL, "iq4"), (T.IQ4_XS, "iq4"), (T.MXFP4, "mxfp4")],
                         ids=lambda v: getattr(v, "name", v))
def test_c_iq4_form_holds_the_eight_bit_forms_weights_in_half_the_bytes(qtype, form):
    ext = load("quant")
    raw = _raw(qtype)
    iq4, q8 = _c_packed(form, [(raw, qtype)]), _c_packed(8, [(raw, qtype)])
    assert iq4.numel() == ext.packed_bytes(form, N, K) < 0.55 * q8.numel()
    codes, d = getattr(ext, f"{form}_unpack")(iq4, N, K)
    codes8, d8 = ext.q8_unpack(q8, N, K)
    assert torch.equal(codes, codes8) and torch.equal(d, d8)
    # the same values through the same float steps: iq4_linear gives q8_linear's bits, at
    # one row (row groups) and at many (block-major), and on the scalar path
    op = getattr(ext, f"{form}_linear")
    for m in (1, 3, 40):
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)) * 3
        y = op(x, iq4, N)
        assert torch.equal(y, ext.q8_linear(x, q8, N))
        assert torch.equal(y, op(x, iq4, N, None, 1))


def test_c_iq4_form_stacks_nl_and_xs_parts_and_refuses_other_types():
    order = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    parts = [(_raw(T.IQ4_XS, 1), T.IQ4_XS), (_raw(T.IQ4_NL, 2), T.IQ4_NL)]
    ext = load("quant")
    codes, d = ext.iq4_unpack(_c_packed("iq4", parts, order), 2 * N, K)
    codes8, d8 = ext.q8_unpack(_c_packed(8, parts, order), 2 * N, K)
    assert torch.equal(codes, codes8) and torch.equal(d, d8)
    with pytest.raises(RuntimeError, match="no IQ4 form"):
        _c_packed("iq4", [(blocks_for(T.Q4_0), T.Q4_0)])
    raw = blocks_for(T.IQ4_XS)
    raw[:, 0:2] = np.array([3000.0], dtype=np.float16).view(np.uint8)  # d * (ls - 32) past 65504
    with pytest.raises(RuntimeError, match="half range"):
        _c_packed("iq4", [(raw, T.IQ4_XS)])


MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12)


def test_c_mxfp4_form_runs_as_gguf_pys_weights():
    """A real MXFP4 tensor (mxfp4_blocks) packed as a GGUF file's is: gguf-py's dequantized
    weights exactly (each scale 2^(e - 128) held by a half as it is), and mxfp4_linear within
    the activations' rounding of F.linear on them, SIMD = scalar."""
    ext = load("quant")
    raw = _raw(T.MXFP4)
    packed = _c_packed("mxfp4", [(raw, T.MXFP4)])
    w = torch.from_numpy(quants.dequantize(raw.reshape(N, -1), T.MXFP4))
    codes, d = ext.mxfp4_unpack(packed, N, K)
    assert set(torch.unique(codes).tolist()) == set(MXFP4_VALUES)
    assert torch.equal((codes.float().view(N, -1, 32) * d[..., None]).view(N, K), w)
    powers = torch.log2(d[d > 0])
    assert powers.min() <= -20 and powers.max() >= 9 and d[0, 1] == 0  # the spread is real; the zero group
    _assert_runs_as(ext.mxfp4_linear, packed, w, 8)


def test_c_mxfp4_pack_of_float_weights_is_gguf_pys_quantization():
    """mxfp4_pack takes ggml's scale and nearest values: float weights pack to the bytes of
    gguf-py's MXFP4 blocks of them packed from the file."""
    rng = np.random.default_rng(41)
    w = (rng.standard_normal((N, K // 32, 32)) * np.exp2(rng.integers(-20, 14, (N, K // 32, 1)))).reshape(N, K)
    w = w.astype(np.float32)
    w[3, :64] = 0
    raw = quants.quantize(w, T.MXFP4)
    assert torch.equal(load("quant").mxfp4_pack(torch.from_numpy(w)), _c_packed("mxfp4", [(raw, T.MXFP4)]))


@pytest.mark.parametrize("power", [16, -25], ids=["past-2^15", "below-2^-24"])
def test_c_mxfp4_scales_no_half_holds_fall_back_as_iq4s_do(power):
    """A group's 2^(e - 128) past a half's range (a group of zeros aside) is reported as IQ4's
    scales are: pack_gguf raises "half range" in both its forms, so QLinear.from_file raises
    OutOfHalfRange and the runner takes the Python converter's path, which rounds the tensor to
    8 bits (a scale below 2^-24 no less: a half would round it)."""
    from textmill.loader.group_codes import CodesRef
    from textmill.runner.qlinear import OutOfHalfRange, QLinear

    raw = _raw(T.MXFP4).copy()
    assert raw[1, 0] == 0 and not raw[1, 1:].any()  # the group of zeros at e = 0 packed (d = 0, above)
    assert (raw[5, 1:] & 0x77).any()  # a nonzero value
    raw[5, 0] = 128 + power
    for form in ("mxfp4", 8):
        with pytest.raises(RuntimeError, match="half range"):
            _c_packed(form, [(raw, T.MXFP4)])
    ref = CodesRef(raw, T.MXFP4, (N, K))
    with pytest.raises(OutOfHalfRange):
        QLinear.from_file([ref])
    codes = ref.load()
    assert codes.bits == 8 and codes.source == "MXFP4"
    w = torch.from_numpy(dequantize(raw, T.MXFP4).reshape(N, K))
    group_max = w.view(N, K // 32, 32).abs().amax(-1).repeat_interleave(32, dim=1)
    # half a step of max|w| / 127, and the subnormal half d's rounding (2^-25) on a code up to 127
    assert ((codes.dequantize() - w).abs() <= group_max / 254 * 1.01 + 127 * 2.0**-25).all()


def test_c_mxfp4_form_takes_mxfp4_alone():
    with pytest.raises(RuntimeError, match="no MXFP4 form"):
        _c_packed("mxfp4", [(_raw(T.IQ4_NL), T.IQ4_NL)])
    with pytest.raises(RuntimeError, match="no IQ4 form"):
        _c_packed("iq4", [(_raw(T.MXFP4), T.MXFP4)])


# --- the 1- to 3-bit IQ types: grid rows with signs, into the forms their values fit


def _form_weights(form: str, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, K) weights a packed form stands for, and its codes."""
    ext = load("quant")
    if form == "q4":
        codes, d, m = ext.q4_unpack(packed, N, K)
        return (codes.float().view(N, -1, 32) * d[..., None] + m[..., None]).view(N, K), codes.int()
    if form in ("q6", "iq2"):  # a scale per 16; iq2's codes are its table values
        codes, d = getattr(ext, f"{form}_unpack")(packed, N, K)
        codes = codes.int() - (32 if form == "q6" else 0)
        return (codes.float().view(N, -1, 16) * d[..., None]).view(N, K), codes
    codes, d = ext.q8_unpack(packed, N, K)
    return (codes.float().view(N, -1, 32) * d[..., None]).view(N, K), codes.int()


# type, form, the codes it must hold (every one of them reached by random blocks, or all but
# one), and the largest magnitude a code stands for
IQ_FORMS = [
    (T.IQ3_S, "q4", set(range(16)), 15),  # odd -15..15 as (v + 15) / 2: d = 2 s, m = -15 s
    (T.IQ1_S, "q4", {0, 1, 2}, 2.2),  # -1..1 as v + 1: d = s, m = s (delta - 1)
    (T.IQ3_XXS, "q6", {v // 2 * s for v in (4, 12, 20, 28, 36, 44, 52, 62) for s in (1, -1)}, 31),
    (T.IQ1_M, "q6", {8 * v + s for v in (-1, 0, 1) for s in (1, -1)}, 9),  # 8 (v + delta) on s / 8 per 16
    (T.IQ2_XXS, "q8", {v * s for v in (8, 25, 43) for s in (1, -1)}, 43),
    (T.IQ2_XXS, "iq2", {v * s for v in (8, 25, 43) for s in (1, -1)}, 43),  # indices into the six values
    (T.IQ2_XS, "iq2", {v * s for v in (8, 25, 43) for s in (1, -1)}, 43),  # ... on a scale per 16
    (T.IQ2_S, "iq2", {v * s for v in (8, 25, 43) for s in (1, -1)}, 43),
    (T.IQ3_S, "q8", set(range(-15, 16, 2)), 15),
    (T.IQ3_XXS, "q8", {v * s for v in (4, 12, 20, 28, 36, 44, 52, 62) for s in (1, -1)}, 62),
    (T.IQ1_S, "q8", {8 * v + s for v in (-1, 0, 1) for s in (1, -1)}, 9),  # 8 (v + delta) on s / 8
]


@pytest.mark.parametrize("qtype,form,codes,top", IQ_FORMS, ids=lambda v: getattr(v, "name", str(v)))
def test_c_iq_forms_keep_the_files_codes_and_round_only_the_scales_to_half(qtype, form, codes, top):
    raw = _raw(qtype)
    w, got_codes = _form_weights(form, _c_packed(form, [(raw, qtype)]))
    got = set(torch.unique(got_codes).tolist())
    assert got <= codes and len(got) >= len(codes) - 1  # random blocks reach (nearly) all
    assert max(abs(c) for c in got) <= top
    expected = torch.from_numpy(dequantize(raw, qtype).reshape(N, K))
    # the scale (and min) rounded to a half, 2^-11 of each, against the group's largest
    # weight (2^-10 leaves room for the reference's own float32 rounding; q4's min, -15 s, on
    # top of its d: twice that)
    scale = expected.view(N, -1, 32).abs().amax(-1, keepdim=True).expand(N, K // 32, 32).reshape(N, K)
    assert ((w - expected).abs() <= scale * 2.0**-10 * (2 if form == "q4" else 1) + 1e-30).all()
    assert (w != expected).any()  # the rounding is real: the check above is not vacuous


@pytest.mark.parametrize("qtype,form", [(t, f) for t, f, _, _ in IQ_FORMS if f != "q8"], ids=str)
def test_c_iq_forms_run_as_their_weights(qtype, form):
    ext = load("quant")
    packed = _c_packed(form, [(_raw(qtype), qtype)])
    w, _ = _form_weights(form, packed)
    _assert_runs_as(getattr(ext, f"{form}_linear"), packed, w, 6)


def test_c_iq_forms_stack_beside_the_k_quants_of_their_width():
    # an IQ3_M file's IQ3_S q beside a Q4_K k: one q4 matmul; IQ3_XXS beside Q6_K: one q6
    ext = load("quant")
    for form, parts in (("q4", [(_raw(T.IQ3_S, 1), T.IQ3_S), (_raw(T.Q4_K, 2), T.Q4_K)]),
                        ("q6", [(_raw(T.IQ3_XXS, 1), T.IQ3_XXS), (_raw(T.Q6_K, 2), T.Q6_K)])):
        both = _c_packed(form, parts)
        for i, part in enumerate(parts):
            alone = _c_packed(form, [part])
            unpack = ext.q4_unpack if form == "q4" else ext.q6_unpack
            got, want = unpack(both, 2 * N, K), unpack(alone, N, K)
            assert all(torch.equal(g[i * N:(i + 1) * N], a) for g, a in zip(got, want)), (form, i)


def test_c_iq_types_need_their_grid_and_refuse_one_that_does_not_fit():
    ext = load("quant")
    raw = torch.from_numpy(_raw(T.IQ3_S).reshape(-1))
    no_order = [torch.empty(0, dtype=torch.long)]
    with pytest.raises(RuntimeError, match="needs its grid"):
        ext.pack_gguf("q4", [raw], [int(T.IQ3_S)], no_order, K)
    with pytest.raises(RuntimeError, match="grid: contiguous int8"):
        ext.pack_gguf("q4", [raw], [int(T.IQ3_S)], no_order, K, [iq_grid_tensor(T.IQ3_XXS)])
    wrong = iq_grid_tensor(T.IQ3_S).clone()
    wrong[7, 1] = 2  # an even value: (v + 15) / 2 would not be a code
    with pytest.raises(RuntimeError, match="grid holds 2"):
        ext.pack_gguf("q4", [raw], [int(T.IQ3_S)], no_order, K, [wrong])
    with pytest.raises(RuntimeError, match="no 4-bit form"):
        _c_packed(4, [(_raw(T.IQ2_XXS), T.IQ2_XXS)])
    with pytest.raises(RuntimeError, match="no IQ2 form"):
        _c_packed("iq2", [(_raw(T.IQ3_S), T.IQ3_S)])
    with pytest.raises(RuntimeError, match="needs its grid"):
        ext.gguf_rows(raw, int(T.IQ3_S), torch.tensor([0]), K)


# --- Q2_K: its own 2-bit form (codes 0..3, a scale and a min per 16 weights)


def test_c_two_bit_form_keeps_q2_ks_codes_and_rounds_only_its_scales_and_mins_to_half():
    ext = load("quant")
    raw = _raw(T.Q2_K)
    packed = _c_packed(2, [(raw, T.Q2_K)])
    assert packed.numel() * 17 == ext.packed_bytes("q8", N, K) * 8  # 4 bits a weight against 8.5
    codes, d, m = ext.q2_unpack(packed, N, K)
    assert set(torch.unique(codes).tolist()) == {0, 1, 2, 3} and d.shape == m.shape == (N, K // 16)
    w = (codes.float().view(N, -1, 16) * d[..., None] + m[..., None]).view(N, K)
    expected = torch.from_numpy(dequantize(raw, T.Q2_K).reshape(N, K))
    # d * sc and dmin * mn each rounded to a half (2^-11 relative), as Q4_K's in the 4-bit form
    step = (d.abs() * 3 + m.abs()).repeat_interleave(16, dim=1)
    assert ((w - expected).abs() <= step * 2.0**-10).all()
    assert not torch.equal(w, expected)
    _assert_runs_as(ext.q2_linear, packed, w, 7)
    with pytest.raises(RuntimeError, match="no 2-bit form"):
        _c_packed(2, [(_raw(T.Q3_K), T.Q3_K)])
    big = _raw(T.Q2_K)
    big[:, 0:16] = 0xFF  # every scale and min 15
    big[:, 80:82] = np.array([5000.0], dtype=np.float16).view(np.uint8)  # d * 15 past 65504
    with pytest.raises(RuntimeError, match="half range"):
        _c_packed(2, [(big, T.Q2_K)])


@pytest.mark.parametrize("qtype", [t for t in C_TYPES if t not in (T.F16, T.F32, T.BF16)], ids=lambda t: t.name)
def test_c_packing_writes_whole_tiles_and_zero_pads_the_last(qtype):
    # The packer writes each row's words whole into uncleared memory and clears only a tile
    # with padding rows. 20 rows: the full first tile is the 16-row packing's bytes, and
    # the packing is the same however dirty the memory it lands in; the padded second tile
    # computes what 4 rows packed alone do.
    from textmill.loader.group_codes import CodesRef

    first, more = _raw(qtype), _raw(qtype, seed=1).reshape(N, -1)[:4]
    twenty = np.concatenate([first.reshape(N, -1), more])
    form = CodesRef(first, qtype, (N, K)).form
    ext = load("quant")
    tile = _c_packed(form, [(first, qtype)])
    packed = [_c_packed(form, [(twenty, qtype)])]
    for _ in range(3):
        dirt = torch.full((packed[0].numel(),), 0xA5, dtype=torch.uint8)
        del dirt
        packed.append(_c_packed(form, [(twenty, qtype)]))
    assert all(torch.equal(p, packed[0]) for p in packed[1:])
    assert packed[0].numel() == 2 * tile.numel() and torch.equal(packed[0][:tile.numel()], tile)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(5))
    linear = getattr(ext, f"{form}_linear")
    assert torch.equal(linear(x, packed[0], 20)[:, 16:], linear(x, _c_packed(form, [(more, qtype)]), 4))


def _q6_k_reference(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q6_K layout read value by value: codes 0..63 (N, K) and the 16-value scales
    d * sc rounded to halves (N, K/16), what the 6-bit form must hold exactly."""
    blocks = raw.reshape(-1, 210)
    ql, qh = blocks[:, :128].astype(np.int64), blocks[:, 128:192].astype(np.int64)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    n = np.arange(256)
    h, j, l = n // 128, (n % 128) // 32, n % 32
    low = (ql[:, 64 * h + l + 32 * (j & 1)] >> np.where(j >= 2, 4, 0)) & 15
    high = (qh[:, 32 * h + l] >> (2 * j)) & 3
    codes = (low | high << 4).reshape(N, K)
    scales = (d * sc).astype(np.float16).astype(np.float32).reshape(N, K // 16)
    return codes, scales


def test_c_six_bit_form_holds_q6_k_codes_and_half_scales_exactly():
    raw = _raw(T.Q6_K)
    codes, d = load("quant").q6_unpack(_c_packed(6, [(raw, T.Q6_K)]), N, K)
    want_codes, want_d = _q6_k_reference(raw)
    assert np.array_equal(codes.numpy().astype(np.int64), want_codes)
    assert np.array_equal(d.numpy(), want_d)


def _k_weights(form: str, packed: torch.Tensor) -> torch.Tensor:
    """The (N, K) weights a packed q4/q5/q6 or q4k/q5k/q6k form stands for."""
    out = getattr(load("quant"), f"{form}_unpack")(packed, N, K)
    if form.startswith("q6"):
        codes, d = out
        return ((codes.float() - 32).view(N, -1, 16) * d[..., None]).view(N, K)
    codes, d, m = out
    return (codes.float().view(N, -1, 32) * d[..., None] + m[..., None]).view(N, K)


K_OWN = [(T.Q4_K, "q4k", "q4", 4.625), (T.Q5_K, "q5k", "q5", 5.625), (T.Q6_K, "q6k", "q6", 6.5625)]


@pytest.mark.parametrize("qtype,form,rounded,bits", K_OWN, ids=lambda v: str(v))
def test_c_k_forms_are_the_files_weights_exactly(qtype, form, rounded, bits):
    """The k-quants' own forms keep each super-block's halves (d, dmin) and its 6-bit (Q6_K:
    int8) scales and mins as integers: their weights are the file's, bit for bit (the
    reference dequantizes in float32, (d*sc)*q - dmin*mn, each product exact). The 4-, 5- and
    6-bit forms round d*sc (and dmin*mn) to halves, so they differ."""
    raw = _raw(qtype)
    expected = torch.from_numpy(dequantize(raw, qtype).reshape(N, K))
    packed = _c_packed(form, [(raw, qtype)])
    assert torch.equal(_k_weights(form, packed), expected)
    assert not torch.equal(_k_weights(rounded, _c_packed(rounded, [(raw, qtype)])), expected)
    assert packed.numel() * 8 / (N * K) == bits  # bits a weight: the file's 4.5, 5.5 and 6.5625
    _assert_runs_as(getattr(load("quant"), f"{form}_linear"), packed, expected, 7)


@pytest.mark.parametrize("qtype,form,rounded,bits", K_OWN, ids=lambda v: str(v))
def test_c_k_forms_take_scales_past_a_half_and_only_their_type(qtype, form, rounded, bits):
    """d * sc = 60000 * 63 is past a half (the rounded forms refuse it, below); the own forms
    multiply in float32 and keep it. Any other type is not the form's."""
    raw = _raw(qtype).reshape(-1, GGML_QUANT_SIZES[qtype][1]).copy()
    big = np.full(len(raw), 60000, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == T.Q6_K:
        raw[:, 208:210], raw[:, 192] = big, 100
    else:
        raw[:, 0:2], raw[:, 4] = big, 63
    expected = torch.from_numpy(dequantize(raw, qtype).reshape(N, K))
    assert expected.abs().max() > 65504
    assert torch.equal(_k_weights(form, _c_packed(form, [(raw, qtype)])), expected)
    with pytest.raises(RuntimeError, match=f"has no {qtype.name} form"):
        _c_packed(form, [(_raw(T.Q4_1), T.Q4_1)])


@pytest.mark.parametrize("qtype,form", [(T.Q4_K, "q4"), (T.Q6_K, "q6")], ids=lambda v: str(v))
def test_c_super_block_rows_refuse_scales_past_a_half(qtype, form):
    raw = _raw(qtype).reshape(-1, GGML_QUANT_SIZES[qtype][1]).copy()
    big = np.full(len(raw), 60000, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == T.Q4_K:
        raw[:, 0:2], raw[:, 4] = big, 63  # d * sc = 60000 * 63
    else:
        raw[:, 208:210], raw[:, 192] = big, 100  # d * sc = 60000 * 100
    with pytest.raises(RuntimeError, match="half range"):
        _c_packed(form, [(raw, qtype)])
