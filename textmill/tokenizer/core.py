"""The Tokenizer: text <-> token ids for one model, whatever file its vocabulary came from.

Encoding runs in HF `tokenizers` (Rust), a backend that a format reader builds (gguf.py
from a GGUF file's vocabulary, hf.py from a folder's tokenizer.json) and hands over as
TokenizerParts. Decoding does not go through the backend: every token id maps to the raw
bytes it stands for (`token_bytes`), and text is the UTF-8 decoding of the concatenated
bytes, each maximal invalid subsequence replaced by U+FFFD (what HF's byte-level decoder
and Python's "replace" handler both do). One byte table makes `decode`, the incremental
decoder, `decode_with_offsets` and `token_text` agree by construction. (HF's ByteFallback
decoder for SentencePiece vocabularies instead writes one U+FFFD per byte of an invalid
run of <0xNN> tokens; the two agree on every valid text.)

This package must not import torch: the grammar compiler and the tests of the API use it.
"""
from __future__ import annotations

import bisect
import codecs
import re
from dataclasses import dataclass
from typing import Sequence

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
    "<eos>", "<turn|>", "<|tool_response>",  # Gemma 4 (the last: the model hands over to a tool)
})

_NEWLINE_RUN = re.compile("\n+")


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
    # (length, id): maximal runs of that many newlines that become that one token although
    # the backend's merges split them (llama.cpp's rule for Gemma 4; see Tokenizer.encode).
    newline_runs: tuple[tuple[int, int], ...] = ()


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
        self._newline_runs = dict(parts.newline_runs)
        # A text without a run as long as the shortest of them needs no second look.
        self._newline_probe = "\n" * min(self._newline_runs, default=0)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in it ("<|im_start|>") are parsed as
        specials either way. add_special_tokens adds the model's BOS (and EOS) if it wants them."""
        if self._newline_runs and self._newline_probe in text:
            ids = self._encode_newline_runs(text)
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_token_id)
            if self._add_eos:
                ids.append(self._eos_token_id)
        return ids

    def _encode_newline_runs(self, text: str) -> list[int]:
        """llama.cpp takes a maximal run of newlines whole when the vocabulary spells it (Gemma 4);
        `tokenizers` has no such rule, only merges. The backend isolates such runs, so the
        tokens of a run are those that start inside it: they give way to the run's token."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        ids = encoding.ids
        starts = [start for start, _ in encoding.offsets]  # characters, in order
        for run in reversed(list(_NEWLINE_RUN.finditer(text))):  # right to left: earlier indices hold
            whole = self._newline_runs.get(run.end() - run.start())
            if whole is not None:
                ids[bisect.bisect_left(starts, run.start()):bisect.bisect_left(starts, run.end())] = [whole]
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
