"""Gemma 4 GGUF vocabularies (tokenizer.ggml.model "gemma4"): llama.cpp's SPM-style BPE.

A small BPE vocabulary is trained here with the structure of Gemma 4's tokenizer.json
(normalizer Replace(" ", "▁"), BPE with byte fallback over <0xNN> tokens, special tokens,
newline-run tokens listed as added tokens) and written into a GGUF file as llama.cpp's
converter does (conversion/gemma.py Gemma4Model.set_vocab: gguf's LlamaHfVocab and
SpecialVocab, a few visible tokens USER_DEFINED, add_space_prefix False, add_bos True).
textmill's tokenizer of that file is checked against transformers' GemmaTokenizer built from
the same tokenizer.json. Where llama.cpp and transformers part ways (a newline run that no
token spells), the expectation is llama.cpp's (llama-vocab.cpp: the run goes through the
file's merges); these expectations were checked against libllama's own llama_tokenize.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from textmill.tokenizer import Tokenizer, load_gguf_tokenizer
from textmill.tokenizer import gguf as gguf_tokenizer
# tokenizer_cache: autouse, so that the tokenizers built here are cached in a folder of their own
from tests.unit.test_tokenizer import tokenizer_cache  # noqa: F401

transformers = pytest.importorskip("transformers")

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|think|>",
           "<|tool_response>", "<|channel>", "<channel|>"]
# Gemma4Model.set_vocab types these USER_DEFINED (always rendered), whatever tokenizer.json says.
VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
           '<|"|>'}
NEWLINES = ["\n" * k for k in range(1, 5)]  # runs of up to four newlines are tokens of their own
BYTES = [f"<0x{b:02X}>" for b in range(256)]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Hello world! Hello there, my friend. How are you doing today? Fine, thanks.",
    "def main():\n    print('hello')\n    return 0\n\n\nif __name__ == '__main__':\n    main()\n",
    "Crème brûlée and café au lait, naïve façade. Über straße, ça va? Ærøskøbing.",
    "Привет мир, как дела? Это тест токенизатора.",
    "日本語のテキストです。東京は大きい都市です。",
    "    indented    text   with   spaces\tand\ttabs\t\tand more",
    "numbers 12345 and 3.14159, lists [1, 2, 3] and {braces}",
]

# Texts on which llama.cpp and transformers agree (no newline run longer than NEWLINES).
TEXTS = [
    "", " ", "   ", "Hello world", " Hello world", "Hello world ", "  two leading spaces", "trailing spaces   ",
    "multiple   spaces   inside", "\n", "\n\n", "\n\n\n", "\n\n\n\n", "a\nb", "a\n\nb", " \n ",
    "x \n\n y", "line one\n\n\nline two\n", "\n\n\nleading newlines", "\r\n\r\n", "\tTab\tseparated\t", "\t\t\tindent",
    "def main():\n    print('hello')\n    return 0\n\n\nif x:\n\tpass\n", "Crème brûlée, café au lait",
    "Привет мир", "日本語のテキスト", "☃ snowman", "🦀 crab 👍🏽 family 👨‍👩‍👧", "naïve 中文 ☃ Ωmega",
    "<|turn>user\nHello<turn|>\n<|turn>model\n", "<|channel>thought<channel|>The answer",
    "<|tool_response>x<turn|>", "not <|turn a special, nor turn|>", "<bos>text<eos>", "x" * 200,
    "The quick brown fox jumps over the lazy dog.\n\nThe dog sleeps;  the fox runs away.\n",
    "a▁b ▁",  # a literal U+2581 is what a space becomes
]
ROUND_TRIP = [t for t in TEXTS if "▁" not in t]


def train_tokenizer_json() -> dict:
    """A BPE vocabulary laid out as Gemma 4's tokenizer.json: special tokens, newline runs,
    the 256 byte-fallback tokens, then the trained pieces; merges never cross a newline."""
    trainer_backend = Backend(models.BPE())
    trainer_backend.normalizer = normalizers.Replace(" ", "▁")
    trainer_backend.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), "removed")
    trainer_backend.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=420, show_progress=False))
    trained = json.loads(trainer_backend.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    vocab = {t: i for i, t in enumerate(SPECIAL + NEWLINES + BYTES + pieces)}
    # One merge of newlines, so that a run no token spells shows which merges llama.cpp applies.
    merges = trained["merges"] + [["\n", "\n"]]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": t in SPECIAL} for t in SPECIAL + NEWLINES],
        "normalizer": replace,
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def write_gemma4_gguf(folder: Path, path: Path, *, add_bos: bool = True, merges: bool = True) -> Path:
    """The vocabulary part of Gemma4Model.set_vocab, on the checkpoint folder's tokenizer."""
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in VISIBLE else kind)
    writer = gguf.GGUFWriter(str(path), "gemma4")
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=merges).add_to_gguf(writer)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma4")
    (out / "tokenizer.json").write_text(json.dumps(train_tokenizer_json(), ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": "<pad>", "mask_token": "<mask>", "clean_up_tokenization_spaces": False,
        "extra_special_tokens": ["<|turn>", "<turn|>", "<|think|>", "<|tool_response>", "<|channel>",
                                 "<channel|>"],
    }), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def path(folder: Path) -> Path:
    return write_gemma4_gguf(folder, folder / "gemma4.gguf")


@pytest.fixture(scope="module")
def ours(path: Path) -> Tokenizer:
    return load_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def ref(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def ids(folder: Path) -> dict[str, int]:
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]


def test_ids_are_transformers_ids(ours: Tokenizer, ref) -> None:
    assert type(ref).__name__ == "GemmaTokenizer"
    mine = {text: ours.encode(text, add_special_tokens=False) for text in TEXTS}
    theirs = {text: ref.encode(text, add_special_tokens=False) for text in TEXTS}
    assert [(text, mine[text], theirs[text]) for text in TEXTS if mine[text] != theirs[text]] == []
    for text in TEXTS:
        assert ours.encode(text) == [ours.bos_token_id, *ref.encode(text, add_special_tokens=False)]


def test_spaces_become_u2581_and_characters_without_a_token_become_bytes(ours: Tokenizer, ids: dict) -> None:
    spelling = {i: t for t, i in ids.items()}
    for text in ("x  y", " x", "x ", "  Hello   world  ", "Hello\tworld"):
        # the pieces spell the text with U+2581 for each space, and no space is put in front
        pieces = [spelling[i] for i in ours.encode(text, add_special_tokens=False)]
        assert "".join(pieces) == text.replace(" ", "▁")
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    snowman = ours.encode("☃", add_special_tokens=False)
    assert snowman == [ids["<0xE2>"], ids["<0x98>"], ids["<0x83>"]]
    assert [ours.token_text(i) for i in snowman] == ["bytes:\\xe2", "bytes:\\x98", "bytes:\\x83"]
    assert ours.decode(snowman) == "☃" and ours.decode(snowman[:2]) == "\ufffd"


def test_newline_runs(ours: Tokenizer, ref, ids: dict) -> None:
    # A run the vocabulary spells is one token, though the merges alone would split it.
    assert [t.value for t in ref.backend_tokenizer.model.tokenize("\n\n\n")] == ["\n\n", "\n"]
    assert ours.encode("a\n\n\nb", add_special_tokens=False) == [ids["a"], ids["\n\n\n"], ids["b"]]
    assert ours.encode("<turn|>\n\n\n<|turn>", add_special_tokens=False) == [
        ids["<turn|>"], ids["\n\n\n"], ids["<|turn>"]]
    # A longer run goes through the merges in llama.cpp; transformers takes the longest added
    # token first instead.
    seven = "x\n\n\n\n\n\n\ny"
    llama_cpp = [ids["x"], ids["\n\n"], ids["\n\n"], ids["\n\n"], ids["\n"], ids["y"]]
    assert ours.encode(seven, add_special_tokens=False) == llama_cpp
    assert ref.encode(seven, add_special_tokens=False) == [ids["x"], ids["\n\n\n\n"], ids["\n\n\n"], ids["y"]]
    assert ours.decode(ours.encode(seven)) == "<bos>" + seven


def test_the_cached_tokenizer_keeps_the_newline_rule(path: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, ours: Tokenizer) -> None:
    cache = tmp_path / "cache"
    load_gguf_tokenizer(path, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    monkeypatch.setattr(gguf_tokenizer, "build_gguf_tokenizer", None)  # must not be called
    cached = load_gguf_tokenizer(path, cache_dir=cache)
    for text in [*TEXTS, "a\n\n\nb", "x\n\n\n\n\n\n\ny"]:
        assert cached.encode(text) == ours.encode(text)
    assert [cached.token_bytes(i) for i in range(ours.vocab_size)] == [
        ours.token_bytes(i) for i in range(ours.vocab_size)]
    assert cached.eos_token_ids == ours.eos_token_ids and cached.add_bos


def test_decoding_round_trips(ours: Tokenizer, ref) -> None:
    for text in ROUND_TRIP:
        ids = ours.encode(text, add_special_tokens=False)
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode("utf-8")
        assert ours.decode(ids) == text
        decoder = ours.decoder()
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text
        with_bos = ours.encode(text)
        assert ours.decode(with_bos) == ref.decode(with_bos, skip_special_tokens=False) == "<bos>" + text
    # a literal U+2581 decodes as the space it stands for (llama.cpp's unescape)
    assert ours.decode(ours.encode("a▁b", add_special_tokens=False)) == "a b"


def test_special_tokens(ours: Tokenizer, ids: dict) -> None:
    assert ours.vocab_size == len(ids)
    assert ours.bos_token_id == ids["<bos>"] and ours.add_bos
    # llama.cpp's end-of-generation tokens for Gemma 4: <eos>, <turn|> and <|tool_response>
    assert ours.eos_token_ids == frozenset({ids["<eos>"], ids["<turn|>"], ids["<|tool_response>"]})
    # control tokens are special; the converter's visible tokens are text, yet matched whole
    assert {ids[t] for t in ("<|turn>", "<turn|>", "<bos>", "<pad>")} <= ours.special_token_ids()
    assert ids["<|channel>"] not in ours.special_token_ids()
    assert ours.encode("<|channel>a", add_special_tokens=False) == [ids["<|channel>"], ids["a"]]
    assert ours.token_to_id("<|turn>") == ids["<|turn>"]
    assert ours.token_text(ids["<|turn>"]) == "<|turn>" and ours.token_text(ids["\n\n"]) == "\n\n"


def test_bos_is_added_even_where_the_file_says_not(folder: Path, tmp_path: Path, ids: dict) -> None:
    tok = load_gguf_tokenizer(write_gemma4_gguf(folder, tmp_path / "no-bos.gguf", add_bos=False))
    assert tok.add_bos and tok.encode("Hello") == [ids["<bos>"], *tok.encode("Hello", add_special_tokens=False)]


def test_a_file_without_merges_is_refused(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="merges"):
        load_gguf_tokenizer(write_gemma4_gguf(folder, tmp_path / "no-merges.gguf", merges=False), cache=False)


# llama.cpp's own Gemma 4 vocabulary and the ids its test-tokenizer-0 expects, where a build of
# llama.cpp's sources is at hand (the server parity tests build one there).
LLAMA_CPP_VOCAB = next(iter(sorted(Path.home().glob(
    ".cache/llama-server-build/*/vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf"))), None)


@pytest.mark.skipif(LLAMA_CPP_VOCAB is None, reason="no llama.cpp source tree with ggml-vocab-gemma-4.gguf")
def test_llama_cpp_gemma4_vocabulary_and_its_expected_ids() -> None:
    tok = load_gguf_tokenizer(LLAMA_CPP_VOCAB, cache=False)
    texts = LLAMA_CPP_VOCAB.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = LLAMA_CPP_VOCAB.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) > 40
    for text, line in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False) == [int(i) for i in line.split()], text
    assert tok.encode("Hi")[0] == tok.bos_token_id == 2
    # <eos>, <|tool_response>, <turn|>: llama.cpp's end-of-generation set for this file
    assert tok.eos_token_ids == frozenset({1, 50, 106})
    assert tok.encode("<|turn>user\n\n\nHi<turn|>", add_special_tokens=False) == [105, 2364, 109, 10979, 106]
