"""What every parity test compares: prompt log-probabilities and greedy continuations.

Ours runs the whole (growing) sequence through the model with a dense attention context;
transformers decodes incrementally with its own KV cache, so the two sides also differ in
how they reach each position.
"""
from __future__ import annotations

import inspect

import torch

from tests.parity.dense_attention import CachedAttention, DenseAttention

LOGPROB_TOLERANCE = 1e-3
GREEDY_TOKENS = 32


def our_logits(model: torch.nn.Module, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
    hidden = model(ids, torch.arange(len(ids)), DenseAttention())  # (N, C)
    return model.logits(hidden[-1:] if last_only else hidden)  # (N or 1, V) float32


def prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(token i+1 | tokens <= i) for each prompt token after the first."""
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)  # (N-1, V)
    return logprobs.gather(1, ids[1:, None])[:, 0]  # (N-1,)


def max_logprob_diff(model: torch.nn.Module, hf_model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        expected = prompt_logprobs(hf_model(ids[None]).logits[0], ids)
        got = prompt_logprobs(our_logits(model, ids), ids)
    return (got - expected).abs().max().item()


def hf_greedy(hf_model, ids: torch.Tensor, steps: int = GREEDY_TOKENS) -> list[int]:
    """transformers' incremental decode with its own KV cache (no EOS stop)."""
    # transformers 5.x renamed past_key_values to cache (in and out); accept either.
    key = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = hf_model(ids[None], use_cache=True)
        tokens = []
        for _ in range(steps):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = hf_model(torch.tensor([[token]]), use_cache=True, **{key: out[key]})
    return tokens


def our_greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int = GREEDY_TOKENS) -> list[int]:
    """Prefill, then one token per forward with a dense KV cache (as a decoder runs)."""
    ctx = CachedAttention()
    tokens: list[int] = []
    with torch.no_grad():
        hidden = model(ids, torch.arange(len(ids)), ctx)[-1:]  # (1, C)
        for step in range(steps):
            token = int(model.logits(hidden)[0].argmax())
            tokens.append(token)
            position = torch.tensor([len(ids) + step])
            hidden = model(torch.tensor([token]), position, ctx)
    return tokens


def farthest_logprob_diff(model: torch.nn.Module, hf_model, prompts: dict[str, torch.Tensor]) -> float:
    """The largest prompt log-prob difference over the prompts."""
    return max(max_logprob_diff(model, hf_model, ids) for ids in prompts.values())


def assert_matches(model: torch.nn.Module, hf_model, prompts: dict[str, torch.Tensor]) -> None:
    """Prompt log-probs within LOGPROB_TOLERANCE and the same greedy tokens on every prompt."""
    assert farthest_logprob_diff(model, hf_model, prompts) < LOGPROB_TOLERANCE
    for ids in prompts.values():
        assert our_greedy(model, ids) == hf_greedy(hf_model, ids)
