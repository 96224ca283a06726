"""A Hugging Face folder's tokenizer: tokenizer.json, tokenizer_config.json,
generation_config.json and config.json -> TokenizerParts.

EOS ids: the eos_token of tokenizer_config.json plus the eos ids of generation_config.json
and config.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from textmill.tokenizer.byte_level import byte_level_bytes
from textmill.tokenizer.core import Tokenizer, TokenizerParts, find_fim
from textmill.tokenizer.sentencepiece import sentencepiece_bytes


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a folder with tokenizer.json."""
    return Tokenizer(read_hf_tokenizer(Path(folder)))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _ids_of(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _special_id(backend: tokenizers.Tokenizer, token: Any, fallback: Any) -> int | None:
    """The id of a tokenizer_config special token (a string or {"content": ...})."""
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str):
        found = backend.token_to_id(token)
        if found is not None:
            return found
    ids = _ids_of(fallback)
    return ids[0] if ids else None


def _decoder_kinds(backend: tokenizers.Tokenizer) -> list[dict]:
    spec = json.loads(backend.to_str()).get("decoder") or {}
    return spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]


def _hf_token_bytes(backend: tokenizers.Tokenizer, vocab_size: int) -> tuple[tuple[bytes, ...], bool]:
    """The byte table of a tokenizer.json vocabulary, and whether decoding drops a leading space."""
    kinds = _decoder_kinds(backend)
    types = {k.get("type") for k in kinds}
    tokens = [backend.id_to_token(i) for i in range(vocab_size)]
    known = [t if t is not None else "" for t in tokens]
    if "ByteLevel" in types:
        table, strip = byte_level_bytes(known), False
    elif types & {"ByteFallback", "Metaspace", "Replace"}:
        table = sentencepiece_bytes(known)
        strip = any(
            (k.get("type") == "Strip" and k.get("start", 0) >= 1)
            or (k.get("type") == "Metaspace" and k.get("prepend_scheme", "always") != "never"
                and k.get("add_prefix_space", True))
            for k in kinds
        )
    else:
        # WordPiece and other decoders join tokens with rules of their own; a token's own
        # decoded text is the closest byte form we can give it.
        table = [backend.decode([i], skip_special_tokens=False).encode("utf-8") if t else b""
                 for i, t in enumerate(tokens)]
        strip = False
    return tuple(table), strip


def _adds(backend: tokenizers.Tokenizer, token_id: int | None, at_start: bool) -> bool:
    """Whether the tokenizer.json post-processor adds token_id at the start (or end)."""
    if token_id is None:
        return False
    with_special = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    if len(with_special) <= len(plain):
        return False
    return (with_special[0] if at_start else with_special[-1]) == token_id


def read_hf_tokenizer(folder: Path) -> TokenizerParts:
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")
    model = _read_json(folder / "config.json")
    model_vocab = model.get("vocab_size") or model.get("text_config", {}).get("vocab_size") or 0
    vocab_size = max(int(model_vocab), backend.get_vocab_size(with_added_tokens=True))
    table, strip = _hf_token_bytes(backend, vocab_size)
    bos = _special_id(backend, config.get("bos_token"), model.get("bos_token_id", generation.get("bos_token_id")))
    eos = _special_id(backend, config.get("eos_token"), model.get("eos_token_id", generation.get("eos_token_id")))
    eos_ids = {*_ids_of(generation.get("eos_token_id")), *_ids_of(model.get("eos_token_id"))}
    if eos is not None:
        eos_ids.add(eos)
    add_bos = config.get("add_bos_token")
    add_eos = config.get("add_eos_token")
    vocab = backend.get_vocab(with_added_tokens=True)
    return TokenizerParts(
        backend=backend,
        token_bytes=table,
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=frozenset(eos_ids),
        add_bos=bool(add_bos) if add_bos is not None else _adds(backend, bos, at_start=True),
        add_eos=bool(add_eos) if add_eos is not None else _adds(backend, eos, at_start=False),
        fim=find_fim(vocab),
        strip_leading_space=strip,
    )
