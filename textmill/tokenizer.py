"""Text <-> token ids for one model: one interface over HF `tokenizers` and GGUF vocabularies.

Encoding runs in HF `tokenizers` (Rust), built either from a folder's tokenizer.json or from a
GGUF file's vocabulary (see tokenizers_gguf.py). Decoding does not go through the backend:
every token id maps to the raw bytes it stands for (`token_bytes`), and text is the UTF-8
decoding of the concatenated bytes, each maximal invalid subsequence replaced by U+FFFD
(what HF's byte-level decoder and Python's "replace" handler both do). One byte table makes
`decode`, the incremental decoder, `decode_with_offsets` and `token_text` agree by
construction. (HF's ByteFallback decoder for SentencePiece vocabularies instead writes one
U+FFFD per byte of an invalid run of <0xNN> tokens; the two agree on every valid text.)

EOS ids: a GGUF gives its eos/eot/eom ids plus the control tokens whose text ends a turn in
llama.cpp's list (SmolLM2: <|im_end|> and <|endoftext|>); a folder gives the eos_token of
tokenizer_config.json plus the eos ids of generation_config.json and config.json.

This module must not import torch: the API layer uses it.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import tokenizers

# Texts of well-known FIM triples, (prefix, suffix, middle), tried in order when the file
# names no ids: StarCoder/SmolLM, Qwen2.5-Coder, DeepSeek-Coder (begin/hole/end), CodeLlama.
FIM_TEXTS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    ("<PRE>", "<SUF>", "<MID>"),
)

# Token texts that end generation when a GGUF marks them as control tokens (llama.cpp's
# end-of-generation list): chat models end a turn with these rather than with EOS.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int


@dataclass(frozen=True)
class TokenizerParts:
    """What a format reader hands to Tokenizer."""

    backend: tokenizers.Tokenizer  # encodes; its post-processor is never used (BOS/EOS are ours)
    token_bytes: tuple[bytes, ...]  # index = token id; length = embedding rows
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    fim: FimTokens | None
    # SentencePiece vocabularies that prepend a space when encoding drop it again when
    # decoding (HF's Strip / Metaspace decoders): one leading space of the whole text.
    strip_leading_space: bool = False


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_level_bytes(tokens: Sequence[str]) -> list[bytes]:
    """The bytes of byte-level tokens; a token spelled outside the byte alphabet (an added
    token like "<|im start|>" with a space) stands for its own UTF-8, as HF decodes it."""
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for token in tokens:
        try:
            out.append(bytes(char_to_byte[c] for c in token))
        except KeyError:
            out.append(token.encode("utf-8"))
    return out


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


def find_fim(vocab: dict[str, int]) -> FimTokens | None:
    for names in FIM_TEXTS:
        ids = [vocab.get(name) for name in names]
        if all(i is not None for i in ids):
            return FimTokens(*ids)
    return None


def _token_bytes_of(table: tuple[bytes, ...], token_id: int) -> bytes:
    if not 0 <= token_id < len(table):
        raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(table) - 1})")
    return table[token_id]


class IncrementalDecoder:
    """Turns one request's token ids into text as they come, never splitting a character.

    Python's incremental UTF-8 decoder holds the bytes of an unfinished character and emits
    exactly what a one-shot decode of all bytes would, so push() results plus flush() equal
    Tokenizer.decode of the same ids.
    """

    def __init__(self, token_bytes: tuple[bytes, ...], strip_leading_space: bool) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = strip_leading_space  # until the first character is out

    def push(self, token_id: int) -> str:
        """The text this token completes (possibly ""; never part of a character)."""
        return self._emit(self._utf8.decode(_token_bytes_of(self._token_bytes, token_id), False))

    def flush(self) -> str:
        """At the end: held bytes of an unfinished character, as U+FFFD."""
        return self._emit(self._utf8.decode(b"", True))

    def _emit(self, text: str) -> str:
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                text = text[1:]
        return text


class Tokenizer:
    """One model's vocabulary: encode text, decode ids, name tokens for logprobs."""

    def __init__(self, parts: TokenizerParts) -> None:
        self._backend = parts.backend
        self._token_bytes = parts.token_bytes
        self._strip_leading_space = parts.strip_leading_space
        self._eos_token_id = parts.eos_token_id
        self._add_eos = parts.add_eos and parts.eos_token_id is not None
        self.vocab_size: int = len(parts.token_bytes)
        self.bos_token_id: int | None = parts.bos_token_id
        self.eos_token_ids: frozenset[int] = parts.eos_token_ids
        self.add_bos: bool = parts.add_bos and parts.bos_token_id is not None
        self.fim: FimTokens | None = parts.fim

    @classmethod
    def from_gguf(cls, path: str | Path, *, cache_dir: str | Path | None = None, cache: bool = True) -> Tokenizer:
        """cache: keep the built tokenizer in cache_dir (default: tokenizers_gguf.default_cache_dir(),
        which TEXTMILL_CACHE_DIR moves) and load it from there the next time."""
        from textmill.tokenizers_gguf import read_gguf_tokenizer

        directory = Path(cache_dir) if cache_dir is not None else None
        return cls(read_gguf_tokenizer(Path(path), directory, cache=cache))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        return cls(read_hf_tokenizer(Path(path)))

    @classmethod
    def from_path(cls, path: str | Path, *, cache_dir: str | Path | None = None, cache: bool = True) -> Tokenizer:
        """A .gguf file (cached as from_gguf says), or a folder with tokenizer.json."""
        path = Path(path)
        return cls.from_hf_dir(path) if path.is_dir() else cls.from_gguf(path, cache_dir=cache_dir, cache=cache)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in it ("<|im_start|>") are parsed as
        specials either way. add_special_tokens adds the model's BOS (and EOS) if it wants them."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_token_id)
            if self._add_eos:
                ids.append(self._eos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; special tokens are rendered as their text, invalid UTF-8 as U+FFFD."""
        table = self._token_bytes
        if len(ids) and not (0 <= min(ids) and max(ids) < len(table)):
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{len(table) - 1})")
        text = b"".join([table[i] for i in ids]).decode("utf-8", "replace")
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def decode_with_offsets(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """The text of ids and, per token, the character offset at which its text starts:
        the length of the text the incremental decoder had emitted before that token."""
        decoder = self.decoder()
        pieces: list[str] = []
        offsets: list[int] = []
        position = 0
        for token_id in ids:
            offsets.append(position)
            piece = decoder.push(token_id)
            pieces.append(piece)
            position += len(piece)
        pieces.append(decoder.flush())
        return "".join(pieces), offsets

    def token_bytes(self, token_id: int) -> bytes:
        return _token_bytes_of(self._token_bytes, token_id)

    def token_text(self, token_id: int) -> str:
        """The token's text if its bytes are valid UTF-8 on their own, else OpenAI's
        "bytes:\\xNN..." spelling of a partial character."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def decoder(self) -> IncrementalDecoder:
        """A fresh incremental decoder (one per request)."""
        return IncrementalDecoder(self._token_bytes, self._strip_leading_space)

    def special_token_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens: never text, so a grammar never allows them."""
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items()
                         if t.special and i < self.vocab_size)

    def token_to_id(self, text: str) -> int | None:
        """The id of the token spelled exactly `text` (a special token's text), if any."""
        return self._backend.token_to_id(text)


# ---------------------------------------------------------------------------------------
# Hugging Face folders: tokenizer.json + tokenizer_config.json (+ generation_config.json)


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
