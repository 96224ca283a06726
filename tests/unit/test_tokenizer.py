"""Tokenizer semantics: incremental decoding, offsets, token texts, special ids.

Runs on the bundled SmolLM2 GGUF (its vocabulary only) and on small GGUF files written here,
without transformers; parity with transformers lives in test_tokenizer_parity.py.
"""
from __future__ import annotations

import logging
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import gguf
import pytest

from textmill.loader.bundled import bundled_model_path
from textmill.tokenizer import cache as cached_tokenizers
from textmill.tokenizer import gguf as gguf_tokenizer
from textmill.tokenizer import sentencepiece
from textmill.tokenizer import FimTokens, Tokenizer, load_gguf_tokenizer, load_tokenizer
from textmill.tokenizer.byte_level import bytes_to_unicode

TEXTS = [
    "Hello, world!",
    "def f(x):\n\treturn x  # done\n",
    "😀👍🏽 👨‍👩‍👧‍👦 family",
    "日本語 中文 한국어",
    "Crème brûlée — naïve",
    "مرحبا بالعالم",
    "<|im_start|>user\nhi 🙂<|im_end|>",
    "12345678901234567890",
]


@pytest.fixture(scope="module", autouse=True)
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tokenizers built by these tests are cached in a folder of their own, not the user's."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cached_tokenizers.CACHE_DIR_ENV, str(root))
        yield root / "tokenizers"


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_gguf_tokenizer(bundled_model_path())


def byte_token_ids(tok: Tokenizer) -> dict[int, int]:
    """byte value -> id of the token that stands for that single byte."""
    out: dict[int, int] = {}
    for i in range(tok.vocab_size):
        raw = tok.token_bytes(i)
        if len(raw) == 1:
            out.setdefault(raw[0], i)
    return out


def stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = tok.decoder()
    return [decoder.push(i) for i in ids], decoder.flush()


# --- SmolLM2 vocabulary facts ---------------------------------------------------------


def test_smollm2_special_ids(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.bos_token_id == 1
    assert smol.add_bos is False
    # eos (<|im_end|>) plus <|endoftext|>, which the file marks as a control token that
    # ends a document (llama.cpp ends generation on it too).
    assert smol.eos_token_ids == frozenset({0, 2})
    assert smol.fim is None
    assert smol.encode("<|im_start|>user") == [1, 4093]
    assert smol.encode("", add_special_tokens=True) == []
    assert smol.token_to_id("<|im_end|>") == 2


def test_special_tokens_are_parsed_and_rendered(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>assistant\nok<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smol.decode(ids) == "<|im_start|>assistant\nok<|im_end|>"
    assert smol.token_text(2) == "<|im_end|>"


def test_out_of_range_ids_are_refused(smol: Tokenizer) -> None:
    for bad in (-1, smol.vocab_size):
        with pytest.raises(ValueError):
            smol.decode([5, bad])
        with pytest.raises(ValueError):
            smol.decoder().push(bad)
        with pytest.raises(ValueError):
            smol.token_bytes(bad)


def test_tokenizer_module_does_not_import_torch() -> None:
    code = "import sys, textmill.tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- incremental decoding -------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_encoded_text_is_the_text(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    pieces, tail = stream(smol, ids)
    assert "".join(pieces) + tail == text == smol.decode(ids)
    assert tail == ""
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_characters_split_over_byte_tokens_are_held(smol: Tokenizer) -> None:
    by_byte = byte_token_ids(smol)
    for char in ["é", "€", "漢", "😀", "👨\u200d👩\u200d👧"]:
        decoder = smol.decoder()
        out = []
        for ch in char:
            raw = ch.encode("utf-8")
            pieces = [decoder.push(by_byte[b]) for b in raw]
            # Nothing comes out until the last byte of the character arrives.
            assert pieces[:-1] == [""] * (len(raw) - 1)
            assert pieces[-1] == ch
            out.extend(pieces)
        assert "".join(out) + decoder.flush() == char


def test_flush_turns_held_bytes_into_one_replacement(smol: Tokenizer) -> None:
    by_byte = byte_token_ids(smol)
    decoder = smol.decoder()
    assert [decoder.push(by_byte[b]) for b in "😀".encode()[:3]] == ["", "", ""]
    assert decoder.flush() == "\ufffd"
    ids = [by_byte[b] for b in "😀".encode()[:3]]
    assert smol.decode(ids) == "\ufffd"


def test_held_bytes_cut_short_by_a_special_token(smol: Tokenizer) -> None:
    by_byte = byte_token_ids(smol)
    ids = [by_byte[0xE2], by_byte[0x82], 2, by_byte[0xAC]]
    pieces, tail = stream(smol, ids)
    assert pieces == ["", "", "\ufffd<|im_end|>", "\ufffd"]
    assert "".join(pieces) + tail == smol.decode(ids)


def test_random_ids_stream_equals_decode(smol: Tokenizer) -> None:
    rng = random.Random(1234)
    by_byte = byte_token_ids(smol)
    multibyte = "é€漢😀🙂👍🏽ß\u200dÑ"
    for _ in range(300):
        ids: list[int] = []
        for _ in range(rng.randint(0, 25)):
            pick = rng.random()
            if pick < 0.3:
                ids.append(rng.randrange(smol.vocab_size))
            elif pick < 0.4:
                ids.append(rng.randrange(17))  # control tokens
            elif pick < 0.7:
                ids.extend(by_byte[b] for b in rng.choice(multibyte).encode())
            elif pick < 0.85:
                # a character cut short: its first bytes only
                raw = rng.choice(multibyte).encode()
                ids.extend(by_byte[b] for b in raw[: rng.randint(1, len(raw))])
            else:
                ids.append(rng.choice(list(by_byte.values())))
        pieces, tail = stream(smol, ids)
        assert "".join(pieces) + tail == smol.decode(ids), ids
        text, offsets = smol.decode_with_offsets(ids)
        assert text == smol.decode(ids)
        assert len(offsets) == len(ids)
        assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)


# --- offsets and token texts ------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_count_the_complete_characters_before_each_token(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    decoded, offsets = smol.decode_with_offsets(ids)
    assert decoded == text
    for i, offset in enumerate(offsets):
        before = b"".join(smol.token_bytes(t) for t in ids[:i])
        # The bytes of a character still unfinished before token i do not count yet.
        assert offset == len(before.decode("utf-8", "ignore"))


def test_offsets_of_whole_tokens_slice_their_text(smol: Tokenizer) -> None:
    ids = smol.encode("The quick brown fox, 42 times.")
    text, offsets = smol.decode_with_offsets(ids)
    ends = offsets[1:] + [len(text)]
    assert [text[a:b] for a, b in zip(offsets, ends)] == [smol.token_text(i) for i in ids]


def test_token_text_of_partial_characters(smol: Tokenizer) -> None:
    ids = smol.encode("😀")
    assert [smol.token_text(i) for i in ids] == ["bytes:\\xf0\\x9f", "bytes:\\x98", "bytes:\\x80"]
    assert b"".join(smol.token_bytes(i) for i in ids) == "😀".encode()
    (hello,) = smol.encode(" hello")
    assert smol.token_text(hello) == " hello"
    assert smol.token_bytes(hello) == b" hello"


# --- small GGUF files written here --------------------------------------------------------

BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]


def write_byte_level(path: Path, *, pre: str = "gpt-2", extra: dict | None = None) -> Path:
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in"]
    tokens = BYTE_CHARS + ["Ġt", "he", "Ġthe", "in", "Ġin",
                           "<|endoftext|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<think>", "<|eot_id|>"]
    types = [1] * (256 + 5) + [3, 3, 3, 3, 4, 3]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(261)
    writer.add_eos_token_id(261)
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_small_byte_level_vocabulary(tmp_path: Path) -> None:
    tok = load_gguf_tokenizer(write_byte_level(tmp_path / "t.gguf"))
    assert tok.vocab_size == 267
    assert tok.encode(" the in") == [258, 260]
    # user-defined tokens are matched whole; control tokens too
    assert tok.encode("<think>the") == [265, ord("t"), 257]
    assert tok.encode("a<|endoftext|>") == [ord("a"), 261]
    assert tok.fim == FimTokens(262, 263, 264)
    # <|eot_id|> is a control token whose text ends a turn
    assert tok.eos_token_ids == frozenset({261, 266})
    assert tok.add_bos is False and tok.encode("x") == [ord("x")]


def test_bos_and_fim_ids_from_metadata(tmp_path: Path) -> None:
    path = write_byte_level(tmp_path / "t.gguf", extra={
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.fim_pre_token_id": 263, "tokenizer.ggml.fim_suf_token_id": 262,
        "tokenizer.ggml.fim_mid_token_id": 264, "tokenizer.ggml.eot_token_id": 265,
    })
    tok = load_gguf_tokenizer(path)
    assert tok.add_bos and tok.encode(" the") == [261, 258]
    assert tok.encode(" the", add_special_tokens=False) == [258]
    assert tok.fim == FimTokens(263, 262, 264)
    assert 265 in tok.eos_token_ids


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pre-tokenizer"):
        load_gguf_tokenizer(write_byte_level(tmp_path / "t.gguf", pre="no-such-pre"))


SPM_PIECES = ["▁", "H", "e", "l", "o", "w", "r", "d", "ll", "He", "llo", "Hello", "▁Hello",
              "▁w", "or", "▁wor", "▁world", "ld", "orld"]
SPM_ID = {piece: 259 + i for i, piece in enumerate(SPM_PIECES)}


def write_sentencepiece(path: Path, *, add_space_prefix: bool) -> Path:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    # earlier pieces merge first
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_with_space_prefix(tmp_path: Path) -> None:
    tok = load_gguf_tokenizer(write_sentencepiece(tmp_path / "spm.gguf", add_space_prefix=True))
    hello, world = SPM_ID["▁Hello"], SPM_ID["▁world"]
    assert tok.add_bos and tok.bos_token_id == 1  # llama.cpp's default for SentencePiece
    assert tok.encode("Hello world") == [1, hello, world]
    # the space added in front when encoding is dropped again when decoding
    assert tok.decode([hello, world]) == "Hello world"
    pieces, tail = stream(tok, [hello, world])
    assert pieces == ["Hello", " world"] and tail == ""
    # bytes missing from the vocabulary fall back to <0xNN> tokens
    ids = tok.encode("Hello ☃", add_special_tokens=False)
    assert ids == [hello, SPM_ID["▁"], 3 + 0xE2, 3 + 0x98, 3 + 0x83]
    assert tok.decode(ids) == "Hello ☃"
    assert [tok.token_text(i) for i in ids[-3:]] == ["bytes:\\xe2", "bytes:\\x98", "bytes:\\x83"]
    assert stream(tok, ids)[0] == ["Hello", " ", "", "", "☃"]
    # an unfinished character: one U+FFFD, as Python and HF's byte-level decoder do it
    assert tok.decode([hello, 3 + 0xE2, 3 + 0x98]) == "Hello\ufffd"


def test_sentencepiece_without_space_prefix(tmp_path: Path) -> None:
    tok = load_gguf_tokenizer(write_sentencepiece(tmp_path / "spm.gguf", add_space_prefix=False))
    assert tok.encode("Hello world", add_special_tokens=False) == [SPM_ID["Hello"], SPM_ID["▁world"]]
    assert tok.decode([SPM_ID["▁Hello"]]) == " Hello"


# --- the cache of built tokenizers ----------------------------------------------------------

CACHE_TEXTS = [*TEXTS, "", " leading space", "  two", "Hello world", "Hello ☃ world", "<s>Hello</s>",
               "<fim_prefix>a<fim_suffix>b<fim_middle>", " the in<think>"]


def assert_same_tokenizer(built: Tokenizer, other: Tokenizer) -> None:
    facts = ("vocab_size", "bos_token_id", "eos_token_ids", "add_bos", "fim")
    assert [getattr(other, f) for f in facts] == [getattr(built, f) for f in facts]
    assert [other.token_bytes(i) for i in range(built.vocab_size)] == [
        built.token_bytes(i) for i in range(built.vocab_size)]
    for text in CACHE_TEXTS:
        for add in (True, False):
            assert other.encode(text, add_special_tokens=add) == built.encode(text, add_special_tokens=add)
        ids = built.encode(text)
        assert other.decode(ids) == built.decode(ids)
        assert other.decode(ids[1:]) == built.decode(ids[1:])  # a leading space dropped or not
    assert other.token_to_id("<|im_end|>") == built.token_to_id("<|im_end|>")


def gguf_files(folder: Path) -> dict[str, Path]:
    """The bundled model and each small kind of vocabulary written here."""
    return {
        "bundled": bundled_model_path(),
        "byte-level": write_byte_level(folder / "bl.gguf", extra={
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.eot_token_id": 265,
            "tokenizer.ggml.fim_pre_token_id": 263, "tokenizer.ggml.fim_suf_token_id": 262,
            "tokenizer.ggml.fim_mid_token_id": 264}),
        "spm": write_sentencepiece(folder / "spm.gguf", add_space_prefix=True),
        "spm-no-prefix": write_sentencepiece(folder / "spm0.gguf", add_space_prefix=False),
    }


@pytest.mark.parametrize("kind", ["bundled", "byte-level", "spm", "spm-no-prefix"])
def test_cached_tokenizer_is_the_built_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    path = gguf_files(tmp_path)[kind]
    cache = tmp_path / "cache"
    built = load_gguf_tokenizer(path, cache=False)
    assert not cache.exists()
    first = load_gguf_tokenizer(path, cache_dir=cache)  # built, then stored
    (entry,) = cache.glob("*.npz")
    assert list(cache.iterdir()) == [entry]  # no temporary file left behind
    with monkeypatch.context() as patch:
        patch.setattr(gguf_tokenizer, "build_gguf_tokenizer", None)  # must not be called
        cached = load_tokenizer(path, cache_dir=cache)
    assert_same_tokenizer(built, first)
    assert_same_tokenizer(built, cached)


def test_cache_writes_merges_as_strings_only_where_that_is_the_same_bpe() -> None:
    """The cached JSON's merges are "a b" strings (read faster), except where a piece holds
    a space: the string form would split it in the wrong place."""
    import json

    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    plain = Backend(models.BPE(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}, merges=[("a", "b"), ("ab", "c")]))
    spaced = Backend(models.BPE(vocab={"a": 0, " ": 1, "b": 2, "a ": 3, "a b": 4}, merges=[("a", " "), ("a ", "b")]))
    compact = cached_tokenizers.compact_merges(plain.to_str())
    assert json.loads(compact)["model"]["merges"] == ["a b", "ab c"]
    assert Backend.from_str(compact).encode("abcab").ids == plain.encode("abcab").ids == [4, 3]
    assert cached_tokenizers.compact_merges(spaced.to_str()) == spaced.to_str()
    assert Backend.from_str(spaced.to_str()).encode("a b").ids == [4]


def test_cache_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEXTMILL_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cached_tokenizers.default_cache_dir() == tmp_path / "mine" / "tokenizers"
    monkeypatch.delenv("TEXTMILL_CACHE_DIR")
    assert cached_tokenizers.default_cache_dir() == tmp_path / "xdg" / "textmill" / "tokenizers"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cached_tokenizers.default_cache_dir() == tmp_path / "home" / ".cache" / "textmill" / "tokenizers"
    # load_gguf_tokenizer without cache_dir uses it
    monkeypatch.setenv("TEXTMILL_CACHE_DIR", str(tmp_path / "mine"))
    load_gguf_tokenizer(write_sentencepiece(tmp_path / "spm.gguf", add_space_prefix=True))
    assert len(list((tmp_path / "mine" / "tokenizers").glob("*.npz"))) == 1


def test_cache_key_is_the_tokenizer_metadata(tmp_path: Path) -> None:
    key = gguf_tokenizer.cache_key
    a = write_sentencepiece(tmp_path / "a.gguf", add_space_prefix=True)
    again = write_sentencepiece(tmp_path / "again.gguf", add_space_prefix=True)
    other = write_sentencepiece(tmp_path / "other.gguf", add_space_prefix=False)
    assert key(a) == key(again) != key(other)
    assert key(write_byte_level(tmp_path / "b.gguf")) != key(write_byte_level(tmp_path / "c.gguf", pre="llama-bpe"))


def flipped(raw: bytes, at: int) -> bytes:
    out = bytearray(raw)
    out[at] ^= 0x5A
    return bytes(out)


def member_data(entry: Path, name: str) -> range:
    """Where a stored zip member's bytes lie in the file (after its local header)."""
    with zipfile.ZipFile(entry) as z:
        info = z.getinfo(name)
    raw = entry.read_bytes()
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    return range(start, start + info.file_size)


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    path = write_sentencepiece(tmp_path / "spm.gguf", add_space_prefix=True)
    cache = tmp_path / "cache"
    built = load_gguf_tokenizer(path, cache=False)
    load_gguf_tokenizer(path, cache_dir=cache)
    (entry,) = cache.glob("*.npz")
    raw = entry.read_bytes()
    # Damage that must be seen: anything cut or replaced, any byte of the members' contents
    # (the zip's CRC-32 covers them) ...
    seen = {"empty": b"", "garbage": b"not a cache entry", "truncated": raw[: len(raw) // 2],
            "tail cut": raw[:-7], "zero-filled": bytes(len(raw))}
    for member in ("header.npy", "backend.npy", "token_lengths.npy", "token_bytes.npy"):
        data = member_data(entry, member)
        for at in sorted({data[0], data[len(data) // 2], data[-1]}):
            seen[f"{member} byte {at}"] = flipped(raw, at)
    # ... while a byte of the zip's own bookkeeping may or may not matter: either way, the
    # tokenizer is the built one.
    harmless = {f"byte {at}": flipped(raw, at) for at in range(0, len(raw), max(1, len(raw) // 40))}
    for name, damaged in [*seen.items(), *harmless.items()]:
        entry.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="textmill.tokenizer"):
            rebuilt = load_gguf_tokenizer(path, cache_dir=cache)
        assert_same_tokenizer(built, rebuilt)
        if name in seen:
            assert "rebuilding" in caplog.text, name
        with monkeypatch.context() as patch:  # and a whole entry is back in its place
            patch.setattr(gguf_tokenizer, "build_gguf_tokenizer", None)
            assert_same_tokenizer(built, load_gguf_tokenizer(path, cache_dir=cache))


def test_entry_of_another_file_is_not_used(tmp_path: Path) -> None:
    """An entry renamed to another file's key (or left by another format) is rebuilt."""
    cache = tmp_path / "cache"
    with_prefix = write_sentencepiece(tmp_path / "a.gguf", add_space_prefix=True)
    without = write_sentencepiece(tmp_path / "b.gguf", add_space_prefix=False)
    load_gguf_tokenizer(with_prefix, cache_dir=cache)
    (entry,) = cache.glob("*.npz")
    entry.rename(cache / f"{gguf_tokenizer.cache_key(without)}.npz")
    tok = load_gguf_tokenizer(without, cache_dir=cache)
    assert tok.encode("Hello world", add_special_tokens=False) == [SPM_ID["Hello"], SPM_ID["▁world"]]


def test_unwritable_cache_dir_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_sentencepiece(tmp_path / "spm.gguf", add_space_prefix=True)
    built = load_gguf_tokenizer(path, cache=False)
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")  # refuses even root, unlike permissions
    assert_same_tokenizer(built, load_gguf_tokenizer(path, cache_dir=blocker / "cache"))
    monkeypatch.setenv("TEXTMILL_CACHE_DIR", str(blocker))
    assert_same_tokenizer(built, load_gguf_tokenizer(path))
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "spm.gguf"]


# --- SentencePiece merges: the array version against the loop ---------------------------------


def random_vocabulary(rng: random.Random) -> tuple[dict[str, int], dict[str, float]]:
    alphabet = rng.choice(["ab", "abc", "a▁😀", "xy\0", "a\ud800b", "▁▁"])
    tokens = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7))) for _ in range(rng.randint(1, 80))]
    ids = list(range(len(tokens)))
    rng.shuffle(ids)
    vocab = dict(zip(tokens, ids))
    score = rng.choice([lambda: float(rng.randint(-3, 0)), rng.random, lambda: rng.randint(-5, 5),
                        lambda: rng.choice([0.0, -0.0, float("-inf"), 1e30])])
    # scores name tokens the vocabulary lacks too, in their own order
    extra = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(0, 10))]
    named = rng.sample(tokens, len(tokens)) + extra if rng.random() < 0.5 else tokens + extra
    return vocab, {t: score() for t in named}


def test_spm_merges_arrays_equal_the_loop() -> None:
    rng = random.Random(7)
    fast = 0
    for _ in range(400):
        vocab, scores = random_vocabulary(rng)
        expected = sentencepiece.spm_merges_reference(vocab, scores)
        found = sentencepiece.spm_merges_arrays(vocab, scores)
        if found is not None:
            fast += 1
            assert found == expected, (vocab, scores)
        assert sentencepiece.spm_merges(vocab, scores) == expected
    assert fast > 380  # the arrays, not the loop, answered


def test_spm_merges_with_nan_scores_use_the_loop() -> None:
    vocab = {t: i for i, t in enumerate(["a", "b", "ab", "ba", "aba"])}
    scores = {"ab": float("nan"), "ba": -1.0, "aba": 0.0}
    assert sentencepiece.spm_merges_arrays(vocab, scores) is None
    assert sentencepiece.spm_merges(vocab, scores) == sentencepiece.spm_merges_reference(vocab, scores)
