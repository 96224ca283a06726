"""A lean GGUF reader: metadata scalars, tensor infos, and memory-mapped tensor bytes (and
GGUFMetadata, which reads a key with the file's `{arch}.` prefix).

gguf.GGUFReader builds a numpy view for every part of every field, which takes tens of
seconds on a 262k-token vocabulary (Gemma 3). The loader needs the scalars and the tensors,
so this reader walks string arrays without keeping them and maps tensor data lazily.
Layout (GGUF v2/v3, little-endian): magic, version, tensor count, kv count, the key/values,
the tensor infos, padding to `general.alignment`, then the tensor data.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from textmill.loader.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class StringArray:
    """A string array's place holder: the loader only ever needs its length."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (GGUF lists ne0, the innermost, first)
    qtype: GGMLQuantizationType
    data: np.ndarray  # (nbytes,) uint8, a view into the memory map


class _Cursor:
    def __init__(self, buf: np.ndarray, keep_strings: bool = False) -> None:
        self.buf = buf
        self.raw = memoryview(buf)
        self.pos = 0
        self.keep_strings = keep_strings  # string arrays: read (the vocabulary) or skipped

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        text = bytes(self.raw[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        if vtype not in _SCALAR:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.scalar(_SCALAR[vtype])

    def array(self) -> list | StringArray:
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type])
            values = np.frombuffer(self.raw, dtype, count, self.pos).tolist()
            self.pos += dtype.itemsize * count
            return [bool(v) for v in values] if item_type == 7 else values
        if item_type == _STRING and not self.keep_strings:
            # skip: (u64 length, bytes) each; a bound unpack and locals keep this tight loop
            # (777k strings for Gemma 3's tokens and merges) at half the time.
            unpack, raw, pos = _U64.unpack_from, self.raw, self.pos
            for _ in range(count):
                pos += 8 + unpack(raw, pos)[0]
            self.pos = pos
            return StringArray(count)
        return [self.value(item_type) for _ in range(count)]


def _open(path: Path, keep_strings: bool) -> tuple[np.ndarray, _Cursor, int, dict[str, Any]]:
    if keep_strings:
        return _parse(path, keep_strings=True)
    # A start reads the same header three times (the plan's tensor types, the weights, the
    # tokenizer's cache key): ~0.2-0.3 s each for a 262k-token vocabulary. The parse of an
    # unchanged file is reused, keyed by the file's identity, like an import.
    st = path.stat()
    buf, pos, n_tensors, metadata = _parse_header(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    cursor = _Cursor(buf)
    cursor.pos = pos
    return buf, cursor, n_tensors, dict(metadata)


@functools.lru_cache(maxsize=4)
def _parse_header(path: str, inode: int, size: int, mtime_ns: int) -> tuple[np.ndarray, int, int, dict[str, Any]]:
    buf, cursor, n_tensors, metadata = _parse(Path(path), keep_strings=False)
    return buf, cursor.pos, n_tensors, metadata


def _parse(path: Path, keep_strings: bool) -> tuple[np.ndarray, _Cursor, int, dict[str, Any]]:
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    if buf.size < 24 or bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    cursor = _Cursor(buf, keep_strings)
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    return buf, cursor, n_tensors, metadata


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key/value of a GGUF file, string arrays included (the tokenizer's view)."""
    return _open(Path(path), keep_strings=True)[3]


def metadata_region(path: Path) -> np.ndarray:
    """The raw bytes of a GGUF file's header and metadata, nothing decoded (uint8, mapped):
    a cache key for whatever is derived from the metadata alone (the tokenizer)."""
    buf, cursor, _, _ = _open(Path(path), keep_strings=False)
    return buf[:cursor.pos]


class GGUFFile:
    """metadata: every key -> value (string arrays as StringArray); tensors in file order."""

    def __init__(self, path: Path) -> None:
        buf, cursor, n_tensors, self.metadata = _open(Path(path), keep_strings=False)
        infos = [self._tensor_info(cursor) for _ in range(n_tensors)]
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-cursor.pos // align) * align
        self.tensors = [self._tensor(buf, start, *info) for info in infos]

    @staticmethod
    def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cursor.string()
        dims = tuple(cursor.scalar("<Q") for _ in range(cursor.scalar("<I")))
        return name, tuple(reversed(dims)), cursor.scalar("<I"), cursor.scalar("<Q")

    @staticmethod
    def _tensor(buf: np.ndarray, start: int, name: str, shape: tuple[int, ...],
                qtype: int, offset: int) -> TensorInfo:
        qtype = GGMLQuantizationType(qtype)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
        begin = start + offset
        if begin + nbytes > buf.size:
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated download?)")
        return TensorInfo(name, shape, qtype, buf[begin:begin + nbytes])


_MISSING = object()


class GGUFMetadata:
    """Access to a file's key/value metadata, with the `{arch}.` prefix handled."""

    def __init__(self, gguf: GGUFFile) -> None:
        self._fields = gguf.metadata
        self.arch = str(self.get("general.architecture"))

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self._fields:
            if default is _MISSING:
                raise ValueError(f"GGUF metadata lacks {key!r}")
            return default
        return self._fields[key]

    def arch_get(self, key: str, default: Any = _MISSING) -> Any:
        return self.get(f"{self.arch}.{key}", default)
