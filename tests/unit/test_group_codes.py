"""GGUF blocks -> 32-value group codes (loader/group_codes.py), and their packing for the
kernels: the codes stand for the file's own weights (exactly where the table in the module
says so), and packing from codes gives the same bytes as packing the float weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from textmill.kernels import load
from textmill.loader.dequant import dequantize
from textmill.loader.group_codes import GGUFRows, concat, from_gguf, requantize_8bit
from tests.unit.test_dequant import F16_FIELDS

N, K = 16, 512


def blocks_for(qtype: T, seed: int = 0) -> np.ndarray:
    """Random blocks of an (N, K) tensor with small, finite f16 scales."""
    rng = np.random.default_rng(seed + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    nb = N * K // block_size
    blocks = rng.integers(0, 256, size=(nb, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = rng.uniform(-0.02, 0.02, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return blocks


@pytest.mark.parametrize("qtype,bits", [(T.Q4_0, 4), (T.Q4_1, 4), (T.Q8_0, 8), (T.Q5_0, 8)], ids=lambda v: str(v))
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


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q5_K, T.Q5_1, T.Q3_K, T.Q2_K], ids=lambda t: t.name)
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
