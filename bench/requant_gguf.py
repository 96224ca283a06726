"""Rewrite a GGUF file with its layer weights in IQ4_XS, IQ4_NL, Q3_K or Q8_0: real weights
in types nothing here can download, for `make bench --model FILE` and the tests.

    python bench/requant_gguf.py SRC.gguf DST.gguf            # IQ4_XS, as llama.cpp's IQ4_XS recipe
    python bench/requant_gguf.py SRC.gguf DST.gguf --type IQ4_NL
    python bench/requant_gguf.py SRC.gguf DST.gguf --type Q3_K
    python bench/requant_gguf.py SRC.gguf DST.gguf --type Q8_0

Every 2-D `blk.*` weight is dequantized (textmill's loader) and quantized again; the token
embedding, the head and every other tensor keep their bytes, and all metadata is copied.
IQ4_XS and Q3_K need rows of a whole number of 256-value super-blocks: a tensor whose rows
are not (SmolLM2's K = 576) takes IQ4_NL instead, as llama.cpp's quantizer does.

The quantizers are simple, not llama.cpp's search. IQ4: per group of 32, the scale maps the
value of largest magnitude onto the table's end of the same sign, and each value takes its
nearest table entry; IQ4_XS then rounds the eight group scales of a super-block to 6-bit
multiples of one half. Q3_K: per 16 values, the scale maps the value of largest magnitude
onto -4 (ggml's make_q3_quants without its search), the sixteen scales of a super-block
are rounded to 6-bit multiples of one half (the largest onto -32), and each value takes the
nearest code in -4..3. Q8_0: ggml's own rule, d = (largest magnitude) / 127 per 32 values and
each code round(x / d). What the tests and the bench need is a valid file of real weights in
these types, not the best such file.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType, GGUFWriter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from textmill.loader.dequant import IQ4_VALUES, dequantize  # noqa: E402

_VALUES = IQ4_VALUES.astype(np.float32)
_MIDPOINTS = (_VALUES[1:] + _VALUES[:-1]) / 2


def _inverse(x: np.ndarray) -> np.ndarray:
    """1 / x, and 0 where x is 0 (an all-zero group), without dividing by zero."""
    return np.divide(1.0, x, out=np.zeros_like(x, dtype=np.float32), where=x != 0)


def _nearest(x: np.ndarray) -> np.ndarray:
    """Table index nearest to each value (x already divided by its scale)."""
    return np.searchsorted(_MIDPOINTS, x).astype(np.uint8)


def _nibbles(idx: np.ndarray) -> np.ndarray:
    """(..., 32) indices -> (..., 16) bytes: value j low nibble, value j + 16 high nibble."""
    return (idx[..., :16] | (idx[..., 16:] << 4)).astype(np.uint8)


def _peak(x: np.ndarray) -> np.ndarray:
    """(..., n) -> (...,): the value of largest magnitude, with its sign."""
    i = np.abs(x).argmax(-1)
    return np.take_along_axis(x, i[..., None], -1)[..., 0]


def _group_scales(w: np.ndarray) -> np.ndarray:
    """(..., 32) -> (...,) scales mapping each group's largest magnitude onto -127 or 113."""
    peak = _peak(w)
    return np.where(peak < 0, peak / -127.0, peak / 113.0).astype(np.float32)


def quantize_iq4_nl(w: np.ndarray) -> np.ndarray:
    """(N, K) float32, K % 32 == 0 -> (N, K / 32 * 18) uint8 blocks."""
    g = w.reshape(-1, 32)
    d = _group_scales(g).astype(np.float16)
    inv = _inverse(d.astype(np.float32))
    idx = _nearest(g * inv[:, None])
    blocks = np.concatenate([d[:, None].view(np.uint8), _nibbles(idx)], axis=1)
    return blocks.reshape(w.shape[0], -1)


def quantize_iq4_xs(w: np.ndarray) -> np.ndarray:
    """(N, K) float32, K % 256 == 0 -> (N, K / 256 * 136) uint8 blocks."""
    g = w.reshape(-1, 8, 32)
    s = _group_scales(g)  # (nb, 8)
    big = np.abs(s).max(-1)
    d = (big / 31.0).astype(np.float16)  # ls - 32 in -32..31
    df = d.astype(np.float32)
    inv_d = _inverse(df)
    ls = np.clip(np.rint(s * inv_d[:, None]), -32, 31).astype(np.int32) + 32  # (nb, 8), 6 bits
    dl = df[:, None] * (ls - 32).astype(np.float32)
    inv = _inverse(dl)
    idx = _nearest(g * inv[..., None])  # (nb, 8, 32)
    scales_h = np.zeros(len(g), dtype=np.uint16)
    for j in range(8):
        scales_h |= ((ls[:, j] >> 4) & 3).astype(np.uint16) << (2 * j)
    low = (ls & 0x0F).astype(np.uint8)
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)  # byte i: sub-blocks 2i (low) and 2i + 1 (high)
    blocks = np.concatenate([d[:, None].view(np.uint8), scales_h[:, None].view(np.uint8), scales_l,
                             _nibbles(idx).reshape(len(g), -1)], axis=1)
    return blocks.reshape(w.shape[0], -1)


def quantize_q3_k(w: np.ndarray) -> np.ndarray:
    """(N, K) float32, K % 256 == 0 -> (N, K / 256 * 110) uint8 blocks (ggml's block_q3_K:
    hmask[32], qs[64], scales[12], d)."""
    g = w.reshape(-1, 16, 16).astype(np.float32)  # super-blocks x 16 sub-blocks of 16
    nb = len(g)
    s = _peak(g) / -4.0  # (nb, 16): each sub-block's peak onto code -4
    d = (_peak(s) / -32.0).astype(np.float16)  # the largest scale onto -32
    df = d.astype(np.float32)
    ls = np.clip(np.rint(s * _inverse(df)[:, None]), -32, 31).astype(np.int32)  # (nb, 16)
    inv = _inverse(df[:, None] * ls.astype(np.float32))
    q = (np.clip(np.rint(g * inv[..., None]), -4, 3).astype(np.int32) + 4).reshape(nb, 256)  # 0..7
    # value v = 128h + 32j + l: its low 2 bits at bits 2j of qs[32h + l], its high bit at bit
    # 4h + j (= v // 32) of hmask[l]
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    qs = np.zeros((nb, 64), dtype=np.uint8)
    for v0 in range(0, 256, 32):
        hmask |= ((q[:, v0:v0 + 32] >> 2) << (v0 // 32)).astype(np.uint8)
        h, j = divmod(v0 // 32, 4)
        qs[:, 32 * h:32 * h + 32] |= ((q[:, v0:v0 + 32] & 3) << (2 * j)).astype(np.uint8)
    # scale i as 6 bits (ls + 32): its low nibble in byte i % 8 (the high nibble for i >= 8),
    # its top 2 bits at bits 2 (i // 4) of byte 8 + i % 4
    u = ls + 32
    scales = np.zeros((nb, 12), dtype=np.uint8)
    scales[:, :8] = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
    for i in range(16):
        scales[:, 8 + i % 4] |= ((u[:, i] >> 4) << (2 * (i // 4))).astype(np.uint8)
    blocks = np.concatenate([hmask, qs, scales, d[:, None].view(np.uint8)], axis=1)
    return blocks.reshape(w.shape[0], -1)


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """(N, K) float32, K % 32 == 0 -> (N, K / 32 * 34) uint8 blocks (ggml's quantize_row_q8_0)."""
    g = w.reshape(-1, 32)
    d = np.abs(g).max(-1) / 127.0
    codes = np.rint(g * _inverse(d)[:, None]).astype(np.int8)
    blocks = np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), codes.view(np.uint8)], axis=1)
    return blocks.reshape(w.shape[0], -1)


# type -> (values a block, bytes a block, quantizer, llama.cpp's general.file_type)
_TYPES = {T.IQ4_XS: (256, 136, quantize_iq4_xs, 30), T.IQ4_NL: (32, 18, quantize_iq4_nl, 25),
          T.Q3_K: (256, 110, quantize_q3_k, 11),  # 11: LLAMA_FTYPE_MOSTLY_Q3_K_S (Q3_K throughout)
          T.Q8_0: (32, 34, quantize_q8_0, 7)}  # 7: LLAMA_FTYPE_MOSTLY_Q8_0


def write_requant(src: Path, dst: Path, qtype: T = T.IQ4_XS) -> dict[str, int]:
    """Write dst; returns how many tensors took each type."""
    if qtype not in _TYPES:
        raise ValueError(f"--type must be one of {', '.join(t.name for t in _TYPES)}, not {qtype.name}")
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    w = GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer writes these itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        if name == "general.file_type":
            value = _TYPES[qtype][3]
        w.add_key_value(name, value, vtype, sub_type=sub)
    counts: dict[str, int] = {}
    planned = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # torch order: (rows, K)
        out_type = t.tensor_type
        if t.name.startswith("blk.") and len(shape) == 2 and t.name.endswith(".weight"):
            out_type = qtype if shape[1] % _TYPES[qtype][0] == 0 else T.IQ4_NL
        planned.append((t, shape, out_type))
        counts[out_type.name] = counts.get(out_type.name, 0) + 1
        if out_type == t.tensor_type:
            w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        else:
            per_block, nbytes = _TYPES[out_type][:2]
            row_bytes = shape[1] // per_block * nbytes
            w.add_tensor_info(t.name, (shape[0], row_bytes), np.dtype(np.uint8), shape[0] * row_bytes,
                              raw_dtype=out_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t, shape, out_type in planned:  # one tensor in memory at a time
        if out_type == t.tensor_type:
            w.write_tensor_data(t.data)
            continue
        values = dequantize(t.data, t.tensor_type).reshape(shape)
        w.write_tensor_data(_TYPES[out_type][2](values))
    w.close()
    tmp.replace(dst)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--type", default="IQ4_XS", choices=[t.name for t in _TYPES])
    args = p.parse_args(argv)
    counts = write_requant(args.src, args.dst, T[args.type])
    print(f"wrote {args.dst}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
