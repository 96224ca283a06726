"""A GGUF file's vocabulary -> TokenizerParts (an HF `tokenizers` backend plus a byte table).

A GGUF carries no tokenizer.json, only llama.cpp's metadata: the token list, token types,
merges or scores, special ids and `tokenizer.ggml.pre`, the name of the pre-tokenizer regex
the vocabulary was trained with. We rebuild the tokenizer those describe:

- `gpt2` (byte-level BPE): vocab + merges, the regex split that llama.cpp's llama-vocab.cpp
  assigns to the pre name, then byte-level mapping.
- `llama` (SentencePiece BPE with <0xNN> byte fallback): merges recovered from the scores
  (Gemma: from the file order, which its scores do not follow), space -> U+2581.

Control and user-defined tokens become added tokens so that they are matched whole in text,
as transformers and llama.cpp do. Only the metadata is read (not the tensors), with the
loader's lean reader (loader/gguf_file.py): gguf.GGUFReader parses every field eagerly and
takes seconds on a 262k-token vocabulary.

Building still takes about two seconds for Gemma 3's 262k tokens (reading the strings, the
merges, the Rust BPE), so a built tokenizer is cached per user, keyed by the raw bytes of the
file's metadata and by this code (see "Cache" below); a later start loads it from there,
skipping the strings, the merges and the byte table.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers import __version__ as tokenizers_version

import textmill.loader.gguf_file as _gguf_file_module
import textmill.tokenizer as _tokenizer_module
from textmill.loader.gguf_file import metadata_region
from textmill.loader.gguf_file import read_metadata as read_gguf_metadata
from textmill.tokenizer import (
    EOG_TEXTS, FIM_TEXTS, FimTokens, TokenizerParts, byte_level_bytes, bytes_to_unicode,
    find_fim, sentencepiece_bytes,
)

log = logging.getLogger("textmill.tokenizer")

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---------------------------------------------------------------------------------------
# Pre-tokenizer regexes, by llama.cpp's `tokenizer.ggml.pre` names. Several regexes split
# in turn (each one splits the pieces of the one before), as llama.cpp applies them.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_PRE_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "a.x-4.0",
      "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4",
      "roberta-bpe", "jina-v1-en", "jina-v2-code"), (_GPT2,)),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
     (r"\p{N}", _GPT2)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
      "jina-v5-nano", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), (_LLAMA3,)),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan"), (_QWEN2,)),
    (("tekken",), (_TEKKEN,)),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), (_GPT4O,)),
    (("deepseek-coder",), ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}")),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    (("poro-chat", "bloom", "gpt3-finnish"), (r" ?[^(\s|.,!?…。，、।۔،)]+",)),
    (("viking",), (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}")),
)
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    name: regexes for names, regexes in _PRE_GROUPS for name in names
}
# Vocabularies whose whole words skip the merges (llama.cpp's ignore_merges; the HF
# tokenizer.json of Llama 3 says the same).
_IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                            "midm-2.0", "lfm2", "jina-v5-nano", "tekken"})
# llama.cpp adds BOS for these when the file does not say.
_ADD_BOS_BY_DEFAULT = _IGNORE_MERGES | {"chameleon"}
_GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in PRE_TOKENIZER_REGEXES:
        raise ValueError(f"unknown GGUF pre-tokenizer {pre!r}; supported: {sorted(PRE_TOKENIZER_REGEXES)}")
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# ---------------------------------------------------------------------------------------
# SentencePiece merges


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two
    tokens, best merged-token score first, then by piece lengths and ids. This is the order
    transformers' converters recover, so ranks (and so ids) match the reference tokenizer.

    Gemma's 262k tokens have 1.2M splits; looking each one up in Python took seconds, so the
    splits are found with array operations (_spm_merges_numpy). The loop (_spm_merges_python)
    states the rule, and still serves the vocabularies the arrays cannot take."""
    found = _spm_merges_numpy(vocab, scores)
    return found if found is not None else _spm_merges_python(vocab, scores)


def _spm_merges_python(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
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


def _spm_merges_numpy(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]] | None:
    """_spm_merges_python's list, from array operations: every split of every token is hashed,
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


# ---------------------------------------------------------------------------------------
# Builders


def _added_tokens(backend: Backend, tokens: list[str], types: list[int], vocab: dict[str, int],
                  control_ok) -> None:
    """Control tokens become special tokens and user-defined ones plain added tokens, both
    matched whole in text. A token the vocabulary does not hold under that spelling (a
    mislabelled one) is skipped: adding it would grow the vocabulary past the model's rows."""
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == CONTROL and t in vocab and control_ok(t)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _byte_level(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[Backend, list[bytes], bool]:
    alphabet = set(bytes_to_unicode().values())
    spelling = bytes_to_unicode()
    # Tokens outside the byte alphabet (some converters store added tokens as plain text)
    # are respelled from their UTF-8, so the BPE model sees one alphabet.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES))
    backend.pre_tokenizer = byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _added_tokens(backend, tokens, types, vocab, control_ok=lambda t: set(t) <= alphabet)
    return backend, byte_level_bytes(tokens), False


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[Backend, list[bytes], bool]:
    gemma = meta.get("general.architecture") in _GEMMA_ARCHS
    if gemma:
        # Gemma files store runs of spaces as real spaces; the model's pieces spell them U+2581.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        # Gemma's scores do not follow its merge order; the order of the tokens in the file does.
        scores = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab=vocab, merges=spm_merges(vocab, scores), dropout=None,
                                 unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    else:
        scheme = "first" if add_space_prefix else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    _added_tokens(backend, tokens, types, vocab, control_ok=lambda t: True)
    return backend, sentencepiece_bytes(tokens), add_space_prefix and not gemma


def _eos_ids(meta: dict[str, Any], tokens: list[str], types: list[int]) -> frozenset[int]:
    """EOS, the file's EOT/EOM ids, and control tokens whose text ends a turn (llama.cpp's list)."""
    ids = {meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")}
    # Only control and user-defined tokens can qualify: a few thousand of 262k at most.
    special = np.flatnonzero(np.isin(np.asarray(types), (CONTROL, USER_DEFINED))).tolist()
    ids |= {i for i in special if i < len(tokens) and tokens[i] in EOG_TEXTS}
    return frozenset(i for i in ids if i is not None and 0 <= i < len(tokens))


def _fim(meta: dict[str, Any], tokens: list[str]) -> FimTokens | None:
    for keys in (("fim_pre", "fim_suf", "fim_mid"), ("prefix", "suffix", "middle")):
        ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in keys]
        if all(isinstance(i, int) and 0 <= i < len(tokens) for i in ids):
            return FimTokens(*ids)
    names = {name for triple in FIM_TEXTS for name in triple}
    return find_fim({name: tokens.index(name) for name in names.intersection(tokens)})


def build_gguf_tokenizer(path: Path) -> TokenizerParts:
    """The tokenizer of a GGUF file, built from its metadata (no cache)."""
    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ValueError(f"{path} holds no vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "gpt2":
        backend, table, strip = _byte_level(meta, tokens, types)
        add_bos_default = meta.get("tokenizer.ggml.pre", "default") in _ADD_BOS_BY_DEFAULT
    elif kind == "llama":
        backend, table, strip = _sentencepiece(meta, tokens, types)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 byte-level BPE, llama SentencePiece)")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return TokenizerParts(
        backend=backend,
        token_bytes=tuple(table),
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=_eos_ids(meta, tokens, types),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        fim=_fim(meta, tokens),
        strip_leading_space=strip,
    )


def read_gguf_tokenizer(path: Path, cache_dir: Path | None = None, *, cache: bool = True) -> TokenizerParts:
    """The tokenizer of a GGUF file: from the cache (cache_dir, else default_cache_dir()) when
    it holds one for this file's metadata, else built and then stored there. cache=False
    builds it and leaves the cache alone."""
    if not cache:
        return build_gguf_tokenizer(path)
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    key = cache_key(path)
    if directory is None or key is None:
        return build_gguf_tokenizer(path)
    entry = directory / f"{key}.npz"
    parts = _load_cached(entry, key)
    if parts is None:
        parts = build_gguf_tokenizer(path)
        _store(entry, key, parts)
    return parts


# ---------------------------------------------------------------------------------------
# Cache. A built tokenizer is stored under a hash of the file's metadata region and of the
# code that builds it, so that neither a changed file nor a changed builder is ever served a
# stale one. An entry is one .npz (no pickles): a JSON header with TokenizerParts' small
# fields, the backend's JSON (Tokenizer.to_str) and the byte table as lengths plus one blob.
# Loading it skips reading the metadata strings, the merges and the byte table; what is left
# is mostly Tokenizer.from_str, about 1 s for Gemma 3's BPE. Rebuilding that BPE from lists
# kept in a format of our own measured no faster (making 515k Python tuples costs what serde
# does), so the backend's own JSON it is. The zip's CRC-32 catches a damaged entry, which is
# then rebuilt; a directory that cannot be written is simply not used.

CACHE_DIR_ENV = "TEXTMILL_CACHE_DIR"
_CACHE_FORMAT = 1
# What a cached tokenizer was made by: the reader of the metadata and the two builders.
_CODE = (Path(__file__), Path(_tokenizer_module.__file__), Path(_gguf_file_module.__file__))


def default_cache_dir() -> Path | None:
    """$TEXTMILL_CACHE_DIR/tokenizers, else $XDG_CACHE_HOME/textmill/tokenizers, else
    ~/.cache/textmill/tokenizers; None without a home directory."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root) / "tokenizers"
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:
            return None
    return Path(base) / "textmill" / "tokenizers"


def cache_key(path: Path) -> str | None:
    """A hash of the file's whole metadata region (its raw bytes: no strings decoded) and of
    the code that turns it into a tokenizer; None when that code cannot be read."""
    digest = hashlib.blake2b(digest_size=20)
    try:
        for source in _CODE:
            digest.update(source.read_bytes())
    except OSError:
        return None
    digest.update(f"{_CACHE_FORMAT} tokenizers {tokenizers_version}".encode())
    digest.update(metadata_region(Path(path)))
    return digest.hexdigest()


def _load_cached(entry: Path, key: str) -> TokenizerParts | None:
    try:
        # Opened here, not by np.load, which leaves its file open when the content is bad.
        with entry.open("rb") as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with npz:
                header = json.loads(npz["header"].tobytes())
                backend_json = npz["backend"].tobytes().decode("utf-8")
                lengths = npz["token_lengths"]
                blob = npz["token_bytes"].tobytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as exc:  # a damaged entry fails in many ways; rebuild it
        log.warning("tokenizer cache entry %s is unreadable (%s: %s); rebuilding", entry, type(exc).__name__, exc)
        return None
    try:
        if header.get("format") != _CACHE_FORMAT or header.get("key") != key:
            raise ValueError("it belongs to another file or format")
        ends = np.cumsum(lengths, dtype=np.int64).tolist()
        if ends and ends[-1] != len(blob):
            raise ValueError("its byte table does not add up")
        table = tuple(blob[a:b] for a, b in zip([0, *ends], ends))
        fim = header["fim"]
        return TokenizerParts(
            backend=Backend.from_str(backend_json),
            token_bytes=table,
            bos_token_id=header["bos_token_id"],
            eos_token_id=header["eos_token_id"],
            eos_token_ids=frozenset(header["eos_token_ids"]),
            add_bos=header["add_bos"],
            add_eos=header["add_eos"],
            fim=FimTokens(*fim) if fim is not None else None,
            strip_leading_space=header["strip_leading_space"],
        )
    except Exception as exc:
        log.warning("tokenizer cache entry %s is unusable (%s: %s); rebuilding", entry, type(exc).__name__, exc)
        return None


def _entry_arrays(key: str, parts: TokenizerParts) -> dict[str, np.ndarray]:
    fim = parts.fim
    header = {
        "format": _CACHE_FORMAT, "key": key,
        "bos_token_id": parts.bos_token_id, "eos_token_id": parts.eos_token_id,
        "eos_token_ids": sorted(parts.eos_token_ids), "add_bos": parts.add_bos, "add_eos": parts.add_eos,
        "fim": [fim.prefix, fim.suffix, fim.middle] if fim is not None else None,
        "strip_leading_space": parts.strip_leading_space,
    }
    return {
        "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        "backend": np.frombuffer(parts.backend.to_str().encode("utf-8"), dtype=np.uint8),
        "token_lengths": np.fromiter(map(len, parts.token_bytes), dtype=np.uint32, count=len(parts.token_bytes)),
        "token_bytes": np.frombuffer(b"".join(parts.token_bytes), dtype=np.uint8),
    }


def _store(entry: Path, key: str, parts: TokenizerParts) -> None:
    """Write the entry under a temporary name and rename it: readers, other processes
    included, see a whole entry or none."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **_entry_arrays(key, parts))
        os.replace(tmp, entry)
        tmp = None
    except OSError as exc:  # read-only, full, not a directory, ...: no cache, same tokenizer
        log.info("not caching the tokenizer in %s: %s", entry.parent, exc)
    except Exception as exc:  # caching is an optimisation: never a reason to fail a start
        log.warning("not caching the tokenizer in %s: %s: %s", entry.parent, type(exc).__name__, exc)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
