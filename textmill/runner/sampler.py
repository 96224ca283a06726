"""The sampler: one vectorized pass that chooses the next token of every sampled row.

The order is fixed and documented (OpenAI semantics):

    logit bias -> repetition/presence/frequency penalties -> min_tokens ban
    -> allowed_token_ids / bad_words -> grammar mask -> temperature -> top-k -> top-p -> min-p
    -> sample

* logit bias: logits[j] += bias[j] for the request's (token, bias) pairs.
* penalties: logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, where
  c counts the tokens this request has *generated* (never its prompt).
* repetition_penalty (vLLM/HF): over tokens seen in the prompt *or* generated, positive
  logits are divided by it and negative ones multiplied.
* min_tokens: the request's stop_token_ids are banned until it has generated that many.
* allowed_token_ids (vLLM): every other token is -inf. bad_words (vLLM): a one-token word is
  -inf, a longer word's last token is -inf right after the request generated the rest.
* grammar mask (structured outputs): every token the request's grammar does not allow next
  is -inf, all constrained rows of the step in one batched bitmask and one masked_fill
  (textmill/grammar/masks.py); the chosen token then advances the row's matcher. Masking
  comes after the edits above and before temperature and truncation, so top-k/top-p/min-p
  choose among allowed tokens only, greedy is the best allowed token, and a seeded row draws
  its one uniform as ever.
* temperature 0 is greedy: argmax after bias and penalties. Greedy and sampled rows mix
  freely in one batch.
* top-k keeps the k most likely tokens; min-p drops tokens below min_p * the top probability.
* top-p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one).
* sampling inverts the CDF (in vocabulary order) at one uniform drawn from the request's own
  CPU torch.Generator, seeded from params.seed: a request's tokens depend on its own seed and
  logits only, never on which other requests share the batch.

Logprobs are the model's raw log_softmax in float32, before any of the above (the grammar
mask too), so scoring a text with echo gives the same numbers as generating it.

Cost with a large vocabulary (Gemma 3: 262,144 tokens). Nothing here sorts a whole row in
the common case: top-k, top-p and min-p each keep a prefix of the row's descending order, so
they are decided on the row's top C candidates (torch.topk), C growing only for rows whose
last candidate is still kept (a nucleus wider than C); a full sort is the last resort. The
kept tokens are then put back in vocabulary order and the CDF is inverted over them alone,
which on the CPU draws the very token the whole row would (zeros do not move a cumulative
sum, accumulated in float64 there). The one freedom left is which of several exactly tied
probabilities at the nucleus boundary stay: topk and sort order ties differently (neither is
stable), so with tied logits (bf16 checkpoints) a seeded draw can differ from the sort-based
sampler's. Whole-row work (temperature, softmax, log_softmax) goes through one reused scratch
buffer of at most 64 rows: on a CPU a fresh (S, V) tensor each step costs more in page
faults than the softmax that fills it.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

import torch

from textmill.runner.sampling_ops import (  # noqa: F401  (the tests import the pure pieces from here)
    BLOCK_ROWS, apply_penalties, greedy_tokens, raw_logprobs, raw_logprobs_of_rows, sample_inverse_cdf, top_k_mask,
    top_p_mask, truncate, vocab_order,
)
from textmill.runner.row_buffer import RowBuffer
from textmill.runner.sampler_state import PenaltyCounts, RequestSampling
from textmill.sampling_params import SamplingParams
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from textmill.grammar.compiler import LLGuidanceCompiler

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
    ranks: torch.Tensor  # (P,) int64: 1 + tokens more likely than the target


class Sampler:
    def __init__(self, vocab_size: int, device: str | torch.device = "cpu", grammars: "LLGuidanceCompiler | None" = None,
                 ops: ModuleType | None = None):
        """`grammars`: the server's compiler (textmill/grammar), needed for structured outputs.
        `ops`: the runner's C++ layer kernels, if it runs on them (their argmax_rows)."""
        self.vocab_size = vocab_size
        self.ops = ops
        self.device = torch.device(device)
        self.grammar_masks = None
        if grammars is not None:
            from textmill.grammar.masks import GrammarMasks
            self.grammar_masks = GrammarMasks(grammars, vocab_size, self.device)
        self.penalty_counts = PenaltyCounts(vocab_size, device)
        self.seen = PenaltyCounts(vocab_size, device)  # prompt + generated, for repetition_penalty
        self._scratch = RowBuffer(vocab_size, device)  # whole-row work, one block at a time
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
        if params.allowed_token_ids is not None:
            ids = torch.tensor(params.allowed_token_ids, dtype=torch.int64, device=self.device)
            state.allowed_ids = ids[ids < self.vocab_size]
        if params.bad_words_token_ids:
            state.generated = []
        if params.structured is not None:
            if self.grammar_masks is None:
                raise ValueError("this sampler has no grammar compiler: structured outputs are not available")
            self.grammar_masks.add(request_id, params.structured)
        self._requests[request_id] = state

    def remove_request(self, request_id: str) -> None:
        self._bias_batch = None  # an id may come back with other params
        state = self._requests.pop(request_id, None)
        if state is not None and state.count_row is not None:
            self.penalty_counts.release(state.count_row)
        if state is not None and state.seen_row is not None:
            self.seen.release(state.seen_row)
        if self.grammar_masks is not None:
            self.grammar_masks.remove(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def params(self, request_id: str) -> SamplingParams:
        return self._requests[request_id].params

    def draw_mark(self, request_id: str) -> torch.Tensor:
        """Where the request's generator stands (see rewind_draws)."""
        return self._requests[request_id].generator.get_state()

    def rewind_draws(self, request_id: str, mark: torch.Tensor, used: int) -> None:
        """Put the generator back to `mark` and on by `used` draws: a step that sampled after
        each guessed token leaves it as if only the kept rows had drawn (model_runner.py)."""
        generator = self._requests[request_id].generator
        generator.set_state(mark)
        for _ in range(used):
            _draw(generator)

    # ------------------------------------------------------------ sampling
    def sample(self, logits: torch.Tensor, request_ids: Sequence[str], *, in_place: bool = False) -> SampleOutput:
        """logits (S, V) float32, one row per request id -> the chosen token of each row.

        Also counts each chosen token for the penalties of the request's next steps. The
        caller's logits stay as they were, unless `in_place` (the runner, whose logits are
        this step's own): then the edits (bias, penalties, masks) are made in them, except
        when a row reads its raw logprobs afterwards.
        """
        states = [self._requests[r] for r in request_ids]
        logits = logits.float()
        # A copy only when something edits the logits and they must stay raw: at 16 rows
        # of a 262k vocabulary the copy alone was ~1 ms of a 45 ms step.
        keep_raw = not in_place or any(_reads_raw_logprobs(s) for s in states)
        x = logits.clone() if keep_raw and any(_edits_logits(s) for s in states) else logits
        self._apply_bias(x, states, tuple(request_ids))
        self._apply_repetition(x, states)
        penalized = self._apply_penalties(x, states)
        self._ban_early_stops(x, states)
        self._restrict_tokens(x, states)
        constrained = [i for i, s in enumerate(states) if s.params.structured is not None]
        if constrained:
            self.grammar_masks.apply(x, request_ids)
        sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if len(sampled_rows) == len(states):  # no greedy row: every token is drawn below
            tokens = torch.zeros(len(states), dtype=torch.int64, device=x.device)
        else:
            tokens = greedy_tokens(x, self.ops)  # (S,) greedy rows keep this
        if sampled_rows:
            tokens = self._sample_rows(x, tokens, states, sampled_rows)
        if penalized is not None:
            rows, count_rows = penalized
            ones = torch.ones(rows.shape[0], dtype=torch.float32, device=x.device)
            self.penalty_counts.counts.index_put_((count_rows, tokens.index_select(0, rows)), ones, accumulate=True)
        self._after_sampling(states, tokens)
        if constrained:  # one host read of the constrained rows' tokens, for their matchers
            chosen_ids = tokens.index_select(0, torch.tensor(constrained, device=tokens.device)).tolist()
            self.grammar_masks.accept([request_ids[i] for i in constrained], chosen_ids)
        return SampleOutput(tokens, *self._chosen_logprobs(logits, tokens, states))

    def _chosen_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, states: list[RequestSampling]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen logprob, top ids, top logprobs) for the rows that use them (logprobs asked,
        or best_of ranking); the others get NaN and no alternatives. The vocabulary-wide
        log_softmax is the biggest per-row cost of a step after the model (V = 262,144: 4M
        values at 16 rows), and most requests never read it."""
        rows = [i for i, s in enumerate(states) if _reads_raw_logprobs(s)]
        k = max((s.params.logprobs or 0) for s in states)
        chosen, top_lps, top_ids = raw_logprobs_of_rows(logits, tokens, rows, k, self._scratch)
        return chosen, top_ids, top_lps

    def prompt_logprobs(self, logits: torch.Tensor, targets: torch.Tensor, k: int) -> PromptLogprobOutput:
        """logits (P, V), targets (P,) -> raw logprob of each target and the top k per row."""
        ranks: list[torch.Tensor] = []
        chosen, top_lps, top_ids = raw_logprobs(logits.float(), targets, k, self._scratch, ranks)
        return PromptLogprobOutput(chosen, top_ids, top_lps, torch.cat(ranks))

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

    def _restrict_tokens(self, x: torch.Tensor, states: list[RequestSampling]) -> None:
        """allowed_token_ids and bad_words (vLLM's): rare, so a loop over the rows that use them."""
        for i, s in enumerate(states):
            if s.allowed_ids is not None:
                kept = x[i].index_select(0, s.allowed_ids)
                x[i].fill_(float("-inf")).index_copy_(0, s.allowed_ids, kept)
            if s.generated is not None:
                banned = [word[-1] for word in s.params.bad_words_token_ids
                          if word[-1] < self.vocab_size
                          and (len(word) == 1 or (len(s.generated) >= len(word) - 1
                                                  and tuple(s.generated[1 - len(word):]) == word[:-1]))]
                if banned:
                    x[i].index_fill_(0, torch.tensor(banned, dtype=torch.int64, device=x.device), float("-inf"))

    def _after_sampling(self, states: list[RequestSampling], tokens: torch.Tensor) -> None:
        idx = [i for i, s in enumerate(states) if s.seen_row is not None]
        if idx:
            seen_rows = torch.tensor([states[i].seen_row for i in idx], device=tokens.device)
            chosen = tokens.index_select(0, torch.tensor(idx, device=tokens.device))
            self.seen.counts.index_put_((seen_rows, chosen), torch.ones_like(chosen, dtype=torch.float32))
        tracked = [i for i, s in enumerate(states) if s.generated is not None]
        if tracked:
            chosen = tokens.index_select(0, torch.tensor(tracked, device=tokens.device)).tolist()
            for i, t in zip(tracked, chosen):
                states[i].generated.append(t)
        for s in states:
            s.num_generated += 1

    def _sample_rows(self, x, greedy_tokens, states, sampled_rows) -> torch.Tensor:
        """Replace greedy_tokens at sampled_rows by a draw from each row's distribution."""
        # The one per-row loop: each row's uniform comes from its own generator.
        draws = [_draw(states[i].generator) for i in sampled_rows]
        picked = []
        for start in range(0, len(sampled_rows), BLOCK_ROWS):
            rows, block_draws = sampled_rows[start : start + BLOCK_ROWS], draws[start : start + BLOCK_ROWS]
            picked.append(self._draw_block(x, rows, [states[i].params for i in rows], block_draws))
        rows = torch.tensor(sampled_rows, dtype=torch.int64, device=x.device)
        return greedy_tokens.index_copy(0, rows, torch.cat(picked))

    def _draw_block(self, x, rows: list[int], params: list[SamplingParams], draws: list[float]) -> torch.Tensor:
        """One block of sampled rows -> their tokens, the rows' probabilities in the scratch."""
        device = x.device
        probs = _tempered_probs(x, rows, [p.temperature for p in params], self._scratch.rows(len(rows)))
        uniform = torch.tensor(draws, dtype=torch.float32, device=device)
        picked = torch.empty(len(params), dtype=torch.int64, device=device)
        truncated = [i for i, p in enumerate(params) if _truncates(p)]
        whole = [i for i, p in enumerate(params) if not _truncates(p)]
        for group, draw in ((truncated, _draw_truncated), (whole, _draw_whole)):
            if group:
                idx = torch.tensor(group, dtype=torch.int64, device=device)
                sub = probs if len(group) == len(params) else probs.index_select(0, idx)
                picked.index_copy_(0, idx, draw(sub, [params[i] for i in group], uniform.index_select(0, idx)))
        return picked


def _draw(generator: torch.Generator) -> float:
    """A sampled row's one uniform."""
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def _tempered_probs(x: torch.Tensor, rows: list[int], temperatures: list[float], out: torch.Tensor) -> torch.Tensor:
    """softmax(x[rows] / temperature) over whole rows, computed in out (R, V) in place: the
    kept tokens' probabilities are softmax's own values (the same draws as ever), and its sum
    spans the whole vocabulary. Bit for bit what x.index_select / t -> softmax gave."""
    if rows == list(range(rows[0], rows[0] + len(rows))):  # a block of rows (all, usually): a view
        src = x[rows[0] : rows[0] + len(rows)]
    else:
        src = torch.index_select(x, 0, torch.tensor(rows, device=x.device), out=out)
    if any(t != 1.0 for t in temperatures):  # one pass either way: x / 1 is x
        src = torch.div(src, torch.tensor(temperatures, device=x.device)[:, None], out=out)
    return torch.softmax(src, dim=-1, out=out)


def _truncates(p: SamplingParams) -> bool:
    return p.top_k is not None or p.top_p < 1.0 or p.min_p > 0.0


def _draw_whole(probs: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor) -> torch.Tensor:
    return sample_inverse_cdf(probs, uniform)  # every token is kept: the whole row's CDF


def _draw_truncated(probs: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor) -> torch.Tensor:
    """Draw from the tokens top-k, top-p and min-p keep, found among each row's candidates."""
    picked = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    top_k, top_p, min_p = ([getattr(p, name) for p in params] for name in ("top_k", "top_p", "min_p"))
    for group in truncate(probs, top_k, top_p, min_p):
        values, ids = vocab_order(group.values * group.keep, group.ids, probs.shape[-1])
        index = sample_inverse_cdf(values, uniform.index_select(0, group.rows))
        picked.index_copy_(0, group.rows, index if ids is None else ids.gather(1, index[:, None])[:, 0])
    return picked


def _reads_raw_logprobs(s: RequestSampling) -> bool:
    """The row's logprobs (raw: before any edit) are returned or rank best_of candidates."""
    return s.params.logprobs is not None or s.params.rank_by_logprob


def _edits_logits(s: RequestSampling) -> bool:
    return (s.bias_ids is not None or s.count_row is not None or s.seen_row is not None
            or s.params.structured is not None or s.allowed_ids is not None or s.generated is not None
            or (s.stop_ids is not None and s.num_generated < s.params.min_tokens))
