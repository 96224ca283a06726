"""The sampler: one vectorized pass that chooses the next token of every sampled row.

The order is fixed and documented (OpenAI semantics):

    logit bias -> repetition/presence/frequency penalties -> min_tokens ban -> temperature
    -> top-k -> top-p -> min-p -> sample

* logit bias: logits[j] += bias[j] for the request's (token, bias) pairs.
* penalties: logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, where
  c counts the tokens this request has *generated* (never its prompt).
* repetition_penalty (vLLM/HF): over tokens seen in the prompt *or* generated, positive
  logits are divided by it and negative ones multiplied.
* min_tokens: the request's stop_token_ids are banned until it has generated that many.
* temperature 0 is greedy: argmax after bias and penalties. Greedy and sampled rows mix
  freely in one batch.
* top-k keeps the k most likely tokens; min-p drops tokens below min_p * the top probability.
* top-p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one).
* sampling inverts the CDF (in vocabulary order) at one uniform drawn from the request's own
  CPU torch.Generator, seeded from params.seed: a request's tokens depend on its own seed and
  logits only, never on which other requests share the batch.

Logprobs are the model's raw log_softmax in float32, before any of the above, so scoring a
text with echo gives the same numbers as generating it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from textmill.sampling_params import SamplingParams

_SEED_MASK = (1 << 64) - 1  # torch.Generator takes seeds in [0, 2**64)


@dataclass(frozen=True)
class SampleOutput:
    token_ids: torch.Tensor  # (S,) int64
    logprobs: torch.Tensor  # (S,) float32: raw logprob of each chosen token
    top_ids: torch.Tensor  # (S, K) int64, K = the largest params.logprobs in the batch (may be 0)
    top_logprobs: torch.Tensor  # (S, K) float32


@dataclass(frozen=True)
class PromptLogprobOutput:
    logprobs: torch.Tensor  # (P,) float32: raw logprob of each target token
    top_ids: torch.Tensor  # (P, K) int64
    top_logprobs: torch.Tensor  # (P, K) float32


@dataclass
class RequestSampling:
    """One request's sampler state; lives from its first step until it leaves."""

    params: SamplingParams
    generator: torch.Generator  # CPU, so the draws are the same on every device
    bias_ids: torch.Tensor | None  # (K,) int64 on the device
    bias_values: torch.Tensor | None  # (K,) float32
    count_row: int | None  # row in PenaltyCounts, only when the request uses penalties
    seen_row: int | None = None  # row in the seen-token buffer, only with repetition_penalty
    num_generated: int = 0  # tokens sampled so far (min_tokens)
    stop_ids: torch.Tensor | None = None  # (K,) banned while num_generated < min_tokens


class PenaltyCounts:
    """Generated-token counts (rows, V) on the device, one row per penalized request.

    Dense so that applying and updating penalties is a gather and an index_put, with no
    host round trip; rows are recycled, and the buffer doubles when it runs out.
    """

    def __init__(self, vocab_size: int, device: str | torch.device):
        self.counts = torch.zeros((0, vocab_size), dtype=torch.float32, device=device)
        self._free: list[int] = []

    def acquire(self) -> int:
        if not self._free:
            old = self.counts.shape[0]
            new = max(4, 2 * old)
            grown = self.counts.new_zeros((new, self.counts.shape[1]))
            grown[:old] = self.counts
            self.counts = grown
            self._free.extend(range(new - 1, old - 1, -1))
        row = self._free.pop()
        self.counts[row].zero_()
        return row

    def release(self, row: int) -> None:
        self._free.append(row)


class Sampler:
    def __init__(self, vocab_size: int, device: str | torch.device = "cpu"):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.penalty_counts = PenaltyCounts(vocab_size, device)
        self.seen = PenaltyCounts(vocab_size, device)  # prompt + generated, for repetition_penalty
        self._requests: dict[str, RequestSampling] = {}
        # (request ids of the last batch, its bias as (rows, cols, values) or None)
        self._bias_batch: tuple[tuple[str, ...], tuple | None] | None = None

    # ------------------------------------------------------------ per-request state
    def add_request(self, request_id: str, params: SamplingParams, prompt_token_ids=()) -> None:
        assert request_id not in self._requests, f"request {request_id} added twice"
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed & _SEED_MASK)
        # Ids beyond the vocabulary cannot be sampled anyway; the API rejects them first.
        bias = [(t, b) for t, b in params.logit_bias if t < self.vocab_size and b != 0.0]
        bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.int64, device=self.device) if bias else None
        bias_values = torch.tensor([b for _, b in bias], dtype=torch.float32, device=self.device) if bias else None
        row = self.penalty_counts.acquire() if params.has_penalties else None
        state = RequestSampling(params, generator, bias_ids, bias_values, row)
        if params.repetition_penalty != 1.0:
            state.seen_row = self.seen.acquire()
            ids = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.int64, device=self.device)
            self.seen.counts[state.seen_row].index_fill_(0, ids[ids < self.vocab_size], 1.0)
        if params.min_tokens > 0 and params.stop_token_ids:
            state.stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.int64, device=self.device)
        self._requests[request_id] = state

    def remove_request(self, request_id: str) -> None:
        self._bias_batch = None  # an id may come back with other params
        state = self._requests.pop(request_id, None)
        if state is not None and state.count_row is not None:
            self.penalty_counts.release(state.count_row)
        if state is not None and state.seen_row is not None:
            self.seen.release(state.seen_row)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def params(self, request_id: str) -> SamplingParams:
        return self._requests[request_id].params

    # ------------------------------------------------------------ sampling
    def sample(self, logits: torch.Tensor, request_ids: Sequence[str]) -> SampleOutput:
        """logits (S, V) float32, one row per request id -> the chosen token of each row.

        Also counts each chosen token for the penalties of the request's next steps.
        """
        states = [self._requests[r] for r in request_ids]
        logits = logits.float()
        raw = torch.log_softmax(logits, dim=-1)  # (S, V)
        # Copy only when something edits the logits (the caller's tensor stays as it was).
        x = logits.clone() if any(_edits_logits(s) for s in states) else logits
        self._apply_bias(x, states, tuple(request_ids))
        self._apply_repetition(x, states)
        penalized = self._apply_penalties(x, states)
        self._ban_early_stops(x, states)
        # max(dim).indices, not argmax: the same first-maximum index, several times faster on CPU.
        tokens = torch.max(x, dim=-1).indices  # (S,) greedy rows keep this
        sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampled_rows:
            tokens = self._sample_rows(x, tokens, states, sampled_rows)
        if penalized is not None:
            rows, count_rows = penalized
            ones = torch.ones(rows.shape[0], dtype=torch.float32, device=x.device)
            self.penalty_counts.counts.index_put_((count_rows, tokens.index_select(0, rows)), ones, accumulate=True)
        self._after_sampling(states, tokens)
        chosen = raw.gather(1, tokens[:, None])[:, 0]  # (S,)
        k = max((s.params.logprobs or 0) for s in states)
        top_lps, top_ids = _topk(raw, k)
        return SampleOutput(tokens, chosen, top_ids, top_lps)

    def prompt_logprobs(self, logits: torch.Tensor, targets: torch.Tensor, k: int) -> PromptLogprobOutput:
        """logits (P, V), targets (P,) -> raw logprob of each target and the top k per row."""
        raw = torch.log_softmax(logits.float(), dim=-1)  # (P, V)
        chosen = raw.gather(1, targets[:, None])[:, 0]
        top_lps, top_ids = _topk(raw, k)
        return PromptLogprobOutput(chosen, top_ids, top_lps)

    def _apply_bias(self, x: torch.Tensor, states: list[RequestSampling], request_ids: tuple[str, ...]) -> None:
        # A request's bias never changes, so the batched index tensors are reused for as long
        # as the batch holds the same requests in the same order (most decode steps).
        cached = self._bias_batch
        if cached is None or cached[0] != request_ids:
            biased = [(i, s) for i, s in enumerate(states) if s.bias_ids is not None]
            if not biased:
                self._bias_batch = (request_ids, None)
                return
            rows = torch.cat([torch.full_like(s.bias_ids, i) for i, s in biased])
            cols = torch.cat([s.bias_ids for _, s in biased])
            values = torch.cat([s.bias_values for _, s in biased])
            cached = self._bias_batch = (request_ids, (rows, cols, values))
        if cached[1] is not None:
            x.index_put_(cached[1][:2], cached[1][2], accumulate=True)

    def _apply_penalties(
        self, x: torch.Tensor, states: list[RequestSampling]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # (penalized rows, their count rows)
        idx = [i for i, s in enumerate(states) if s.count_row is not None]
        if not idx:
            return None
        as_tensor = lambda v, dt: torch.tensor(v, dtype=dt, device=x.device)  # noqa: E731
        rows = as_tensor(idx, torch.int64)
        count_rows = as_tensor([states[i].count_row for i in idx], torch.int64)
        presence = as_tensor([states[i].params.presence_penalty for i in idx], torch.float32)
        frequency = as_tensor([states[i].params.frequency_penalty for i in idx], torch.float32)
        counts = self.penalty_counts.counts.index_select(0, count_rows)  # (R, V)
        x.index_copy_(0, rows, apply_penalties(x.index_select(0, rows), counts, presence, frequency))
        return rows, count_rows

    def _apply_repetition(self, x: torch.Tensor, states: list[RequestSampling]) -> None:
        idx = [i for i, s in enumerate(states) if s.seen_row is not None]
        if not idx:
            return
        rows = torch.tensor(idx, dtype=torch.int64, device=x.device)
        seen = self.seen.counts.index_select(0, torch.tensor([states[i].seen_row for i in idx], device=x.device))
        penalty = torch.tensor([states[i].params.repetition_penalty for i in idx], device=x.device)[:, None]
        sub = x.index_select(0, rows)
        penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
        x.index_copy_(0, rows, torch.where(seen > 0, penalized, sub))

    def _ban_early_stops(self, x: torch.Tensor, states: list[RequestSampling]) -> None:
        for i, s in enumerate(states):  # rare: only requests still short of min_tokens
            if s.stop_ids is not None and s.num_generated < s.params.min_tokens:
                x[i].index_fill_(0, s.stop_ids, float("-inf"))

    def _after_sampling(self, states: list[RequestSampling], tokens: torch.Tensor) -> None:
        idx = [i for i, s in enumerate(states) if s.seen_row is not None]
        if idx:
            seen_rows = torch.tensor([states[i].seen_row for i in idx], device=tokens.device)
            chosen = tokens.index_select(0, torch.tensor(idx, device=tokens.device))
            self.seen.counts.index_put_((seen_rows, chosen), torch.ones_like(chosen, dtype=torch.float32))
        for s in states:
            s.num_generated += 1

    def _sample_rows(self, x, greedy_tokens, states, sampled_rows) -> torch.Tensor:
        """Replace greedy_tokens at sampled_rows by a draw from each row's distribution."""
        rows = torch.tensor(sampled_rows, dtype=torch.int64, device=x.device)
        params = [states[i].params for i in sampled_rows]
        temperature = torch.tensor([p.temperature for p in params], device=x.device)
        probs = torch.softmax(x.index_select(0, rows) / temperature[:, None], dim=-1)  # (R, V)
        if any(p.top_k is not None for p in params):
            vocab = probs.shape[-1]
            probs = probs * top_k_mask(probs, [min(p.top_k or vocab, vocab) for p in params])
        top_p = [p.top_p for p in params]
        if any(p < 1.0 for p in top_p):
            probs = probs * top_p_mask(probs, torch.tensor(top_p, device=x.device))
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=x.device)[:, None]
            probs = probs * (probs >= min_p * probs.max(dim=-1, keepdim=True).values)
        # The one per-row loop: each row's uniform comes from its own generator.
        draws = [torch.rand((), generator=states[i].generator, dtype=torch.float64).item() for i in sampled_rows]
        uniform = torch.tensor(draws, dtype=torch.float32, device=x.device)
        return greedy_tokens.index_copy(0, rows, sample_inverse_cdf(probs, uniform))


def _edits_logits(s: RequestSampling) -> bool:
    return (s.bias_ids is not None or s.count_row is not None or s.seen_row is not None
            or (s.stop_ids is not None and s.num_generated < s.params.min_tokens))


# ---------------------------------------------------------------- pure pieces (tested alone)
def apply_penalties(
    logits: torch.Tensor,  # (R, V)
    counts: torch.Tensor,  # (R, V) generated-token counts
    presence: torch.Tensor,  # (R,)
    frequency: torch.Tensor,  # (R,)
) -> torch.Tensor:  # (R, V)
    return logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def top_k_mask(probs: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """probs (R, V), top_k per row -> (R, V) bool: each row's k most likely tokens (ties kept)."""
    k = torch.tensor(top_k, device=probs.device).clamp_(1, probs.shape[-1])
    values = torch.topk(probs, int(k.max()), dim=-1).values  # (R, Kmax), descending
    kth = values.gather(1, (k - 1)[:, None])  # (R, 1)
    return probs >= kth


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs (R, V), top_p (R,) -> (R, V) bool: the nucleus of each row, in vocab order.

    A token is kept when the mass of the tokens ranked above it is below top_p, so the most
    likely token is always kept. Rows with top_p >= 1 keep everything (no rounding losses).
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_above < top_p[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep | (top_p[:, None] >= 1.0)


def sample_inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs (R, V) unnormalized, >= 0; uniform (R,) in [0, 1) -> (R,) int64 token ids.

    Picks the first token whose cumulative mass exceeds uniform * total; a token with zero
    probability can never be picked, since its cumulative mass equals its predecessor's.
    """
    cdf = torch.cumsum(probs, dim=-1)  # (R, V)
    total = cdf[:, -1:]
    threshold = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, threshold, right=True)[:, 0]
    return index.clamp_(max=probs.shape[-1] - 1)


def _topk(raw: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(k, raw.shape[-1])
    if k <= 0:
        empty = torch.empty((raw.shape[0], 0), device=raw.device)
        return empty.float(), empty.long()
    return torch.topk(raw, k, dim=-1)
