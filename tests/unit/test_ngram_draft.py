"""Guessed tokens (engine/ngram_draft.py) and the scheduler steps that check them.

The fake runner below keeps a real paged KV store (tests/unit/test_scheduler.py's) and picks
each next token from the context it reads back, mostly repeating the text three tokens
back, so guesses from the request's own text often hold and sometimes fail. Whatever the
guesses, a request must generate exactly what it generates without them.
"""
import pytest

from textmill.config import CacheConfig, SchedulerConfig
from textmill.engine.ngram_draft import NgramDrafter
from textmill.engine.request import Request
from textmill.engine.scheduler import Scheduler
from textmill.engine.step_costs import SETTLED
from textmill.messages import RunnerOutput, TokenLogprob
from textmill.sampling_params import FinishReason, SamplingParams
from tests.unit.test_scheduler import FakeRunner


def looping_token(context):
    """Three tokens back, except where the context's length is a multiple of 11."""
    if len(context) % 11 == 0 or len(context) < 3:
        return 500 + len(context) % 13
    return context[-3]


class DraftingRunner(FakeRunner):
    """Samples after every position a chunk's guesses need and keeps them as the runner does."""

    def __init__(self, block_size):
        super().__init__(block_size)
        self.rows_sampled = 0

    def execute(self, scheduled):
        for rid in scheduled.finished_request_ids:
            self.known.discard(rid)
        for rid in (*scheduled.finished_request_ids, *scheduled.preempted_request_ids):
            self.tables.pop(rid, None)
        for chunk in scheduled.chunks:
            table = self.tables.setdefault(chunk.request_id, [])
            assert len(table) == chunk.block_offset
            table.extend(chunk.new_block_ids)
        for new in scheduled.new_requests:
            self.known.add(new.request_id)
        sampled, accepted = {}, {}
        for chunk in scheduled.chunks:
            context = self._compute(chunk)
            if not chunk.sample:
                continue
            k = len(chunk.draft)
            assert tuple(chunk.token_ids[len(chunk.token_ids) - k:]) == chunk.draft if k else True
            rows = []
            for j in range(k + 1):
                seen = context[: len(context) - k + j]
                token = looping_token(seen)
                rows.append(TokenLogprob(token, -len(seen) / 100.0))
            self.rows_sampled += k + 1
            kept = 0
            while kept < k and rows[kept].token_id == chunk.draft[kept]:
                kept += 1
            sampled[chunk.request_id] = rows[kept]
            if kept:
                accepted[chunk.request_id] = tuple(rows[:kept])
        return RunnerOutput(sampled, {}, accepted)

    def _compute(self, chunk):
        """As FakeRunner's, but a table may run ahead: a rejected guess's block stays allocated."""
        bs, end = self.block_size, chunk.start + len(chunk.token_ids)
        table = self.tables[chunk.request_id]
        assert len(table) >= -(-end // bs)
        for pos, token in enumerate(chunk.token_ids, chunk.start):
            self.kv.setdefault(table[pos // bs], [None] * bs)[pos % bs] = token
        context = [self.kv[table[p // bs]][p % bs] for p in range(end)]
        assert None not in context, "read a slot nobody wrote"
        return context


def make(draft_tokens, block_size=4, num_blocks=64, max_seqs=8, max_len=256, draft_max_seqs=0, budget=64):
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                        draft_tokens=draft_tokens, draft_max_seqs=draft_max_seqs),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=True),
    )
    return sched, DraftingRunner(block_size)


def streaming(rows):
    """A step bound by reading the weights: each row adds 2% to its time."""
    return 1.0 + 0.02 * rows


def computing(rows):
    """A step bound by the multiply-adds: its time is its rows'."""
    return 0.01 * rows


def step(sched, runner, cost=streaming):
    """One engine step, timed as the engine times the runner: cost(rows) seconds."""
    scheduled = sched.schedule()
    output = runner.execute(scheduled)
    sched.record_step(cost(sum(len(c.token_ids) for c in scheduled.chunks)))
    sched.update_from_output(scheduled, output)
    return scheduled


def generate(draft_tokens, requests, cost=streaming, **kw):
    """Run the requests (added together) to the end: (request -> (tokens, logprobs, reason), steps)."""
    sched, runner = make(draft_tokens, **kw)
    for r in requests:
        sched.add_request(r)
    steps = []
    while sched.has_unfinished:
        steps.append(step(sched, runner, cost))
        assert len(steps) < 1000
    out = {r.request_id: (tuple(r.output_token_ids), tuple(lp.logprob for lp in r.output_logprobs), r.finish_reason)
           for r in requests}
    return out, steps, sched


def greedy(rid, prompt, **params):
    params.setdefault("max_tokens", 40)
    return Request(rid, tuple(prompt), SamplingParams(temperature=0.0, logprobs=0, **params))


# ---------------------------------------------------------------- the drafter alone
def test_the_tokens_after_the_tails_last_occurrence_are_proposed():
    drafter = NgramDrafter(max_tokens=4)
    r = Request("a", (1, 2, 3, 4, 5, 9, 9, 2, 3), SamplingParams())
    assert drafter.propose(r, 10) == (4, 5, 9, 9)  # (2, 3) last ended at position 2
    assert drafter.propose(r, 2) == (4, 5)


def test_the_newest_occurrence_wins_and_longer_tails_first():
    drafter = NgramDrafter(max_tokens=3)
    r = Request("a", (7, 2, 3, 8, 1, 2, 3, 6, 6, 1, 2, 3), SamplingParams())
    assert drafter.propose(r, 3) == (6, 6, 1)  # (1, 2, 3) at positions 4-6, not (2, 3) at 1-2


def test_a_loop_is_continued_past_the_end_of_the_text():
    drafter = NgramDrafter(max_tokens=5)
    r = Request("a", (4, 5, 6, 5, 6), SamplingParams())
    assert drafter.propose(r, 5) == (5, 6, 5, 6, 5)


def test_nothing_is_proposed_for_a_new_tail_and_output_tokens_are_indexed():
    drafter = NgramDrafter(max_tokens=4)
    r = Request("a", (1, 2, 3, 4), SamplingParams())
    assert drafter.propose(r, 4) == ()
    r.output_token_ids.extend([1, 2])
    assert drafter.propose(r, 4) == (3, 4, 1, 2)
    drafter.forget("a")
    assert drafter.propose(r, 0) == ()


def test_the_allowance_follows_what_held_and_misses_pause_guessing():
    from textmill.engine.ngram_draft import MAX_PAUSE
    drafter = NgramDrafter(max_tokens=4)
    r = Request("a", (1, 2, 3, 1, 2, 3, 1, 2), SamplingParams())
    assert drafter.propose(r, 10) == (3, 1, 2, 3)
    drafter.observe("a", 4, 4)
    assert len(drafter.propose(r, 10)) == 4  # all held: as long as allowed
    drafter.observe("a", 4, 2)
    assert drafter.propose(r, 10) == (3, 1)  # as long as what held
    pauses = []
    for _ in range(7):  # nothing held, again and again: 1, 2, 4 ... steps without guesses
        drafter.observe("a", 1, 0)
        skipped = 0
        while not drafter.propose(r, 10):
            skipped += 1
        pauses.append(skipped)
    assert pauses == [1, 2, 4, 8, MAX_PAUSE, MAX_PAUSE, MAX_PAUSE]
    assert drafter.propose(r, 10) == (3,)  # back to one guess after a pause
    drafter.observe("a", 1, 1)
    assert drafter.propose(r, 10) == (3, 1)  # and growing again once guesses hold


# ---------------------------------------------------------------- through the scheduler
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_guessing_changes_no_token_no_logprob_and_takes_fewer_steps(block_size):
    prompts = {"a": [5, 6, 7, 5, 6, 7, 5], "b": [1, 2, 3, 4, 1, 2, 3], "c": list(range(20, 33))}
    requests = lambda: [greedy(k, p) for k, p in prompts.items()]  # noqa: E731
    for rid, p in prompts.items():
        plain, plain_steps, _ = generate(0, [greedy(rid, p)], block_size=block_size)
        guessed, steps, _ = generate(4, [greedy(rid, p)], block_size=block_size)
        assert guessed == plain
        assert len(steps) < len(plain_steps)
        assert any(c.draft for s in steps for c in s.chunks)
    # Three at once, while rows cost little: several requests guess in one step, the results the same.
    together, steps, _ = generate(4, requests(), block_size=block_size)
    assert together == generate(0, requests(), block_size=block_size)[0]
    assert any(sum(bool(c.draft) for c in s.chunks) > 1 for s in steps)
    # At most draft_max_seqs running: none while three run.
    capped, steps, _ = generate(4, requests(), block_size=block_size, draft_max_seqs=2)
    assert capped == together
    assert not any(c.draft for s in steps if len(s.chunks) > 2 for c in s.chunks)


def test_guesses_stop_at_max_tokens_the_window_and_a_stop_token():
    p = [5, 6, 7, 5, 6, 7, 5]
    for params in ({"max_tokens": 6}, {"max_tokens": 1}, {"stop_token_ids": (7,)}, {"stop_token_ids": (500,)}):
        plain = generate(0, [greedy("a", p, **params)])[0]
        guessed, steps, _ = generate(4, [greedy("a", p, **params)])
        assert guessed == plain
        tokens, _, reason = guessed["a"]
        assert len(tokens) <= params.get("max_tokens", 40)
        assert reason in (FinishReason.STOP, FinishReason.LENGTH)
        for s in steps:  # never more guesses than the tokens the request may still take
            for c in s.chunks:
                assert len(c.draft) <= max(0, params.get("max_tokens", 40) - 1)
    windowed, steps, _ = generate(4, [greedy("a", p, max_tokens=100)], max_len=20)
    assert windowed == generate(0, [greedy("a", p, max_tokens=100)], max_len=20)[0]
    assert len(windowed["a"][0]) == 20 - len(p)
    assert all(c.start + len(c.token_ids) <= 20 for s in steps for c in s.chunks)


def test_only_draftable_requests_guess():
    p = [5, 6, 7, 5, 6, 7, 5]
    for params in ({"presence_penalty": 0.5}, {"frequency_penalty": -0.5}, {"repetition_penalty": 1.1},
                   {"min_tokens": 2, "stop_token_ids": (9,)}, {"bad_words_token_ids": ((9,),)}):
        r = Request("a", tuple(p), SamplingParams(max_tokens=20, **params))
        _, steps, _ = generate(4, [r])
        assert not any(c.draft for s in steps for c in s.chunks), params
    _, steps, _ = generate(0, [greedy("a", p)])
    assert not any(c.draft for s in steps for c in s.chunks)
    # A sampled request guesses too: its runner rewinds the draws of the rows it drops.
    _, steps, _ = generate(4, [Request("a", tuple(p), SamplingParams(max_tokens=20, temperature=0.8, seed=3))])
    assert any(c.draft for s in steps for c in s.chunks)


def test_published_blocks_hold_confirmed_tokens_only():
    """A rejected guess's slot is never published: a later request with the first one's
    whole text takes its blocks as prefix hits and continues exactly as a fresh one."""
    p = [5, 6, 7, 5, 6, 7, 5, 6]
    sched, runner = make(4, block_size=4)
    first = greedy("a", p, max_tokens=30)
    sched.add_request(first)
    while sched.has_unfinished:
        step(sched, runner)
    record_free = sched.kv_manager.num_free_blocks
    assert record_free == sched.kv_manager.pool.num_blocks
    text = p + list(first.output_token_ids)
    second = greedy("b", text, max_tokens=12)
    sched.add_request(second)
    while sched.has_unfinished:
        step(sched, runner)
    assert second.num_cached_tokens >= 4 * ((len(text) - 1) // 4) - 4 > 0
    fresh = generate(0, [greedy("b", text, max_tokens=12)])[0]["b"]
    assert (tuple(second.output_token_ids), tuple(lp.logprob for lp in second.output_logprobs)) == fresh[:2]


def test_guesses_take_no_blocks_another_request_needs():
    """Out of blocks, a guess is dropped rather than preempting anyone."""
    p = [5, 6, 7, 5, 6, 7, 5]
    # 3 blocks of 4: the prompt and the first tokens fit, guesses past them do not.
    out, steps, sched = generate(4, [greedy("a", p, max_tokens=5)], num_blocks=3)
    assert out == generate(0, [greedy("a", p, max_tokens=5)], num_blocks=3)[0]
    assert sched.num_preemptions == 0
    # Two running, 4 blocks: A's guesses would take the block B's next token needs.
    for draft_tokens in (4, 0):
        sched, runner = make(draft_tokens, block_size=4, num_blocks=4, draft_max_seqs=2)
        sched.add_request(greedy("A", (1, 2, 3, 1, 2, 3, 1), max_tokens=8))
        sched.add_request(greedy("B", (9, 8, 7, 6), max_tokens=8))
        for _ in range(2):
            step(sched, runner)
        assert sched.num_preemptions == 0


def test_no_guesses_while_requests_wait():
    """A waiting request gets the step's budget and blocks before anyone's guesses."""
    sched, runner = make(4, max_seqs=1)
    sched.add_request(greedy("a", [5, 6, 7, 5, 6, 7, 5], max_tokens=12))
    sched.add_request(greedy("b", [1, 2, 1, 2, 1], max_tokens=4))
    drafted = []
    while sched.has_unfinished:
        scheduled = step(sched, runner)
        drafted += [(c.request_id, bool(c.draft), bool(sched.waiting)) for c in scheduled.chunks]
    assert not any(d for rid, d, _ in drafted if rid == "a")  # b waited for all of a's steps
    assert any(d for rid, d, _ in drafted if rid == "b")  # b ran alone, nothing waiting


def test_truncated_output_has_the_sum_one_token_steps_make():
    lps = [-0.1, -2.5e-7, -3.3, -1e-9, -0.7]
    r = Request("a", (1,), SamplingParams(logprobs=0))
    for i, lp in enumerate(lps):
        r.append_output(TokenLogprob(10 + i, lp), keep_logprobs=True)
    r.truncate_output(3)
    plain = Request("a", (1,), SamplingParams(logprobs=0))
    for i, lp in enumerate(lps[:3]):
        plain.append_output(TokenLogprob(10 + i, lp), keep_logprobs=True)
    assert (r.output_token_ids, r.output_logprobs, r.cumulative_logprob) == (
        plain.output_token_ids, plain.output_logprobs, plain.cumulative_logprob)


# ---------------------------------------------------------------- guesses that pay for their rows
def test_a_guess_no_step_carried_still_scores_the_requests_odds():
    drafter = NgramDrafter(max_tokens=4)
    r = Request("a", (1, 2, 3, 1, 2, 3, 1, 2), SamplingParams())
    assert drafter.odds("a") == 0.5  # nothing known yet
    for _ in range(6):  # guesses made and dropped (too dear), the text going on as guessed
        guess = drafter.propose(r, 4)
        r.output_token_ids.append(guess[0])
    held = drafter.odds("a")
    assert held > 0.8
    drafter.propose(r, 4)
    r.output_token_ids.append(99)  # what came was not the guess
    drafter.propose(r, 4)
    assert drafter.odds("a") < held
    drafter.observe("a", 3, 0)  # a carried guess that failed at once
    assert drafter.odds("a") < held - 0.1


def test_no_guesses_before_a_decode_step_of_as_many_rows_is_timed():
    sched, runner = make(4)
    sched.step_costs.record(2, 0.01)  # another row count's time says nothing of one row's
    sched.add_request(greedy("a", [5, 6, 7, 5, 6, 7, 5]))
    while sched.has_unfinished:
        scheduled = sched.schedule()
        assert not any(c.draft for c in scheduled.chunks)
        sched.update_from_output(scheduled, runner.execute(scheduled))


def test_guesses_that_cannot_pay_for_their_rows_are_not_made():
    """Where every row costs its share, a guess that may fail loses time. The prior (rows
    nearly free) has a few steps try them, at one stream or three (up to SETTLED a row
    count); their times stop them."""
    prompts = {"a": [5, 6, 7, 5, 6, 7, 5], "b": [1, 2, 3, 4, 1, 2, 3], "c": [8, 9, 8, 9, 8]}
    for ids in (["a"], ["a", "b", "c"]):
        out, steps, _ = generate(4, [greedy(k, prompts[k]) for k in ids], cost=computing)
        tried = [sum(len(c.token_ids) for c in s.chunks) for s in steps if any(c.draft for c in s.chunks)]
        assert 1 <= len(tried) <= SETTLED * len(set(tried)) and len(tried) <= 2 * SETTLED
        assert out == generate(0, [greedy(k, prompts[k]) for k in ids])[0]


def test_requests_whose_guesses_hold_earn_guesses_where_rows_cost_more():
    """Fixed work of 2 rows' worth: at three streams a guess pays only when it holds more
    than 3 in 5 times; a new request's odds (a half) do not, a request that loops earns them
    from its guesses scored against the tokens that came."""
    prompts = {"a": [5, 6, 7, 5, 6, 7, 5], "b": [1, 2, 3, 1, 2, 3, 1], "c": [8, 9, 4, 8, 9, 4, 8]}
    requests = lambda: [greedy(k, p, max_tokens=30) for k, p in prompts.items()]  # noqa: E731
    out, steps, _ = generate(4, requests(), cost=lambda rows: 2.0 + rows)
    assert out == generate(0, requests())[0]
    decodes = [s for s in steps if all(len(c.token_ids) == 1 + len(c.draft) for c in s.chunks)]
    assert not any(c.draft for c in decodes[0].chunks)
    assert any(c.draft for s in decodes[5:] for c in s.chunks)


def test_only_the_prompts_last_tokens_are_looked_up(monkeypatch):
    import textmill.engine.ngram_draft as ngram_draft
    monkeypatch.setattr(ngram_draft, "MAX_INDEXED", 8)
    drafter = NgramDrafter(max_tokens=4)
    r = Request("a", (1, 2, 3, *range(10, 30), 1, 2), SamplingParams())
    assert drafter.propose(r, 4) == ()  # (1, 2) then 3 lies before the last 8 tokens
    r.output_token_ids.extend([40, 41, 1, 2])
    assert drafter.propose(r, 4) == (40, 41, 1, 2)  # the output follows the kept tail
