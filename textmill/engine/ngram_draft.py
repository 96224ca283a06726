"""Draft tokens from the request's own text (prompt lookup, n-gram speculation).

At one stream a decode step reads every weight for one token; verifying a few guessed
tokens in the same step reads them once for all (the runner computes and samples every
position of the chunk). The guess: the tokens that followed the last time the request's
latest MAX_N (down to MIN_N) tokens occurred in its prompt or output, as vLLM's "ngram"
and llama.cpp's lookup decoding do. Repeated names, code, quoted text and loops hit; open
prose mostly finds nothing, and then nothing is drafted and the step is a plain decode.

Exact: the scheduler drafts only for requests whose next token is a function of that
position's logits and the request's next draw alone (SamplingParams.draftable: no
penalties, no grammar), the kernels compute a position's logits bit for bit the same in a
chunk as in a one-token step, a draft is kept only up to the first position where the
sampled token differs from it, and the runner rewinds a sampled request's generator past
the draws of the rows it drops. The tokens, logprobs and finish reasons are those of
plain decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from textmill.engine.request import Request

MAX_N = 3  # the longest tail that is looked up
MIN_N = 2  # shorter tails guess too often wrong to pay for the extra rows
MAX_PAUSE = 16  # steps without guessing, at most, after guesses that all failed
# The prompt's last MAX_INDEXED tokens are looked up, not more: its index costs ~0.7 ms and
# ~220 bytes a token, and many requests may guess at once.
MAX_INDEXED = 16384
# How often a request's guesses hold: counts of guesses that held and of guesses that failed,
# each scoring (a step's carried guess, or one no step carried) weighed in at full and the
# older ones times DECAY (about the last ten scorings), from PRIOR of each: a new request's
# guess holds half the time.
DECAY = 0.9
PRIOR = 1.0


@dataclass(eq=False)
class _Index:
    """One request's tokens and, per n, where each n-gram last ended (its last token's position)."""

    tokens: list[int] = field(default_factory=list)
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # n-grams ending before this position are in last_end
    skipped: int = 0  # the prompt's first tokens, left out of `tokens` (MAX_INDEXED)
    # How many to guess next (see NgramDrafter.observe), and the steps left to sit out.
    allowance: int = 0
    pause: int = 0
    misses: int = 0  # guessing steps in a row that kept nothing
    held: float = PRIOR
    failed: float = PRIOR
    # The last guess made, (the position it starts at, its tokens), until its tokens are known:
    # one the step did not carry is scored against the tokens that came, so that a request
    # whose guesses would hold shows it without costing a row (see odds()).
    unscored: tuple[int, tuple[int, ...]] | None = None


class NgramDrafter:
    def __init__(self, max_tokens: int):
        assert max_tokens > 0
        self.max_tokens = max_tokens
        self._index: dict[str, _Index] = {}

    def propose(self, request: Request, limit: int) -> tuple[int, ...]:
        """Up to min(limit, the request's allowance) guesses of the tokens after its last
        one; () when its tail has not occurred before, or while it sits out a pause."""
        index = self._catch_up(request)
        if index.pause:
            index.pause -= 1
            return ()
        limit = min(limit, index.allowance)
        if limit <= 0:
            return ()
        tokens = index.tokens
        for n in range(MAX_N, MIN_N - 1, -1):
            if len(tokens) <= n:
                continue
            end = index.last_end.get(tuple(tokens[-n:]))
            if end is not None:
                # What followed, copied on past the end of the text as LZ77 copies an
                # overlapping match: a loop of period p continues as itself.
                draft: list[int] = []
                for pos in range(end + 1, end + 1 + limit):
                    draft.append(tokens[pos] if pos < len(tokens) else draft[pos - len(tokens)])
                index.unscored = (len(tokens), tuple(draft))
                return tuple(draft)
        return ()

    def observe(self, request_id: str, guessed: int, kept: int) -> None:
        """What a step made of the request's guesses. A wrong guess costs its rows' work
        (nearly nothing while a step only streams the weights, a row's share of the
        arithmetic once it is bound by that), so the allowance follows the text: all kept,
        the next guess is longer; some kept, it is as long as what held; none kept, the
        request sits out 1, 2, 4 ... MAX_PAUSE steps before it guesses one token again."""
        index = self._index.get(request_id)
        if index is None or guessed == 0:
            return
        index.unscored = None
        self._score(index, kept, kept < guessed)
        if kept == guessed:
            index.allowance, index.misses = min(self.max_tokens, 2 * guessed), 0
        elif kept:
            index.allowance, index.misses = kept, 0
        else:
            index.allowance = 1
            index.pause = min(MAX_PAUSE, 1 << index.misses)
            index.misses += 1

    def odds(self, request_id: str) -> float:
        """The chance that the request's next guessed token holds, given that the ones before
        it in the guess did: its guesses' record so far (the same chance for every position of
        a guess, so guess i holds with odds ** (i + 1))."""
        index = self._index.get(request_id)
        held, failed = (index.held, index.failed) if index is not None else (PRIOR, PRIOR)
        return held / (held + failed)

    @staticmethod
    def _score(index: _Index, held: int, failed: bool) -> None:
        index.held = DECAY * index.held + held
        index.failed = DECAY * index.failed + failed

    def forget(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def _catch_up(self, request: Request) -> _Index:
        index = self._index.get(request.request_id)
        if index is None:
            index = self._index[request.request_id] = _Index(allowance=self.max_tokens)
        tokens = index.tokens
        if not tokens:
            index.skipped = max(0, request.num_prompt_tokens - MAX_INDEXED)
            tokens.extend(request.prompt_token_ids[index.skipped :])
        tokens.extend(request.output_token_ids[index.skipped + len(tokens) - request.num_prompt_tokens :])
        # Every n-gram that has a next token is registered, the newest occurrence winning:
        # the request's own last n tokens (no continuation yet) are the key, never a value.
        for end in range(index.indexed, len(tokens) - 1):
            for n in range(MIN_N, MAX_N + 1):
                if end + 1 >= n:
                    index.last_end[tuple(tokens[end + 1 - n : end + 1])] = end
        index.indexed = max(index.indexed, len(tokens) - 1)
        if index.unscored is not None and index.unscored[0] < len(tokens):
            # A guess no step carried: as far as the tokens have come, did it hold?
            start, guess = index.unscored
            came = tokens[start : start + len(guess)]
            held = next((i for i, (a, b) in enumerate(zip(came, guess)) if a != b), len(came))
            self._score(index, held, held < len(came))
            index.unscored = None
        return index
