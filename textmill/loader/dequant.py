"""GGUF block bytes -> float32 values, vectorized over blocks with numpy.

Each quantized type stores fixed-size blocks; one block holds `block_size` values and takes
`type_size` bytes. The layouts follow ggml's `block_q*` structs (ggml-common.h): scales are
little-endian f16, nibbles are packed low half first. Every function here takes a (nb,
type_size) uint8 array and returns (nb, block_size) float32.

Inside a k-quant super-block of 256 values the 16-value groups always run in output order,
so "scale index = flat index // 16" (Q2_K, Q3_K, Q6_K) holds; that is why those functions
build the values in (nb, 256) order first and apply one scale per 16 afterwards.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from textmill.loader.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 at byte `start` of every block, as (nb, 1) float32."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return qs & 0x0F, qs >> 4


def _bits(packed: np.ndarray, n: int, width: int = 1) -> np.ndarray:
    """(..., L) uint8 -> (..., n, L): field i is bits [i*width, (i+1)*width) of each byte."""
    shifts = (np.arange(n, dtype=np.uint8) * width).reshape(n, 1)
    return (packed[..., None, :] >> shifts) & ((1 << width) - 1)


# --- plain floats -------------------------------------------------------------------------


def _f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view(np.float32)


def _f16_values(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view(np.float16).astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32: shift the 16 bits up and reinterpret.
    return (blocks.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- 32-value blocks ----------------------------------------------------------------------


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, qs: int8[32]
    q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (nb, 32)
    q *= _f16(blocks, 0)
    return q


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, qs: uint8[16]; value j is the low nibble of qs[j], value j+16 the high one.
    lo, hi = nibbles(blocks[:, 2:])
    q = np.concatenate([lo, hi], axis=1).astype(np.float32)  # (nb, 32)
    q -= 8.0
    q *= _f16(blocks, 0)
    return q


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16, m: f16, qs: uint8[16]; value = q * d + m
    lo, hi = nibbles(blocks[:, 4:])
    q = np.concatenate([lo, hi], axis=1).astype(np.float32)  # (nb, 32)
    q *= _f16(blocks, 0)  # in place: these arrays are the size of the whole tensor
    q += _f16(blocks, 2)
    return q


def q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Bit j of the 32-bit qh is the fifth bit of value j."""
    high = _bits(qh, 8).transpose(0, 2, 1).reshape(-1, 32)  # byte b, bit i -> value 8b + i
    lo, hi = nibbles(qs)
    return (np.concatenate([lo, hi], axis=1) | (high << 4)).astype(np.float32)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16, qh: uint8[4] (one uint32), qs: uint8[16]
    return _f16(blocks, 0) * (q5_values(blocks[:, 2:6], blocks[:, 6:]) - 16.0)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16, m: f16, qh: uint8[4], qs: uint8[16]
    return _f16(blocks, 0) * q5_values(blocks[:, 4:8], blocks[:, 8:]) + _f16(blocks, 2)


# --- 256-value k-quant super-blocks -------------------------------------------------------


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (nb, 8).

    Sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7
    take their low 4 bits from bytes 8-11 and their top 2 bits from the spare top bits of
    bytes 0-3 (scales) and 4-7 (mins).
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 63, (md & 0x0F) | ((d >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(nb, 128) -> (nb, 8, 32): each 32 bytes feed two sub-blocks, low nibbles first."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # d: f16, dmin: f16, scales: uint8[12], qs: uint8[128]
    sc, mn = k_scale_min(blocks[:, 4:16])
    q = k_nibbles(blocks[:, 16:]).astype(np.float32)  # (nb, 8, 32)
    d, dmin = _f16(blocks, 0)[:, :, None], _f16(blocks, 2)[:, :, None]
    return (d * sc[:, :, None] * q - dmin * mn[:, :, None]).reshape(-1, QK_K)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    # d: f16, dmin: f16, scales: uint8[12], qh: uint8[32], qs: uint8[128]
    sc, mn = k_scale_min(blocks[:, 4:16])
    high = _bits(blocks[:, 16:48], 8)  # (nb, 8, 32): bit i of qh[l] belongs to sub-block i
    q = (k_nibbles(blocks[:, 48:]) | (high << 4)).astype(np.float32)
    d, dmin = _f16(blocks, 0)[:, :, None], _f16(blocks, 2)[:, :, None]
    return (d * sc[:, :, None] * q - dmin * mn[:, :, None]).reshape(-1, QK_K)


def _per_16(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(nb, 256) values times one of 16 (nb, 16) scales per 16 consecutive values."""
    return (values.reshape(-1, 16, 16) * scales[:, :, None]).reshape(-1, QK_K)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql: uint8[128], qh: uint8[64], scales: int8[16], d: f16
    # Per half of 128 values: group g of 32 takes the low (g<2) or high (g>=2) nibbles of
    # ql[l] (g even) or ql[l+32] (g odd), and bits 2g..2g+1 of qh[l] as its top two bits.
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 2, 32)
    low4 = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    top2 = _bits(blocks[:, 128:192].reshape(-1, 2, 32), 4, width=2)  # (nb, 2, 4, 32)
    q = (low4 | (top2 << 4)).astype(np.float32).reshape(-1, QK_K) - 32.0
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return _f16(blocks, 208) * _per_16(q, scales)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    # scales: uint8[16] (low nibble scale, high nibble min), qs: uint8[64], d, dmin: f16
    # Value 128h + 32j + l (l < 32) is bits 2j..2j+1 of qs[32h + l].
    q = _bits(blocks[:, 16:80].reshape(-1, 2, 32), 4, width=2).astype(np.float32)
    scales = blocks[:, 0:16]
    sc = _f16(blocks, 80) * (scales & 0x0F).astype(np.float32)
    mn = _f16(blocks, 82) * (scales >> 4).astype(np.float32)
    return _per_16(q.reshape(-1, QK_K), sc) - np.repeat(mn, 16, axis=1)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """12 bytes -> sixteen signed 6-bit scales (nb, 16).

    Scale i: low 4 bits from byte i % 8 (low nibble for i < 8, high for i >= 8), top 2 bits
    from byte 8 + i % 4, bit pair i // 4.
    """
    low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1)  # (nb, 16)
    top = _bits(packed[:, 8:12], 4, width=2).reshape(-1, 16)  # pair p of byte b -> 4p + b
    return (low | (top << 4)).astype(np.float32) - 32.0


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    # hmask: uint8[32], qs: uint8[64], scales: uint8[12], d: f16
    # Value 128h + 32j + l: low bits 2j..2j+1 of qs[32h + l], high bit 4h + j of hmask[l];
    # a clear high bit means "subtract 4".
    low = _bits(blocks[:, 32:96].reshape(-1, 2, 32), 4, width=2).reshape(-1, QK_K)
    high = _bits(blocks[:, 0:32], 8).reshape(-1, QK_K)
    q = low.astype(np.float32) - 4.0 * (1 - high).astype(np.float32)
    return _f16(blocks, 108) * _per_16(q, _q3_k_scales(blocks[:, 96:108]))


# --- non-linear 4-bit types (IQ4_NL, IQ4_XS, MXFP4) ----------------------------------------

# The 16 values a 4-bit IQ4 code stands for (ggml's kvalues_iq4nl): spaced for the
# bell-shaped spread of weights, denser near zero. Every one is an int8.
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
# MXFP4's (ggml's kvalues_mxfp4): e2m1's values doubled, so that every one is an integer.
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)


def iq4_codes(qs: np.ndarray, values: np.ndarray = IQ4_VALUES) -> np.ndarray:
    """(nb, 16 g) nibbles of g 32-value groups (each: 16 bytes, values j and j + 16 in the
    low and high nibble of byte j) -> (nb, 32 g) int8 table values (IQ4's, or MXFP4's)."""
    nb = qs.shape[0]
    lo, hi = nibbles(qs.reshape(nb, -1, 16))
    return values[np.concatenate([lo, hi], axis=2).reshape(nb, -1)]


def mxfp4_scales(blocks: np.ndarray) -> np.ndarray:
    """(nb, 1) float32: each MXFP4 block's scale 2^(e - 128) from its E8M0 byte e (ggml's
    e8m0_to_fp32_half; 2^-128 and 2^-127 are float32 subnormals, exact)."""
    return np.ldexp(np.float32(1), blocks[:, :1].astype(np.int32) - 128).astype(np.float32)


def iq4_xs_scales(blocks: np.ndarray) -> np.ndarray:
    """(nb, 8) float32: each 32-value sub-block's scale d * (ls - 32), ls a 6-bit integer
    whose low 4 bits are a nibble of scales_l (bytes 4..7) and top 2 bits a pair of
    scales_h (the uint16 at byte 2)."""
    low = _bits(blocks[:, 4:8], 2, width=4).transpose(0, 2, 1).reshape(-1, 8)  # sub-block 2i + j: nibble j of byte i
    high = (blocks[:, 2:4].copy().view(np.uint16) >> (2 * np.arange(8, dtype=np.uint16))) & 3  # (nb, 8)
    ls = low.astype(np.int32) | (high.astype(np.int32) << 4)
    return _f16(blocks, 0) * (ls - 32).astype(np.float32)


def _iq4_nl(blocks: np.ndarray) -> np.ndarray:
    # d: f16, qs: uint8[16]; value = d * IQ4_VALUES[q]
    return _f16(blocks, 0) * iq4_codes(blocks[:, 2:]).astype(np.float32)


def _iq4_xs(blocks: np.ndarray) -> np.ndarray:
    # d: f16, scales_h: uint16, scales_l: uint8[4], qs: uint8[128]; eight sub-blocks of 32
    q = iq4_codes(blocks[:, 8:]).astype(np.float32).reshape(-1, 8, 32)
    return (iq4_xs_scales(blocks)[:, :, None] * q).reshape(-1, QK_K)


def _mxfp4(blocks: np.ndarray) -> np.ndarray:
    # e: u8, qs: uint8[16]; value = 2^(e - 128) * MXFP4_VALUES[q]
    return mxfp4_scales(blocks) * iq4_codes(blocks[:, 1:], MXFP4_VALUES).astype(np.float32)


_Kernel = Callable[[np.ndarray], np.ndarray]


# --- the 1- to 3-bit IQ types ------------------------------------------------------------
#
# Their blocks index lattice grids (256 to 2048 rows of 4 or 8 small integers each): the
# tables are gguf-py's (iq_grid), not copied here; the C++ converter takes them from it too.


def iq_grid(qtype: GGMLQuantizationType) -> np.ndarray | None:
    """An IQ type's grid as (rows, width) int8 values (IQ2: 8/25/43, IQ3_XXS: 4..62, IQ3_S:
    1..15, IQ1: -1/0/1), or None for a type without one."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in IQ_GRID_TYPES:
        return None
    from gguf import quants  # only for a type with a grid: importing gguf-py costs ~47 ms

    cls = getattr(quants, qtype.name)
    cls.init_grid()  # built once per process, held by gguf-py's class
    return cls.grid.reshape(cls.grid_shape).astype(np.int8)


def _gguf_reference(qtype: GGMLQuantizationType) -> _Kernel:
    """gguf-py's own numpy dequantizer: the reference for the IQ types the C++ converter
    decodes (kernels/csrc/gguf_blocks.h gives its values bit for bit), and their path where
    the kernels cannot be built."""
    def kernel(blocks: np.ndarray) -> np.ndarray:
        from gguf import quants  # on first use: importing gguf-py costs every start ~47 ms

        return quants.dequantize(blocks, qtype).astype(np.float32, copy=False).reshape(len(blocks), -1)

    return kernel


def _iq1_m(blocks: np.ndarray) -> np.ndarray:
    # qs[32] (low 8 index bits per 8 values), qh[16] (a nibble per 8: 3 more index bits and
    # the delta's sign), four uint16 of 3-bit scales per 16 values whose top nibbles make d:
    # w = d (2 s + 1) (grid + delta). gguf-py's IQ1_M reads every delta as negative (its
    # `qh & 0x08 == 0` is `qh & False`), so this follows ggml's dequantize_row_iq1_m instead.
    nb = len(blocks)
    grid = iq_grid(GGMLQuantizationType.IQ1_M).astype(np.float32)
    sc = blocks[:, 48:56].copy().view(np.uint16)  # (nb, 4)
    dbits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = dbits.astype(np.uint16).view(np.float16).astype(np.float32).reshape(nb, 1)
    s3 = ((sc[:, :, None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7).reshape(nb, 16)
    dl = d * (2 * s3 + 1).astype(np.float32)  # (nb, 16): one per 16 values
    nib = ((blocks[:, 32:48, None] >> np.array([0, 4], dtype=np.uint8)) & 15).reshape(nb, 32)  # one per 8
    index = blocks[:, :32].astype(np.int64) | ((nib & 7).astype(np.int64) << 8)
    delta = np.where(nib & 8, np.float32(-0.125), np.float32(0.125))
    values = (grid[index] + delta[..., None]).reshape(nb, 16, 16)
    return (dl[..., None] * values).reshape(nb, QK_K)


# The types read through gguf-py's reference (see _gguf_reference), and every type with a grid.
REFERENCE_TYPES = tuple(GGMLQuantizationType[name] for name in (
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S"))
IQ_GRID_TYPES = frozenset(REFERENCE_TYPES) | {GGMLQuantizationType.IQ1_M}


def _kernels() -> dict[GGMLQuantizationType, _Kernel]:
    T = GGMLQuantizationType
    return {
        T.F32: _f32, T.F16: _f16_values, T.BF16: _bf16,
        T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
        T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
        T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs, T.MXFP4: _mxfp4,
        **{t: _gguf_reference(t) for t in REFERENCE_TYPES}, T.IQ1_M: _iq1_m,
    }  # fmt: skip


SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_kernels())


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Raw tensor bytes (any shape, any dtype viewable as bytes) -> flat float32 values."""
    kernel = _kernels().get(GGMLQuantizationType(qtype))
    if kernel is None:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"GGUF tensor type {GGMLQuantizationType(qtype).name} is not supported "
                         f"(supported: {names})")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size % type_size:
        raise ValueError(f"{data.size} bytes is not a whole number of {qtype.name} blocks")
    return kernel(data.reshape(-1, type_size)).reshape(-1)
