"""What a decode step costs by its rows, and how many guessed tokens are worth their rows.

A guessed token rides the step as one more row. While a step only streams the weights (one
or a few streams on a CPU), a few more rows cost nearly nothing: across the matrix's models
a 5-row step took 1.04-1.56x a one-row step. From 16 rows or so the step is bound by the
multiply-adds and each row costs its share; there a guess pays only when it very likely
holds. Where that turn comes depends on the model, its quantization and the machine, so it
is not assumed: the engine reports how long each decode step took, StepCosts keeps the
times by number of rows, and `worth_taking` picks the guesses that raise the expected
tokens a second of the step.
"""
from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Sequence

SAMPLES = 5  # a row count's time: the median of its last SAMPLES steps, so one stalled step moves it little
SETTLED = 3  # until a row count has this many times, what its neighbours say caps it (StepCosts._table)
# A row count not timed in the last STALE decode steps is timed again before its old times
# count: one step stalled by a neighbour must not keep guesses off for the server's life.
STALE = 512
# Guesses go in only if they promise this much more than the plain step's tokens a second.
# Smaller promises were losses in bench/draft_ab.py (0.93-0.97x at 4-16 streams): a step's
# time varies by a few % from step to step, and a stream that ends sooner only helps once
# another takes its place.
MIN_GAIN = 1.05
# A row count not timed: on the line between the timed counts around it, or past them
# (StepCosts._estimate). Past a single timed count, its time scaled as if a step were PRIOR_FIXED rows' worth of
# fixed work plus its rows: 5 rows at 1.44x one row, 20 at 1.17x 16 (measured on the matrix's
# models: 1.04-1.56x and 1.2-1.3x). The first step of that many rows replaces the guess.
PRIOR_FIXED = 8.0
# A mixture of experts' row brings its own experts: 5 rows read up to 5x the experts' bytes
# (~3.9x for 4 of 32 experts a token, ~4.4x for 8 of 128, as a random router spreads them).
# From bench/moe_steps.py's one-row split (Zen 4), a 5-row step comes to ~1.8x a one-row step
# on gpt-oss's shapes and ~2.2x on Qwen3-30B-A3B's: about 2-4 rows' worth of fixed work, where
# the dense prior takes 8 (13/9 = 1.44x) and lets guesses in that the timed steps then refuse.
PRIOR_FIXED_EXPERTS = 2.0


class StepCosts:
    """Seconds a decode step of n rows takes, from the last steps of n rows (or near n).
    `prior_fixed`: rows' worth of fixed work a step is taken to have before it is timed
    (PRIOR_FIXED; PRIOR_FIXED_EXPERTS for a mixture of experts)."""

    def __init__(self, prior_fixed: float = PRIOR_FIXED) -> None:
        self.prior_fixed = prior_fixed
        self._times: dict[int, deque[float]] = {}
        self._medians: dict[int, float] = {}  # of _times, kept as they change: a step asks for many
        self._timed_at: dict[int, int] = {}  # the step count when each row count was last timed
        self._steps = 0
        self._cached: tuple[list[int], list[float]] | None = None  # _table() until the next record()

    def record(self, rows: int, seconds: float) -> None:
        assert rows > 0 and seconds >= 0
        self._steps += 1
        if self._stale(rows):
            self._times.pop(rows, None)
        times = self._times.setdefault(rows, deque(maxlen=SAMPLES))
        times.append(seconds)
        self._medians[rows] = statistics.median(times)
        self._timed_at[rows] = self._steps
        self._cached = None

    def estimate(self, rows: int) -> float | None:
        """Seconds for a decode step of `rows` rows; None before any decode step was timed."""
        return self._estimate(rows, *self._table())

    def worth_taking(self, rows: int, odds: Sequence[float]) -> int:
        """How many of the guesses, best first, to add to a decode step of `rows` rows (each
        a request's next token): the count that gives the most expected tokens a second,
        if that is MIN_GAIN times the plain step's.
        odds[i]: the chance that guess i holds (and every guess of its request before it),
        in falling order. 0 until a step of `rows` rows has been timed."""
        counts, times = self._table()
        i = bisect.bisect_left(counts, rows)
        if i == len(counts) or counts[i] != rows or times[i] <= 0:
            return 0  # a plain step of this many rows first: its time is what guesses must beat
        base = times[i]
        best, best_rate, expected = 0, MIN_GAIN * rows / base, float(rows)
        for i, p in enumerate(odds, start=1):
            expected += p
            seconds = self._estimate(rows + i, counts, times)
            if seconds > 0 and expected / seconds > best_rate:
                best, best_rate = i, expected / seconds
        return best

    def _table(self) -> tuple[list[int], list[float]]:
        """The timed row counts, ascending, and their times (stale ones left out). A count
        with fewer than SETTLED times counts no dearer than the others around it make it: a
        step stalled by a neighbour, timed once, must not keep guesses off its row count.
        Kept until the next record(): a step's plan asks for it twice (guess_plan.py)."""
        if self._cached is not None:
            return self._cached
        counts = sorted(n for n in self._times if not self._stale(n))
        times = [self._medians[n] for n in counts]
        capped = list(times)
        for i, n in enumerate(counts):
            if len(self._times[n]) >= SETTLED or len(counts) == 1:
                continue
            if 0 < i < len(counts) - 1:  # on the line between its neighbours
                n0, n1, t0, t1 = counts[i - 1], counts[i + 1], times[i - 1], times[i + 1]
                around = t0 + (t1 - t0) * (n - n0) / (n1 - n0)
            else:  # the prior from its one neighbour: a line through two near counts is mostly noise
                near = i + 1 if i == 0 else i - 1
                around = times[near] * (self.prior_fixed + n) / (self.prior_fixed + counts[near])
            capped[i] = min(times[i], around)
        self._cached = counts, capped
        return self._cached

    def _estimate(self, rows: int, counts: list[int], times: list[float]) -> float | None:
        if not counts:
            return None
        i = bisect.bisect_left(counts, rows)
        if i < len(counts) and counts[i] == rows:
            return times[i]
        if 0 < i < len(counts):  # between two timed counts: on the line between them
            n0, n1, t0, t1 = counts[i - 1], counts[i], times[i - 1], times[i]
            return t0 + (t1 - t0) * (rows - n0) / (n1 - n0)
        if i == len(counts) and len(counts) > 1:
            # Past the timed counts: on the line from the one nearest half the largest to the
            # largest (two adjacent counts would let a few % of noise set the slope), never
            # below the largest's time.
            j = min(bisect.bisect_left(counts, counts[-1] // 2), len(counts) - 2)
            slope = max(0.0, (times[-1] - times[j]) / (counts[-1] - counts[j]))
            return times[-1] + slope * (rows - counts[-1])
        nearest, seconds = (counts[0], times[0]) if i == 0 else (counts[-1], times[-1])
        return seconds * (self.prior_fixed + rows) / (self.prior_fixed + nearest)

    def _stale(self, rows: int) -> bool:
        return self._steps - self._timed_at.get(rows, -STALE) >= STALE
