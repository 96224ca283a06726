"""The batched, stateless pieces the sampler (runner/sampler.py) composes: penalties,
truncation to top-k/top-p/min-p on candidates, the inverse-CDF draw, raw logprobs. Each is
a function of tensors alone, so the tests check them one by one."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

import numpy as np
import torch

from textmill.runner.row_buffer import RowBuffer

# A model's top-p 0.9-0.95 nucleus is a few dozen tokens at most steps: one topk of this many
# decides it. Wider rows try 16x more candidates (_next_size), then the whole vocabulary.
FIRST_CANDIDATES = 64
GROWTH = 16
# Rows per pass through the scratch buffer (64 MB at V = 262,144): it bounds the buffer, and
# a long prompt's logprobs no longer need a (P, V) tensor at once.
BLOCK_ROWS = 64

def apply_penalties(
    logits: torch.Tensor,  # (R, V)
    counts: torch.Tensor,  # (R, V) generated-token counts
    presence: torch.Tensor,  # (R,)
    frequency: torch.Tensor,  # (R,)
) -> torch.Tensor:  # (R, V)
    return logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def top_k_mask(probs: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """probs (R, V), top_k per row -> (R, V) bool: each row's k most likely tokens (ties kept).

    The whole-row mask: the sampler decides top-k on truncate()'s candidates, and the tests
    hold those to this."""
    k = torch.tensor(top_k, device=probs.device).clamp_(1, probs.shape[-1])
    values = torch.topk(probs, int(k.max()), dim=-1).values  # (R, Kmax), descending
    kth = values.gather(1, (k - 1)[:, None])  # (R, 1)
    return probs >= kth


@dataclass(frozen=True)
class Candidates:
    """Some rows' top C tokens, most likely first, and which of them the truncations keep."""

    rows: torch.Tensor  # (G,) int64: rows of the probs given to truncate()
    values: torch.Tensor  # (G, C) float32 probabilities, descending
    ids: torch.Tensor  # (G, C) int64 token ids
    keep: torch.Tensor  # (G, C) bool


def truncate(
    probs: torch.Tensor,  # (R, V) softmax rows
    top_k: Sequence[int | None],
    top_p: Sequence[float],
    min_p: Sequence[float],
) -> list[Candidates]:
    """top-k (ties kept) -> top-p -> min-p, decided on each row's top candidates.

    Each of the three keeps a prefix of the row's descending order (top-p's mass above a token
    never decreases along it), so once a row's last candidate is dropped no token outside its
    candidates is kept: the row is decided. The other rows try more candidates (_next_size),
    at last the whole row. The kept set is the one a full sort gives, up to the order among
    equal probabilities (which of several tied tokens at the boundary stays), like any two
    sorts. Every row lands in exactly one group.
    """
    vocab = probs.shape[-1]
    k, p, m = _truncation_tensors(top_k, top_p, min_p, vocab, probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    size = min(vocab, max([FIRST_CANDIDATES] + [n for n in top_k if n is not None]))
    groups = []
    while True:
        values, ids = torch.topk(probs, size, dim=-1)  # sorted, descending
        keep = _keep_ranked(values, k, p, m)
        # One host sync per size tried (on a GPU too): the price of not sorting.
        wide = keep[:, -1] if size < vocab else torch.zeros_like(keep[:, -1])
        if not bool(wide.any()):
            return groups + [Candidates(rows, values, ids, keep)]
        if not bool(wide.all()):  # the decided rows leave; only the others are copied
            done, more = (~wide).nonzero()[:, 0], wide.nonzero()[:, 0]
            groups.append(Candidates(rows[done], values[done], ids[done], keep[done]))
            probs, rows, values = probs[more], rows[more], values[more]
            k, p, m = (None if t is None else t[more] for t in (k, p, m))
        size = _next_size(values, p, vocab)


def _truncation_tensors(top_k, top_p, min_p, vocab: int, device) -> tuple[torch.Tensor | None, ...]:
    """Per-row (k, top_p, min_p) tensors; None for a truncation no row uses, so that its
    whole-row passes are skipped. top_p 1 becomes inf: a mass is always below it."""
    as_tensor = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    k = p = m = None
    if any(n is not None for n in top_k):
        k = as_tensor([min(n or vocab, vocab) for n in top_k], torch.int64)
    if any(x < 1.0 for x in top_p):
        p = as_tensor([x if x < 1.0 else float("inf") for x in top_p], torch.float32)
    if any(x > 0.0 for x in min_p):
        m = as_tensor(list(min_p), torch.float32)
    return k, p, m


def _next_size(values: torch.Tensor, top_p: torch.Tensor | None, vocab: int) -> int:
    """The next number of candidates for rows whose nucleus is wider than values (G, C).

    16x more, or more still where the nucleus must be wider: the tokens left hold at most
    values[:, -1] each, so the mass top-p still lacks needs at least missing / that many.
    Past a quarter of the vocabulary topk is nearly a sort: then the whole row.
    """
    size, bigger = values.shape[-1], values.shape[-1] * GROWTH
    if top_p is not None:
        missing = (torch.where(top_p.isinf(), 0.0, top_p) - values.sum(-1)).clamp(min=0.0)
        bigger = max(bigger, size + float((missing / values[:, -1].clamp(min=1e-30)).max()))
    return vocab if bigger > vocab // 4 else int(bigger)


def _keep_ranked(values: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """values (R, C) descending -> (R, C) bool: what top-k, top-p and min-p (None: no row
    uses it) keep of them, with the arithmetic of the whole-row masks the sampler used
    before candidates, so the float decisions at the boundaries are the same."""
    keep = None
    if top_k is not None:  # ties with the k-th are kept; k beyond the candidates keeps them all
        keep = values >= values.gather(1, (top_k.clamp(max=values.shape[-1]) - 1)[:, None])
    if top_p is not None:
        kept = values if keep is None else values * keep
        # The cumulative sum of a prefix of the sorted row is the whole sorted row's, entry for entry.
        below = torch.cumsum(kept, dim=-1) - kept < top_p[:, None]
        keep = below if keep is None else keep & below
    if min_p is not None:  # against the top probability, which top-k and top-p always keep
        over = values >= min_p[:, None] * values[:, :1]
        keep = over if keep is None else keep & over
    keep = torch.ones_like(values, dtype=torch.bool) if keep is None else keep
    keep[:, 0] = True  # the most likely token always stays
    return keep


def vocab_order(values: torch.Tensor, ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidates -> the same values in vocabulary order, and their ids (None: all of them)."""
    if values.shape[-1] == vocab:  # every token is a candidate: undo the permutation, no sort
        return torch.zeros_like(values).scatter_(1, ids, values), None
    order = ids.argsort(dim=-1)  # C ids, distinct
    return values.gather(1, order), ids.gather(1, order)


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs (R, V), top_p (R,) -> (R, V) bool: the nucleus of each row, in vocab order.

    A token is kept when the mass of the tokens ranked above it is below top_p, so the most
    likely token is always kept. Rows with top_p >= 1 keep everything (no rounding losses).
    The sampler works on truncate()'s candidates; this whole-row mask is for callers and tests.
    """
    keep = (top_p[:, None] >= 1.0).expand_as(probs).clone()
    narrow = (top_p < 1.0).nonzero()[:, 0]
    if narrow.numel():
        sub, p = probs.index_select(0, narrow), top_p[narrow].tolist()
        for group in truncate(sub, [None] * len(p), p, [0.0] * len(p)):
            rows = torch.zeros((group.rows.shape[0], probs.shape[-1]), dtype=torch.bool, device=probs.device)
            keep.index_copy_(0, narrow[group.rows], rows.scatter_(1, group.ids, group.keep))
    return keep


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


def raw_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int, scratch: RowBuffer, ranks: list | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (S, V) float32, tokens (S,) -> (logprob of each token (S,), top k logprobs
    (S, k), their ids (S, k)), from torch.log_softmax, one block of rows at a time.

    Not logits[tok] - logsumexp(logits): that agrees with log_softmax only to float32
    rounding of the logsumexp (up to 8 ulps at V = 262,144), and costs more. torch.logsumexp
    is four unfused passes with a (S, V) temporary of its own, each pass split across threads
    even for one row; log_softmax is one fused pass per row. Measured on 2 threads, V =
    262,144: S = 64, 115-173 ms against 27-33 ms for log_softmax into this reused buffer (and
    82-100 ms into a fresh tensor, mostly page faults); S = 1, 0.33 ms against 0.17 ms.
    So the numbers are bit for bit the old ones, and the buffer is what got cheaper.

    `ranks`, when a list: gets each block's (rows,) int64 rank of its token, 1 + the number of
    tokens with a higher logprob (vLLM's rank; one more pass over the block).
    """
    chosen, top_lps, top_ids = [], [], []
    k = min(k, logits.shape[-1])
    for start in range(0, logits.shape[0], BLOCK_ROWS) or [0]:  # no rows: one empty block
        block = logits[start : start + BLOCK_ROWS]
        raw = torch.log_softmax(block, dim=-1, out=scratch.rows(block.shape[0]))
        chosen.append(raw.gather(1, tokens[start : start + BLOCK_ROWS, None])[:, 0])
        if ranks is not None:
            ranks.append((raw > chosen[-1][:, None]).sum(dim=-1) + 1)
        if k > 0:
            values, ids = torch.topk(raw, k, dim=-1)
            top_lps.append(values)
            top_ids.append(ids)
    if k <= 0:
        return torch.cat(chosen), logits.new_empty((logits.shape[0], 0)), tokens.new_empty((logits.shape[0], 0))
    return torch.cat(chosen), torch.cat(top_lps), torch.cat(top_ids)


def raw_logprobs_of_rows(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], k: int, scratch: RowBuffer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw_logprobs for `rows` only (row indices into logits); every other row gets NaN for
    its token and no alternatives (ids 0, logprobs -inf), in tensors of all rows."""
    n = logits.shape[0]
    if len(rows) == n:
        return raw_logprobs(logits, tokens, k, scratch)
    chosen = torch.full((n,), float("nan"), dtype=torch.float32, device=logits.device)
    top_lps = torch.full((n, k), float("-inf"), dtype=torch.float32, device=logits.device)
    top_ids = torch.zeros((n, k), dtype=torch.int64, device=logits.device)
    if rows:
        index = torch.tensor(rows, device=logits.device)
        c, lps, ids = raw_logprobs(logits.index_select(0, index), tokens.index_select(0, index), k, scratch)
        chosen[index], top_lps[index], top_ids[index] = c, lps, ids
    return chosen, top_lps, top_ids


def greedy_tokens(x: torch.Tensor, ops: ModuleType | None = None) -> torch.Tensor:
    """The first index of each row's maximum (a NaN counts as the maximum), as torch.max.

    On the CPU through the kernels' argmax_rows where the runner has them (`ops`, layer.cpp:
    rows cut into chunks over every thread; in the engine 0.55 against 0.93 ms for Gemma 3's
    16 x 262,144, 1.9 against 3.5 at 64), else numpy's argmax on one thread (0.47 ms against
    torch.max's 4.3 ms, argmax's 5.0, for 16 x 262,144 on one Zen 4 thread: torch's
    reductions with an index are not vectorized). Same first-maximum rule and NaN rule
    (tests/unit/test_runner_sampler.py)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.max(x, dim=-1).indices
    if ops is not None and x.dim() == 2 and x.shape[1] > 0:
        return ops.argmax_rows(x.contiguous())
    return torch.from_numpy(x.contiguous().numpy().argmax(axis=-1).astype(np.int64, copy=False))
