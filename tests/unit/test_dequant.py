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
    T.IQ4_NL: (0,), T.IQ4_XS: (0,),
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
}  # fmt: skip
NUM_BLOCKS = 64


def random_blocks(qtype: T, rng: np.random.Generator) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(NUM_BLOCKS, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = rng.uniform(-2.0, 2.0, size=NUM_BLOCKS).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(NUM_BLOCKS, 2)
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


QUANTIZABLE_BITS = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.BF16: 8}


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
    assert SUPPORTED_TYPES == set(F16_FIELDS) | {T.F32, T.F16, T.BF16}


def test_unsupported_type_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="IQ1_M is not supported.*Q4_K"):
        dequantize(np.zeros(56, dtype=np.uint8), T.IQ1_M)


def test_partial_block_is_rejected() -> None:
    with pytest.raises(ValueError, match="whole number of Q8_0 blocks"):
        dequantize(np.zeros(35, dtype=np.uint8), T.Q8_0)
