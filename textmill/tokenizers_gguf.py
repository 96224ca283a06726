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
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from textmill.loader.gguf_file import read_metadata as read_gguf_metadata
from textmill.tokenizer import (
    EOG_TEXTS, FimTokens, TokenizerParts, byte_level_bytes, bytes_to_unicode, find_fim,
    sentencepiece_bytes,
)

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


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two
    tokens, best merged-token score first, then by piece lengths and ids. This is the order
    transformers' converters recover, so ranks (and so ids) match the reference tokenizer."""
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
    ids |= {i for i, (t, kind) in enumerate(zip(tokens, types))
            if kind in (CONTROL, USER_DEFINED) and t in EOG_TEXTS}
    return frozenset(i for i in ids if i is not None and 0 <= i < len(tokens))


def _fim(meta: dict[str, Any], tokens: list[str]) -> FimTokens | None:
    for keys in (("fim_pre", "fim_suf", "fim_mid"), ("prefix", "suffix", "middle")):
        ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in keys]
        if all(isinstance(i, int) and 0 <= i < len(tokens) for i in ids):
            return FimTokens(*ids)
    first: dict[str, int] = {}
    for i, t in enumerate(tokens):
        first.setdefault(t, i)
    return find_fim(first)


def read_gguf_tokenizer(path: Path) -> TokenizerParts:
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
