"""Our Llama on the bundled SmolLM2 GGUF against transformers' Llama on the same file.

Both sides dequantize the same file independently (ours in textmill.loader, transformers
through gguf-py), so this checks the dequantizer, the name map and q/k un-permutation, the
config, and the model maths at once.
"""
from __future__ import annotations

import pytest
import torch

from tests.parity.dense_attention import DenseAttention
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

LOGPROB_TOLERANCE = 1e-3
GREEDY_TOKENS = 32


def our_logits(loaded: LoadedModel, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
    model = loaded.model
    hidden = model(ids, torch.arange(len(ids)), DenseAttention())  # (N, C)
    return model.logits(hidden[-1:] if last_only else hidden)  # (N or 1, V) float32


def prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(token i+1 | tokens <= i) for each prompt token after the first."""
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)  # (N-1, V)
    return logprobs.gather(1, ids[1:, None])[:, 0]  # (N-1,)


def hf_greedy(hf_model, ids: torch.Tensor, steps: int) -> list[int]:
    """transformers' incremental decode with its own KV cache (no EOS stop)."""
    out = hf_model(ids[None], use_cache=True)
    tokens = []
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = hf_model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def our_greedy(loaded: LoadedModel, ids: torch.Tensor, steps: int) -> list[int]:
    """Full recompute of the growing sequence each step: slow, but needs no cache."""
    seq = ids.tolist()
    for _ in range(steps):
        logits = our_logits(loaded, torch.tensor(seq), last_only=True)
        seq.append(int(logits[0].argmax()))
    return seq[len(ids):]


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
        got = prompt_logprobs(our_logits(ours, ids), ids)
    diff = (got - expected).abs().max().item()
    assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_continuation_matches(name: str, ours: LoadedModel, hf_model, prompt_ids) -> None:
    ids = prompt_ids[name]
    with torch.no_grad():
        expected = hf_greedy(hf_model, ids, GREEDY_TOKENS)
        got = our_greedy(ours, ids, GREEDY_TOKENS)
    assert got == expected
