"""A GGUF file's vocabulary -> TokenizerParts (an HF `tokenizers` backend plus a byte table).

A GGUF carries no tokenizer.json, only llama.cpp's metadata: the token list, token types,
merges or scores, special ids and `tokenizer.ggml.pre`, the name of the pre-tokenizer regex
the vocabulary was trained with. We rebuild the tokenizer those describe:

- `gpt2` (byte-level BPE, byte_level.py): vocab + merges, the regex split that llama.cpp's
  llama-vocab.cpp assigns to the pre name, then byte-level mapping.
- `llama` (SentencePiece BPE with <0xNN> byte fallback, sentencepiece.py): merges recovered
  from the scores (Gemma: from the file order, which its scores do not follow), space ->
  U+2581.
- `gemma4` (Gemma 4: BPE over raw UTF-8 with the file's merges, llama-vocab.cpp's SPM-style
  BPE): space -> U+2581, the text split only at runs of newlines, <0xNN> byte fallback, BOS
  always added; a run of newlines that the vocabulary spells is that one token (see _gemma4).

Control and user-defined tokens become added tokens so that they are matched whole in text,
as transformers and llama.cpp do. EOS ids: the file's eos/eot/eom ids plus the control
tokens whose text ends a turn in llama.cpp's list (SmolLM2: <|im_end|> and <|endoftext|>).
The file is read by the loader (loader/gguf_file.py: the metadata only, not the tensors;
gguf.GGUFReader parses every field eagerly and takes seconds on a 262k-token vocabulary).

Building still takes seconds for Gemma 3's 262k tokens (reading the strings, the merges,
the Rust BPE), so a built tokenizer is cached per user (cache.py), keyed by the raw bytes of
the file's metadata and by the code that builds it; a later start loads it from there.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers import __version__ as tokenizers_version

from textmill.loader import gguf_file
from textmill.loader.gguf_file import metadata_region, read_metadata
from textmill.tokenizer import byte_level, core, sentencepiece
from textmill.tokenizer import cache as cache_module
from textmill.tokenizer.cache import CACHE_FORMAT, default_cache_dir, load_entry, store_entry
from textmill.tokenizer.byte_level import IGNORE_MERGES, byte_level_bytes, byte_level_pre_tokenizer, bytes_to_unicode
from textmill.tokenizer.core import EOG_TEXTS, FIM_TEXTS, FimTokens, Tokenizer, TokenizerParts, find_fim
from textmill.tokenizer.sentencepiece import sentencepiece_bytes, spm_merges

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp adds BOS for these when the file does not say.
_ADD_BOS_BY_DEFAULT = IGNORE_MERGES | {"chameleon"}
_GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})
# What a cached tokenizer was made by: the reader of the metadata and the builders.
_CODE = tuple(Path(m.__file__) for m in (byte_level, cache_module, core, sentencepiece, gguf_file)) + (Path(__file__),)


def load_gguf_tokenizer(path: str | Path, *, cache_dir: str | Path | None = None, cache: bool = True
                        ) -> Tokenizer:
    """The tokenizer of a GGUF file. cache: keep the built tokenizer in cache_dir
    (default: cache.default_cache_dir(), which TEXTMILL_CACHE_DIR moves) and load it from
    there the next time."""
    directory = Path(cache_dir) if cache_dir is not None else None
    return Tokenizer(read_gguf_tokenizer(Path(path), directory, cache=cache))


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
    parts = load_entry(entry, key)
    if parts is None:
        parts = build_gguf_tokenizer(path)
        store_entry(entry, key, parts)
    return parts


def cache_key(path: Path) -> str | None:
    """A hash of the file's whole metadata region (its raw bytes: no strings decoded) and of
    the code that turns it into a tokenizer; None when that code cannot be read."""
    digest = hashlib.blake2b(digest_size=20)
    try:
        for source in _CODE:
            digest.update(source.read_bytes())
    except OSError:
        return None
    digest.update(f"{CACHE_FORMAT} tokenizers {tokenizers_version}".encode())
    digest.update(metadata_region(Path(path)))
    return digest.hexdigest()


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
                                 end_of_word_suffix="", fuse_unk=False, ignore_merges=pre in IGNORE_MERGES))
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


def _gemma4(meta: dict[str, Any], tokens: list[str], types: list[int]
            ) -> tuple[Backend, list[bytes], tuple[tuple[int, int], ...]]:
    """llama.cpp's "gemma4" vocabulary (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GEMMA4): spaces
    escaped to U+2581, the text split into runs of newlines and runs of anything else, merges by
    rank over UTF-8 characters (no byte-level alphabet, no space prefix), and the bytes of a
    character no token spells as <0xNN> tokens. Also the newline runs the vocabulary spells
    whole (the third item), which the merges alone may split."""
    merge_list = meta.get("tokenizer.ggml.merges")
    if not merge_list:
        raise ValueError("a gemma4 GGUF vocabulary needs its merges (tokenizer.ggml.merges)")
    vocab = {t: i for i, t in enumerate(tokens)}
    # llama.cpp ranks a pair where it is first listed (dict.fromkeys keeps that order). A pair
    # with a space in it can never apply, as spaces are U+2581 by then, and `tokenizers` wants
    # both halves and their join in the vocabulary (the converter's files have no other kind).
    merges = [(a, b) for merge in dict.fromkeys(merge_list) if merge.count(" ") == 1
              for a, b in [merge.split(" ")] if a in vocab and b in vocab and a + b in vocab]
    # No unk token: llama.cpp never writes <unk> here. (Where a byte of a character has no <0xNN>
    # token, llama.cpp drops that byte and `tokenizers` the character; Gemma 4 has all 256.)
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), "isolated")  # llama.cpp: "[^\n]+|[\n]+"
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    _added_tokens(backend, tokens, types, vocab, control_ok=lambda t: True)
    # llama.cpp takes a run of newlines whole when some token spells it. Where the merges give
    # that token anyway, nothing needs doing; the other lengths go to Tokenizer.encode. Not
    # where an added token holds a newline: the backend's matches could then cut a run.
    runs = []
    if not any("\n" in t.content for t in backend.get_added_tokens_decoder().values()):
        for i, token in enumerate(tokens):
            if len(token) > 1 and not token.strip("\n") and vocab[token] == i:
                if backend.encode(token, add_special_tokens=False).ids != [i]:
                    runs.append((len(token), i))
    return backend, _gemma4_bytes(tokens, types), tuple(sorted(runs))


def _gemma4_bytes(tokens: list[str], types: list[int]) -> list[bytes]:
    """What llama.cpp's token_to_piece gives for a gemma4 vocabulary: byte tokens their byte,
    control, unknown and user-defined tokens their text as it is, normal ones with U+2581 as a
    space, and unused (or untyped) ones nothing."""
    out = []
    for token, kind in zip(tokens, types):
        if kind == BYTE and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                out.append(bytes([int(token[3:5], 16)]))
                continue
            except ValueError:
                pass
        if kind in (CONTROL, UNKNOWN, USER_DEFINED, BYTE):  # BYTE: one not spelled <0xNN>
            out.append(token.encode("utf-8"))
        elif kind == NORMAL:
            out.append(token.replace("\u2581", " ").encode("utf-8"))
        else:
            out.append(b"")
    return out


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
    meta = read_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ValueError(f"{path} holds no vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    newline_runs: tuple[tuple[int, int], ...] = ()
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if kind == "gpt2":
        backend, table, strip = _byte_level(meta, tokens, types)
        if add_bos is None:
            add_bos = meta.get("tokenizer.ggml.pre", "default") in _ADD_BOS_BY_DEFAULT
    elif kind == "llama":
        backend, table, strip = _sentencepiece(meta, tokens, types)
        if add_bos is None:
            add_bos = True  # llama.cpp's default for SentencePiece vocabularies
    elif kind == "gemma4":
        backend, table, newline_runs = _gemma4(meta, tokens, types)
        strip = False
        add_bos = True  # llama.cpp overrides a file's false: Gemma 4 needs its BOS (llama.cpp PR 21500)
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported "
                         "(gpt2 byte-level BPE, llama SentencePiece, gemma4 BPE)")
    return TokenizerParts(
        backend=backend,
        token_bytes=tuple(table),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        eos_token_ids=_eos_ids(meta, tokens, types),
        add_bos=bool(add_bos),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        fim=_fim(meta, tokens),
        strip_leading_space=strip,
        newline_runs=newline_runs,
    )
