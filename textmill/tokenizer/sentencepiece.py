"""SentencePiece BPE vocabularies: U+2581 for a space, <0xNN> byte-fallback tokens, and
the merges a vocabulary's scores imply.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

def sentencepiece_bytes(tokens: Sequence[str]) -> list[bytes]:
    """The bytes of SentencePiece tokens: "<0xNN>" byte-fallback tokens are one byte, and
    U+2581 stands for a space everywhere else (HF's Replace + ByteFallback decoders)."""
    out = []
    for token in tokens:
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                out.append(bytes([int(token[3:5], 16)]))
                continue
            except ValueError:
                pass
        out.append(token.replace("\u2581", " ").encode("utf-8"))
    return out


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two
    tokens, best merged-token score first, then by piece lengths and ids. This is the order
    transformers' converters recover, so ranks (and so ids) match the reference tokenizer.

    Gemma's 262k tokens have 1.2M splits; looking each one up in Python took seconds, so the
    splits are found with array operations (spm_merges_arrays). The loop (spm_merges_reference)
    states the rule, and still serves the vocabularies the arrays cannot take."""
    found = spm_merges_arrays(vocab, scores)
    return found if found is not None else spm_merges_reference(vocab, scores)


def spm_merges_reference(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    merges: list[tuple[float, int, int, str, str]] = []
    for token, score in scores.items():
        pairs = []
        for i in range(1, len(token)):
            left = token[:i]
            if left in vocab:
                right = token[i:]
                if right in vocab:
                    pairs.append((vocab[left], vocab[right], left, right))
        if len(pairs) > 1:
            pairs.sort()
        merges.extend((score, len(left), len(right), left, right) for _, _, left, right in pairs)
    # Stable, and reverse keeps equal keys in their original order.
    merges.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(m[3], m[4]) for m in merges]


# An odd multiplier is invertible modulo 2**64, so that prefix sums give the hash of any
# substring (see _CodePoints.hashes).
_HASH_BASE = 0x9E3779B97F4A7C15
_HASH_BASE_INVERSE = pow(_HASH_BASE, -1, 1 << 64)


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64 (uint64 products wrap)."""
    out = np.ones(n, dtype=np.uint64)
    if n > 1:
        np.cumprod(np.full(n - 1, base, dtype=np.uint64), out=out[1:])
    return out


class _CodePoints:
    """Strings laid end to end as one array of code points, with the hash of any substring."""

    def __init__(self, strings: list[str]) -> None:
        # surrogatepass: one array item per str item, whatever the str holds
        self.cp = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype="<u4")
        self.lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
        self.starts = np.zeros(len(strings) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.starts[1:])
        n = len(self.cp)
        self._power = _powers(_HASH_BASE, n)
        # code point + 1: a zero digit would hash "\0" and "\0\0" alike
        digits = self.cp.astype(np.uint64) + np.uint64(1)
        self._prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(digits * _powers(_HASH_BASE_INVERSE, n), out=self._prefix[1:])

    def hashes(self, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
        """hash(cp[begin:end]) = sum((cp[j] + 1) * BASE**(end-1-j)) mod 2**64 for end > begin,
        from the prefix sums of (cp[j] + 1) * BASE**-j: it depends on the code points only,
        not on where they lie."""
        return (self._prefix[end] - self._prefix[begin]) * self._power[end - 1]


def _lexsort_unique(keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """np.lexsort(keys) (the last key first) for rows that all differ: as one packed int64
    key where the ranges fit in 63 bits, which sorts several times faster."""
    if not len(keys[0]):
        return np.zeros(0, dtype=np.int64)
    lows = [k.min() for k in keys]
    widths = [int(k.max() - low).bit_length() for k, low in zip(keys, lows)]
    if sum(widths) > 63:
        return np.lexsort(keys)
    packed = np.zeros(len(keys[0]), dtype=np.int64)
    for key, low, width in zip(reversed(keys), reversed(lows), reversed(widths)):
        packed = (packed << width) | (key - low)
    return np.argsort(packed)


class _HashIndex:
    """uint64 hash -> value, for arrays of hashes at once. The hashes are sorted by bucket (the
    top bits of hash * an odd constant, as the polynomial hashes of short strings are small
    numbers), about two buckets per hash, so that a lookup reads one or two entries."""

    _SPREAD = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, hashes: np.ndarray, values: np.ndarray) -> None:
        bits = len(hashes).bit_length() + 1
        self._shift = np.uint64(64 - bits)
        order = np.argsort(self._bucket(hashes))
        self._hashes, self._values = hashes[order], values[order]
        self._bucket_start = np.searchsorted(self._bucket(self._hashes), np.arange((1 << bits) + 1))
        by_value = np.sort(hashes)
        self.unique = len(hashes) > 0 and not (by_value[1:] == by_value[:-1]).any()

    def _bucket(self, hashes: np.ndarray) -> np.ndarray:
        return ((hashes * self._SPREAD) >> self._shift).astype(np.int64)

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """The value of each hash, or -1."""
        bucket = self._bucket(hashes)
        at, end = self._bucket_start[bucket], self._bucket_start[bucket + 1]
        out = np.full(len(hashes), -1, dtype=np.int64)
        pending = np.flatnonzero(at < end)  # queries still walking their bucket
        at, end = at[pending], end[pending]
        while len(pending):
            hit = self._hashes[at] == hashes[pending]
            out[pending[hit]] = self._values[at[hit]]
            at += 1
            more = ~hit & (at < end)
            pending, at, end = pending[more], at[more], end[more]
        return out


def spm_merges_arrays(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]] | None:
    """spm_merges_reference's list, from array operations: every split of every token is hashed,
    the hashes are looked up among the vocabulary's, and each pair found is checked code point
    by code point, so the list is exact whatever the hashes do. None where the arrays cannot
    say what Python would (scores that are not all numbers, two vocabulary tokens with one
    hash: then the loop runs)."""
    keys, pieces_list = list(vocab), list(scores)
    score = np.asarray(list(scores.values()))
    if not keys or score.dtype.kind not in "iuf" or np.isnan(score).any():
        return None
    known = _CodePoints(keys)
    pieces = known if pieces_list == keys else _CodePoints(pieces_list)

    # Vocabulary tokens by hash. Empty ones cannot be either side of a split.
    nonempty = np.flatnonzero(known.lengths > 0)
    index = _HashIndex(known.hashes(known.starts[nonempty], known.starts[nonempty + 1]), nonempty)
    if not index.unique:
        return None

    def lookup(begin: np.ndarray, end: np.ndarray) -> np.ndarray:
        return index.find(pieces.hashes(begin, end))

    # Every split: its token, the token's start and end in the code points, len(left).
    n_splits = np.maximum(pieces.lengths - 1, 0)
    token = np.repeat(np.arange(len(n_splits)), n_splits)
    split = np.arange(1, len(token) + 1) - np.repeat(np.cumsum(n_splits) - n_splits, n_splits)
    begin, end = pieces.starts[token], pieces.starts[token + 1]
    left = lookup(begin, begin + split)
    keep = left >= 0
    token, split, begin, end, left = token[keep], split[keep], begin[keep], end[keep], left[keep]
    right = lookup(begin + split, end)
    keep = (right >= 0) & (known.lengths[left] == split) & (known.lengths[right] == end - begin - split)
    token, split, begin, end, left, right = (a[keep] for a in (token, split, begin, end, left, right))

    if not len(token):
        return []

    # The check: one item per code point of each pair's token, compared with the code point
    # at the same place in left + right (its position in the token plus the offset to the
    # left piece's, or to the right piece's from the split on).
    length = end - begin
    first = np.cumsum(length) - length
    position = np.arange(int(length.sum())) + np.repeat(begin - first, length)
    in_left = position < np.repeat(begin + split, length)
    offset = np.where(in_left, np.repeat(known.starts[left] - begin, length),
                      np.repeat(known.starts[right] - split - begin, length))
    exact = np.logical_and.reduceat(pieces.cp[position] == known.cp[position + offset], first)
    token, split, length, left, right = (a[exact] for a in (token, split, length, left, right))

    # Best score first, then the longer left, then the longer right (so the longer token);
    # ties keep the token order. (The loop also orders one token's splits by id, but no two
    # splits of a token have one left length, so the ids never decide.)
    rank = np.unique(score, return_inverse=True)[1].reshape(-1)
    ranked = _lexsort_unique((token, -length, -split, -rank[token]))
    get = keys.__getitem__
    return list(zip(map(get, left[ranked].tolist()), map(get, right[ranked].tolist())))
