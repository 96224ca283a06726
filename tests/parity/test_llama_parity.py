"""Our Llama on the bundled SmolLM2 GGUF against transformers' Llama on the same file.

Both sides dequantize the same file independently (ours in textmill.loader, transformers
through gguf-py), so this checks the dequantizer, the name map and q/k un-permutation, the
config, and the model maths at once.
"""
from __future__ import annotations

import pytest
import torch

from tests.parity.compare import (
    GREEDY_TOKENS, LOGPROB_TOLERANCE, hf_greedy, our_greedy, our_logits, prompt_logprobs,
)
from textmill.loader import LoadedModel

PROMPTS = {
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "prose": "The history of the printing press begins in the fifteenth century, when",
    "digits": "3.14159 26535 89793 + 2718281828 = 1234567890 and 0x7fff",
    "emoji": "I love pizza 🍕 and sushi 🍣! My favourite emoji is",
    "cjk": "東京は日本の首都です。中国的首都是北京，",
    "whitespace": "a    b\t\t\tc\n\n\n\n    d          e\n\t",
    "chat": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
}
# Loading both models and 7 x 32 recomputed greedy steps take well over a minute.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer) -> dict[str, torch.Tensor]:
    ids = {name: torch.tensor(hf_tokenizer(text)["input_ids"]) for name, text in PROMPTS.items()}
    assert all(len(t) >= 8 for t in ids.values())
    return ids


def test_config_matches_transformers(ours: LoadedModel, hf_model) -> None:
    hf, c = hf_model.config, ours.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size)
    assert (c.num_layers, c.num_heads, c.num_kv_heads) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    # transformers 5 moved rope_theta into rope_parameters
    theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert c.rope_theta == pytest.approx(theta)
    assert c.norm_eps == pytest.approx(hf.rms_norm_eps)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_logprobs_match(name: str, ours: LoadedModel, hf_model, prompt_ids) -> None:
    ids = prompt_ids[name]
    with torch.no_grad():
        expected = prompt_logprobs(hf_model(ids[None]).logits[0], ids)
        got = prompt_logprobs(our_logits(ours.model, ids), ids)
    diff = (got - expected).abs().max().item()
    assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_continuation_matches(name: str, ours: LoadedModel, hf_model, prompt_ids) -> None:
    ids = prompt_ids[name]
    with torch.no_grad():
        expected = hf_greedy(hf_model, ids, GREEDY_TOKENS)
        got = our_greedy(ours.model, ids, GREEDY_TOKENS)
    assert got == expected
