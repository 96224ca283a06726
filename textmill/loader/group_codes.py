"""GGUF blocks -> integer codes in groups of 32, without a float copy of the weights.

The CPU kernels (runner/qlinear.py) take weights as codes in groups of 32 along the input
dimension, in one of these forms (and IQ4's and MXFP4's, below):

* 3 bits: codes 0..7, a scale per half group (16 weights): w = d_h * (q - 4);
* 4 bits: codes 0..15, a scale d and a min m per group: w = d * q + m;
* 5 bits: codes 0..31, the same scale and min per group;
* 6 bits: codes 0..63, a scale per half group (16 weights): w = d_h * (q - 32);
* 8 bits: codes -127..127, a scale d per group: w = d * q.

Most GGUF types map onto these directly, so a file's weights reach the kernels as the file
stores them and loading is a reshuffle of bytes, not a dequantize-and-requantize:

| GGUF  | form | how                                                    | exact?            |
|-------|------|--------------------------------------------------------|-------------------|
| Q4_0  | 4    | d, m = -8 d                                            | yes               |
| Q4_1  | 4    | d, m                                                   | yes               |
| Q4_K  | 4    | per 32-value sub-block: d * scale, -dmin * min         | scales to half    |
| Q8_0  | 8    | d, q                                                   | yes               |
| Q5_0  | 5    | d, m = -16 d                                           | yes               |
| Q5_1  | 5    | d, m                                                   | yes               |
| Q5_K  | 5    | per 32 weights: d * scale, -dmin * min                 | scales to half    |
| Q6_K  | 6    | per 16 weights: d * scale; q                           | scales to half    |
| Q3_K  | 3    | per 16 weights: d * scale; q + 4 (q in -4..3)          | scales to half    |
| Q2_K  | 8    | dequantize, round to 8 bits per group of 32            | a second rounding |
| IQ4_NL| 8    | d; q = the code's table value (an int8)                | yes               |
| IQ4_XS| 8    | per 32 weights: d * (scale - 32); q as IQ4_NL's        | scales to half    |
| MXFP4 | 8    | 2^(e - 128); q = the code's table value (-12..12)      | yes               |
| others| 8    | dequantize one tensor, round to 8 bits per group of 32 | a second rounding |

The 1- to 3-bit IQ types (a grid row of small integers per 4 or 8 weights, with signs) take
these forms in the C++ converter, from the file's bytes in one pass; here, in Python, they
are the "others" (gguf-py's dequantizer, then 8 bits):

| GGUF   | form | how                                                         | exact?            |
|--------|------|-------------------------------------------------------------|-------------------|
| IQ3_S  | 4    | odd values v in -15..15: q = (v + 15) / 2, d = 2 s, m = -15 s | scales to half  |
| IQ1_S  | 4    | v in -1..1 at a shift delta: q = v + 1, d = s, m = s (delta - 1) | scales to half |
| IQ3_XXS| 6    | even values v in -62..62: q = v / 2, per 16 weights 2 s     | scales to half    |
| IQ1_M  | 6    | v in -1..1 at a shift of +-1/8 per 8: q = 8 v +- 1, per 16 s / 8 | scales to half |
| IQ2_XXS, IQ2_XS, IQ2_S | iq2 | v in (-43, -25, -8, 8, 25, 43) as a 4-bit index, per 16 weights s | scales to half |

(Q3_K takes a 3-bit form of its own: its codes and 16-weight scales as they are, 4 bits a
weight where 8-bit codes took 8.5; the kernels compute it as the 6-bit form on its codes
+ 28, so it can also stand in that form. Q2_K takes a 2-bit form: its codes 0..3 with its
scale and min per 16 weights, each rounded to a half as Q4_K's, 4 bits a weight; here, and
beside an 8-bit part, it is rounded to 8 bits as the "others" are.)

Only the C++ converter (kernels/csrc/gguf_blocks.h, QLinear.from_file) writes the 2-, 3-, 5-
and 6-bit forms and the IQ2 form (and the 4-bit form of IQ3_S and IQ1_S); the converters here give those types 8-bit codes, the path of a tensor whose
scales do not fit a half (and of such a part fused with an 8-bit one).

Q4_K's sub-block scale d * sc (a half times a 6-bit integer) is rounded to a half: a
relative error below 2^-11 on the scale, against the 2^-4 of the 4-bit codes themselves.
IQ4_NL and IQ4_XS index a table of 16 int8 values (non-linear steps). Here they take the
8-bit form with the table's values as codes; the C++ converter packs them in the kernels'
IQ4 form instead (the file's 4-bit indices, looked up in the kernel: 4.5 bits a weight, not
8.5), which computes the same sums. MXFP4 (gpt-oss's experts) is that structure on another
table (e2m1's values doubled) and a power-of-two scale: 8 bits here, its own mxfp4 form in
C++. Its scale is exact in a half for e - 128 in -24..15; a tensor with a group past that
(one holding a nonzero value) takes the 8-bit rounding of the "others". The "others" (the 1-
to 3-bit IQ types; Q2_K in C++) keep at least their own precision: 8-bit codes on a scale of
max|w|/127 round to a quarter or less of a 6-bit type's own step. docs/architecture.md says
why these are repacked rather than run on their own blocks.
"""
from __future__ import annotations

import mmap
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from textmill.loader.dequant import (MXFP4_VALUES, dequantize, iq_grid, iq4_codes, iq4_xs_scales, k_nibbles,
                                    k_scale_min, mxfp4_scales, nibbles, q5_values)
from textmill.loader.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

GROUP = 32
T = GGMLQuantizationType
# The types that map onto the 4-bit form exactly (or, for Q4_K, up to the scales' rounding).
FOUR_BIT_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})
# The types the C++ converter packs in the 5- and 6-bit forms (6 and 7 bits a weight where
# 8-bit codes take 8.5, and without a second rounding), and in the 3-bit form (4 bits).
FIVE_BIT_TYPES = frozenset({T.Q5_0, T.Q5_1, T.Q5_K})
SIX_BIT_TYPES = frozenset({T.Q6_K})
# Q3_K takes the kernels' 3-bit form (its codes and 16-weight scales as they are), Q2_K the
# 2-bit form (its codes, 16-weight scales and mins).
THREE_BIT_TYPES = frozenset({T.Q3_K})
TWO_BIT_TYPES = frozenset({T.Q2_K})
# The k-quants with a form of their own: their super-blocks' halves and 6- or 8-bit scales as
# they are (runner/qlinear.py's q4k, q5k, q6k).
K_FORMS = {T.Q4_K: "q4k", T.Q5_K: "q5k", T.Q6_K: "q6k"}
# The types it packs in a form of 4-bit indices into a table, one scale per 32: IQ4's, MXFP4's.
LOOKUP_FORMS = {T.IQ4_NL: "iq4", T.IQ4_XS: "iq4", T.MXFP4: "mxfp4"}
# The IQ types the C++ converter packs in a form narrower than 8 bits (module docstring).
IQ_FORMS = {T.IQ3_S: "q4", T.IQ1_S: "q4", T.IQ3_XXS: "q6", T.IQ1_M: "q6", T.IQ2_XXS: "iq2", T.IQ2_XS: "iq2",
            T.IQ2_S: "iq2"}
# The types the C++ converter (kernels/csrc/gguf_blocks.h) packs straight from the file:
# every type a GGUF model's matrices come in (F64 and the integer types aside).
PACKED_FROM_FILE_TYPES = frozenset({T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                                    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4,
                                    T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M})
_HALF_MAX = 65504.0


@dataclass(frozen=True)
class GroupCodes:
    """An (N, K) weight as codes in groups of 32 along K: w = scale * code (+ min)."""

    bits: int  # 4: codes uint8 0..15 with a min; 8: codes int8 -127..127, min None
    codes: torch.Tensor  # (N, K) uint8 or int8
    scale: torch.Tensor  # (N, K / 32) float16
    min: torch.Tensor | None  # (N, K / 32) float16, bits == 4 only
    source: str  # the GGUF type it came from, for the log

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def rows(self, index: torch.Tensor) -> "GroupCodes":
        """The same weight with its output rows reordered (llama.cpp's q/k permutation)."""
        # numpy's row gather: torch's index_select on uint8/int8 is ~300x slower (measured)
        pick = lambda t: None if t is None else torch.from_numpy(np.ascontiguousarray(t.numpy()[index.numpy()]))  # noqa: E731
        return GroupCodes(self.bits, pick(self.codes), pick(self.scale), pick(self.min), self.source)

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32: the weights these codes stand for."""
        n, k = self.shape
        w = self.codes.float().view(n, k // GROUP, GROUP) * self.scale.float()[..., None]
        if self.min is not None:
            w = w + self.min.float()[..., None]
        return w.view(n, k)


@dataclass(frozen=True)
class CodesRef:
    """One GGUF tensor, converted to GroupCodes only when read: the runner packs each weight
    as it converts it, so a load never holds more than one layer's codes beside the packed
    weights (holding them all doubled a 1B model's peak memory)."""

    raw: np.ndarray  # the tensor's bytes in the mapped file
    qtype: GGMLQuantizationType
    shape: tuple[int, int]
    row_order: torch.Tensor | None = None  # output rows reordered (llama.cpp's q/k permutation)

    @property
    def source(self) -> str:
        return GGMLQuantizationType(self.qtype).name

    @property
    def bits(self) -> int:
        """The width of the codes from_gguf gives this tensor: 4 or 8 (see the module's table)."""
        return 4 if self.qtype in FOUR_BIT_TYPES else 8

    @property
    def form(self) -> str:
        """The kernel form the C++ converter packs this tensor into: q2, q3, q4, q4k, q5, q5k,
        q6, q6k, q8, iq4, mxfp4 or iq2 (runner/qlinear.py's modes)."""
        if self.qtype in K_FORMS:
            return K_FORMS[self.qtype]
        if self.qtype in FOUR_BIT_TYPES:
            return "q4"
        if self.qtype in IQ_FORMS:
            return IQ_FORMS[self.qtype]
        if self.qtype in THREE_BIT_TYPES:
            return "q3"
        if self.qtype in TWO_BIT_TYPES:
            return "q2"
        if self.qtype in LOOKUP_FORMS:
            return LOOKUP_FORMS[self.qtype]
        return "q5" if self.qtype in FIVE_BIT_TYPES else "q6" if self.qtype in SIX_BIT_TYPES else "q8"

    def flat_bytes(self) -> torch.Tensor:
        """The tensor's bytes as a 1-D uint8 tensor over the mapped file (no copy)."""
        return _flat_bytes(self.raw)

    def grid(self) -> torch.Tensor:
        """The C++ converter's grid argument for this tensor's type (iq_grid_tensor)."""
        return iq_grid_tensor(self.qtype)

    def load(self) -> GroupCodes:
        codes = from_gguf(self.raw, self.qtype, self.shape)
        return codes if self.row_order is None else codes.rows(self.row_order)


def concat(parts: list[GroupCodes]) -> GroupCodes:
    """Stack weights along N (q, k, v into one qkv matmul); all of one form."""
    assert len({p.bits for p in parts}) == 1, "concatenating 4- and 8-bit codes"
    mins = None if parts[0].min is None else torch.cat([p.min for p in parts])
    return GroupCodes(parts[0].bits, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                      mins, "+".join(sorted({p.source for p in parts})))


def convertible(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> bool:
    """A 2-D tensor whose rows split into groups of 32 (every GGUF block type's do)."""
    return len(shape) == 2 and shape[1] % GROUP == 0 and shape[0] > 0


def from_gguf(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> GroupCodes:
    """One GGUF tensor's bytes (rows of K values, (N, K) in torch order) -> GroupCodes."""
    qtype = GGMLQuantizationType(qtype)
    n, k = shape
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(-1, type_size)
    convert = _CONVERTERS.get(qtype)
    if convert is None:
        return requantize_8bit(torch.from_numpy(dequantize(raw, qtype).reshape(n, k)), qtype.name)
    bits, codes, scale, mins = convert(blocks)
    # Checked in float32 before the cast (torch's isfinite on halves is ~50x slower): a
    # k-quant scale product past a half's range keeps its values and is rounded again.
    if not all(np.all(np.abs(a) < _HALF_MAX) for a in (scale, mins) if a is not None):
        return requantize_8bit(torch.from_numpy(dequantize(raw, qtype).reshape(n, k)), qtype.name)
    as_half = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(n, k // GROUP)).half()  # noqa: E731
    scale_h, min_h = as_half(scale), None if mins is None else as_half(mins)
    codes_t = torch.from_numpy(np.ascontiguousarray(codes).reshape(n, k))
    return GroupCodes(bits, codes_t, scale_h, min_h, qtype.name)


def release_file_pages(arrays: list[np.ndarray]) -> int:
    """Give back the mapped file's pages that loading read: once the weights are packed, the
    file's copy in this process's memory is dead weight (a 1B Q4_K_M file is ~700 MB of
    resident memory beside its packed copy). The mapping stays valid: a later read (an
    embedding row) faults its page in again from the page cache. Returns the bytes released."""
    roots: dict[int, np.ndarray] = {}
    for a in arrays:
        while isinstance(a.base, np.ndarray):
            a = a.base
        roots[id(a)] = a
    released = 0
    for root in roots.values():
        mapping = root.base
        # Read-only maps only (np.memmap mode "r"): MADV_DONTNEED would drop a private
        # mapping's written pages, so anything writable is left alone.
        if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") and not root.flags.writeable:
            mapping.madvise(mmap.MADV_DONTNEED)
            released += len(mapping)
    return released


def iq_grid_tensor(qtype: GGMLQuantizationType) -> torch.Tensor:
    """An IQ type's grid (dequant.iq_grid) as the C++ converter takes it; empty for the
    types without one."""
    grid = iq_grid(qtype)
    return torch.empty(0, dtype=torch.int8) if grid is None else torch.from_numpy(grid)


def _flat_bytes(raw: np.ndarray) -> torch.Tensor:
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # the map is read-only; nothing writes through this view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat)


class GGUFRows:
    """An embedding table left in the file's own blocks (memory-mapped): a lookup
    dequantizes just the rows a step asks for, so a 262k x 640 table costs no resident
    float copy (Gemma 3's would be 671 MB in float32)."""

    def __init__(self, raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]):
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        self.qtype, self.shape = GGMLQuantizationType(qtype), shape
        self.raw = raw
        self._rows = raw.reshape(-1).view(np.uint8).reshape(shape[0], shape[1] // block_size * type_size)

    def flat_bytes(self) -> torch.Tensor:
        """The table's bytes as a 1-D uint8 tensor over the mapped file (no copy)."""
        return _flat_bytes(self.raw)

    def grid(self) -> torch.Tensor | None:
        """The C++ lookup's grid argument for an IQ table, None for the other types."""
        grid = iq_grid(self.qtype)
        return None if grid is None else torch.from_numpy(grid)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N,) int64 -> (N, C) float32."""
        raw = self._rows[ids.numpy()]  # fancy indexing copies only these rows out of the map
        return torch.from_numpy(dequantize(raw, self.qtype).reshape(len(raw), self.shape[1]))


def requantize_8bit(weight: torch.Tensor, source: str) -> GroupCodes:
    """float (N, K) -> 8-bit codes: per group d = max|w| / 127 as a half, q = round(w / d)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // GROUP, GROUP)
    amax = w.abs().amax(dim=-1)
    if not torch.isfinite(amax).all() or amax.max() / 127.0 >= _HALF_MAX:
        raise ValueError(f"a {source} weight has values that half-precision scales cannot hold")
    d = (amax / 127.0).half()
    inv = torch.where(d > 0, 1.0 / d.float(), torch.zeros_like(amax))
    codes = torch.round(w * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return GroupCodes(8, codes.view(n, k), d, None, source)


# --- one function per block type: (nb, type_size) uint8 -> (bits, codes, scale, min) ---------


def _f16_col(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)  # (nb, 1)


def _q4_0(blocks: np.ndarray):
    lo, hi = nibbles(blocks[:, 2:])
    d = _f16_col(blocks, 0)
    return 4, np.concatenate([lo, hi], axis=1), d, -8.0 * d  # -8 d: exact in half


def _q4_1(blocks: np.ndarray):
    lo, hi = nibbles(blocks[:, 4:])
    return 4, np.concatenate([lo, hi], axis=1), _f16_col(blocks, 0), _f16_col(blocks, 2)


def _q4_k(blocks: np.ndarray):
    # Eight sub-blocks of 32 per super-block of 256, each w = (d sc) q - (dmin mn).
    sc, mn = k_scale_min(blocks[:, 4:16])  # (nb, 8) each
    d, dmin = _f16_col(blocks, 0), _f16_col(blocks, 2)
    return 4, k_nibbles(blocks[:, 16:]), d * sc, -(dmin * mn)


def _q8_0(blocks: np.ndarray):
    return 8, blocks[:, 2:].view(np.int8), _f16_col(blocks, 0), None


def _q5_0(blocks: np.ndarray):
    codes = (q5_values(blocks[:, 2:6], blocks[:, 6:]) - 16.0).astype(np.int8)
    return 8, codes, _f16_col(blocks, 0), None


def _iq4_nl(blocks: np.ndarray):
    return 8, iq4_codes(blocks[:, 2:]), _f16_col(blocks, 0), None


def _iq4_xs(blocks: np.ndarray):
    # Eight sub-blocks of 32 per super-block of 256, each w = (d (ls - 32)) table[q].
    return 8, iq4_codes(blocks[:, 8:]), iq4_xs_scales(blocks), None


def _mxfp4(blocks: np.ndarray):
    codes, scale = iq4_codes(blocks[:, 1:], MXFP4_VALUES), mxfp4_scales(blocks)
    # A scale below a half's 2^-24 would round: marked past the range (from_gguf then rounds the
    # tensor to 8 bits), except on a group of zeros, which scale 0 holds exactly.
    tiny = (scale < 2.0**-24) & codes.any(axis=1, keepdims=True)
    return 8, codes, np.where(tiny, np.inf, np.where(scale < 2.0**-24, 0, scale)), None


_CONVERTERS = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k, T.Q8_0: _q8_0, T.Q5_0: _q5_0,
               T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs, T.MXFP4: _mxfp4}
