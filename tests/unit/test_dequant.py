"""Our dequantization against gguf's reference implementation, on random blocks.

Blocks come from gguf's own quantizer where it has one, and otherwise from random bytes
with every f16 scale field overwritten by a finite value, so every bit of every field is
exercised.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from textmill.loader.dequant import SUPPORTED_TYPES, dequantize

# Byte offsets of the f16 fields (scales, mins) inside one block of each type.
F16_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.MXFP4: (),  # MXFP4's scale: an E8M0 byte (random_blocks)
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
}  # fmt: skip
NUM_BLOCKS = 64


def random_blocks(qtype: T, rng: np.random.Generator) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(NUM_BLOCKS, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = rng.uniform(-2.0, 2.0, size=NUM_BLOCKS).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(NUM_BLOCKS, 2)
    if qtype == T.MXFP4:  # every exponent whose values stay finite (2^(e - 128) * 12 below 2^128)
        blocks[:, 0] = rng.integers(0, 253, NUM_BLOCKS)
    return blocks


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS, key=lambda t: t.name), ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: T) -> None:
    # (For REFERENCE_TYPES, which are gguf-py's own dequantizers, this checks only the
    # wiring: the values' shape, dtype and order per block.)
    rng = np.random.default_rng(int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    blocks = random_blocks(qtype, rng)
    # The reference treats the last axis as a row of blocks: 4 rows of 16 blocks.
    raw = blocks.reshape(4, -1)
    expected = quants.dequantize(raw, qtype).reshape(-1)
    got = dequantize(raw, qtype)
    assert got.dtype == np.float32
    assert got.shape == (NUM_BLOCKS * block_size,)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


# MXFP4 as 2 bits: its scale 2^floor(log2 max|w|) / 8 leaves max|w| / d in 8..16, whose top
# value 12 clips by up to 4 d (and its widest gap, 8 to 12, rounds by 2 d): max|w| / 2 at most.
QUANTIZABLE_BITS = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.BF16: 8, T.MXFP4: 2}


@pytest.mark.parametrize("qtype", list(QUANTIZABLE_BITS), ids=lambda t: t.name)
def test_quantized_weights_round_trip(qtype: T) -> None:
    """Blocks made by gguf's quantizer from real-looking weights decode like the reference."""
    rng = np.random.default_rng(7)
    weights = rng.standard_normal((8, 256)).astype(np.float32) * 0.05
    raw = quants.quantize(weights, qtype)
    got = dequantize(raw, qtype).reshape(weights.shape)
    np.testing.assert_array_equal(got, quants.dequantize(raw, qtype))
    # And the decoded values are close to what went in: the layout is not merely consistent.
    # Rounding error is half a step, a step about max|w| / 2**(bits-1); the symmetric types
    # (Q4_0, Q5_0) clip the far end of the range by up to one step.
    step = np.abs(weights).max() / 2 ** (QUANTIZABLE_BITS[qtype] - 1)
    assert np.abs(got - weights).max() <= step


@pytest.mark.parametrize("qtype", [T.F32, T.F16], ids=lambda t: t.name)
def test_plain_floats(qtype: T) -> None:
    values = np.random.default_rng(3).standard_normal(100).astype(np.float32)
    raw = values.astype(np.float16 if qtype == T.F16 else np.float32)
    got = dequantize(raw.view(np.uint8), qtype)
    np.testing.assert_array_equal(got, raw.astype(np.float32))


def test_every_supported_type_is_tested() -> None:
    assert SUPPORTED_TYPES == set(F16_FIELDS) | {T.F32, T.F16, T.BF16, T.IQ1_M}


def iq1_m_blocks(rng: np.random.Generator, num_blocks: int = NUM_BLOCKS, scale: float = 2.0) -> np.ndarray:
    """Random IQ1_M blocks with a finite d in -scale..scale: its 16 bits are the top nibbles
    of the four uint16 scale words (word i holds bits 4i..4i+3), the rest of each word random."""
    blocks = rng.integers(0, 256, size=(num_blocks, 56), dtype=np.uint8)
    d = rng.uniform(-scale, scale, num_blocks).astype(np.float16).view(np.uint16)
    words = blocks[:, 48:56].copy().view(np.uint16)
    for i in range(4):
        words[:, i] = (words[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
    blocks[:, 48:56] = words.view(np.uint8)
    return blocks


def _iq1_m_block_by_hand(block: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_iq1_m, one value at a time: a reference written apart from the
    vectorized one (gguf-py's own reads every delta as negative)."""
    qs, qh = block[:32], block[32:48]
    words = [int(block[48 + 2 * i]) | (int(block[49 + 2 * i]) << 8) for i in range(4)]
    d_bits = (words[0] >> 12) | ((words[1] >> 8) & 0xF0) | ((words[2] >> 4) & 0xF00) | (words[3] & 0xF000)
    d = np.float32(np.uint16(d_bits).view(np.float16))
    out = np.zeros(256, dtype=np.float32)
    for ib in range(8):  # 32 values each
        for half in range(2):  # 16 values, one scale
            s = (words[ib // 2] >> (6 * (ib % 2) + 3 * half)) & 7
            dl = d * np.float32(2 * s + 1)
            for g in range(2):  # 8 values, one grid row and one delta
                k = 2 * half + g
                nib = (int(qh[2 * ib + k // 2]) >> (4 * (k % 2))) & 15
                row = grid[int(qs[4 * ib + k]) | ((nib & 7) << 8)]
                delta = np.float32(-0.125 if nib & 8 else 0.125)
                for j in range(8):
                    out[32 * ib + 8 * k + j] = dl * (np.float32(row[j]) + delta)
    return out


def test_iq1_m_follows_ggml() -> None:
    from textmill.loader.dequant import iq_grid

    blocks = iq1_m_blocks(np.random.default_rng(29), 6)
    grid = iq_grid(T.IQ1_M)
    assert set(np.unique(grid)) == {-1, 0, 1} and grid.shape == (2048, 8)
    got = dequantize(blocks, T.IQ1_M).reshape(6, 256)
    for b in range(6):
        np.testing.assert_array_equal(got[b], _iq1_m_block_by_hand(blocks[b], grid))


def test_mxfp4_scales_are_ggmls_for_every_exponent() -> None:
    """MXFP4's scale 2^(e - 128) (ggml's e8m0_to_fp32_half) bit for bit for every E8M0 byte:
    e = 0 and 1 are float32 subnormals (ggml builds them from bits), the top ones overflow."""
    blocks = np.random.default_rng(39).integers(0, 256, size=(256, 17), dtype=np.uint8)
    blocks[:, 0] = np.arange(256)
    with np.errstate(over="ignore"):
        expected = quants.dequantize(blocks, T.MXFP4).reshape(-1)
        got = dequantize(blocks, T.MXFP4)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.isinf(got).any() and (0 < np.abs(got[got != 0]).min() < np.finfo(np.float32).tiny)


def test_unsupported_type_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="TQ2_0 is not supported.*Q4_K"):
        dequantize(np.zeros(66, dtype=np.uint8), T.TQ2_0)


def test_partial_block_is_rejected() -> None:
    with pytest.raises(ValueError, match="whole number of Q8_0 blocks"):
        dequantize(np.zeros(35, dtype=np.uint8), T.Q8_0)
