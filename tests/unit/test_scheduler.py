"""Scheduler driven by a fake runner that keeps a real paged KV store.

The fake runner writes each chunk's tokens into the slots its block table names and
reads the whole context back from the blocks before choosing the next token. Its token
is a deterministic function of that context, so a wrong block table, a block shared by
mistake or KV overwritten while cached changes the generated tokens.
"""
import pytest

from textmill.config import CacheConfig, SchedulerConfig
from textmill.engine.request import Request, RequestStatus
from textmill.engine.scheduler import Scheduler
from textmill.messages import RunnerOutput, TokenLogprob
from textmill.sampling_params import FinishReason, SamplingParams


def next_token(context):
    return 1000 + (sum(context) * 31 + len(context) * 7 + context[-1]) % 997


def token_logprob(context, token):
    return -((sum(context) + token) % 89) / 10.0


class FakeRunner:
    def __init__(self, block_size):
        self.block_size = block_size
        self.kv = {}  # block id -> list of the tokens written in its slots
        self.known = set()  # request ids announced in new_requests and not finished
        self.tokens_computed = 0
        # Block tables as a runner keeps them: built from each chunk's new blocks alone,
        # dropped when a request leaves or is preempted (its blocks come again, from the first).
        self.tables = {}
        self.new_blocks_per_step = []  # block ids the scheduler sent, step by step

    def execute(self, scheduled):
        for rid in scheduled.finished_request_ids:
            self.known.discard(rid)
        for rid in (*scheduled.finished_request_ids, *scheduled.preempted_request_ids):
            self.tables.pop(rid, None)
        self.new_blocks_per_step.append(sum(len(c.new_block_ids) for c in scheduled.chunks))
        for chunk in scheduled.chunks:
            table = self.tables.setdefault(chunk.request_id, [])
            assert len(table) == chunk.block_offset, "the new blocks do not follow on"
            table.extend(chunk.new_block_ids)
        for new in scheduled.new_requests:
            assert new.request_id not in self.known, "announced twice"
            self.known.add(new.request_id)
        sampled, prompt_logprobs = {}, {}
        for chunk in scheduled.chunks:
            assert chunk.request_id in self.known
            context = self._compute(chunk)
            self.tokens_computed += len(chunk.token_ids)
            if chunk.sample:
                token = next_token(context)
                sampled[chunk.request_id] = TokenLogprob(token, token_logprob(context, token))
            if chunk.prompt_logprob_targets is not None:
                prompt_logprobs[chunk.request_id] = tuple(
                    TokenLogprob(t, token_logprob(context[: chunk.start + i + 1], t))
                    for i, t in enumerate(chunk.prompt_logprob_targets)
                )
        return RunnerOutput(sampled, prompt_logprobs)

    def _compute(self, chunk):
        """Write the chunk's KV, then read positions [0, end) back through the block table."""
        bs = self.block_size
        end = chunk.start + len(chunk.token_ids)
        table = self.tables[chunk.request_id]
        assert len(table) == -(-end // bs)
        for pos, token in enumerate(chunk.token_ids, chunk.start):
            slots = self.kv.setdefault(table[pos // bs], [None] * bs)
            slots[pos % bs] = token
        context = [self.kv[table[p // bs]][p % bs] for p in range(end)]
        assert None not in context, "read a slot nobody wrote"
        return context


def make_scheduler(block_size=4, num_blocks=64, budget=64, max_seqs=8, max_len=256, caching=True):
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
    )
    return sched, FakeRunner(block_size)


def req(rid, prompt, **params):
    params.setdefault("max_tokens", 4)
    return Request(rid, tuple(prompt), SamplingParams(**params))


def step(sched, runner):
    scheduled = sched.schedule()
    updated = sched.update_from_output(scheduled, runner.execute(scheduled))
    return scheduled, updated


def run_all(sched, runner, max_steps=500):
    steps = []
    while sched.has_unfinished:
        steps.append(step(sched, runner)[0])
        assert len(steps) < max_steps
    return steps


def chunk_sizes(scheduled):
    return {c.request_id: len(c.token_ids) for c in scheduled.chunks}


def prompt(n, base=1):
    return [base + i for i in range(n)]


def reference_tokens(prompt_ids, **params):
    """What a request generates alone in a roomy cache."""
    sched, runner = make_scheduler(num_blocks=256)
    r = req("ref", prompt_ids, **params)
    sched.add_request(r)
    run_all(sched, runner)
    return r.output_token_ids


# ---------------------------------------------------------------- admission
def test_admission_is_fifo_and_capped_by_max_num_seqs():
    sched, runner = make_scheduler(max_seqs=3)
    requests = [req(f"r{i}", prompt(5, 10 * i), max_tokens=2 + i) for i in range(5)]
    for r in requests:
        sched.add_request(r)
    first, _ = step(sched, runner)
    assert [n.request_id for n in first.new_requests] == ["r0", "r1", "r2"]
    assert [c.request_id for c in first.chunks] == ["r0", "r1", "r2"]
    assert [c.new_block_ids for c in first.chunks] == [(0, 1), (2, 3), (4, 5)]
    assert all(c.sample and c.start == 0 for c in first.chunks)
    assert (sched.num_running, sched.num_waiting) == (3, 2)
    second, _ = step(sched, runner)  # r0 reaches max_tokens=2 here
    assert chunk_sizes(second) == {"r0": 1, "r1": 1, "r2": 1}
    assert requests[0].finish_reason is FinishReason.LENGTH
    third, _ = step(sched, runner)
    assert third.finished_request_ids == ("r0",)
    assert [n.request_id for n in third.new_requests] == ["r3"]
    assert chunk_sizes(third) == {"r1": 1, "r2": 1, "r3": 5}
    run_all(sched, runner)
    assert [len(r.output_token_ids) for r in requests] == [2, 3, 4, 5, 6]


def test_chunked_prefill_keeps_a_running_stream_decoding():
    sched, runner = make_scheduler(block_size=16, budget=32)
    stream = req("stream", prompt(4), max_tokens=20)
    sched.add_request(stream)
    step(sched, runner)
    long = req("long", prompt(100, 500), max_tokens=2)
    sched.add_request(long)
    sizes, samples = [], []
    for _ in range(4):
        scheduled, _ = step(sched, runner)
        sizes.append(chunk_sizes(scheduled))
        samples.append({c.request_id: c.sample for c in scheduled.chunks})
        assert scheduled.num_tokens <= 32
    assert sizes == [{"stream": 1, "long": 31}] * 3 + [{"stream": 1, "long": 7}]
    assert [s["long"] for s in samples] == [False, False, False, True]
    assert all(s["stream"] for s in samples)
    assert stream.num_output_tokens == 5 and long.num_output_tokens == 1
    assert sched.kv_manager.block_ids("long") == (1, 2, 3, 4, 5, 6, 7)
    assert long.num_computed_tokens == 100
    run_all(sched, runner)
    assert long.output_token_ids == reference_tokens(prompt(100, 500), max_tokens=2)
    assert stream.output_token_ids == reference_tokens(prompt(4), max_tokens=20)


def test_prefill_behind_decodes_leaves_a_token_for_each():
    sched, runner = make_scheduler(budget=8)
    sched.add_request(req("long", prompt(20), max_tokens=3))
    first, _ = step(sched, runner)
    assert chunk_sizes(first) == {"long": 8}
    sched.add_request(req("d1", prompt(2, 50)))
    sched.add_request(req("d2", prompt(2, 60)))
    second, _ = step(sched, runner)
    assert chunk_sizes(second) == {"long": 8}  # no budget left to admit
    third, _ = step(sched, runner)
    assert chunk_sizes(third) == {"long": 4, "d1": 2, "d2": 2}
    fourth, _ = step(sched, runner)
    assert chunk_sizes(fourth) == {"long": 1, "d1": 1, "d2": 1}


def _decode_steps(context: int, steps: int = 64) -> tuple[list[int], list[int]]:
    """Block ids sent per step, and the lengths of the requests' tables, while one request
    decodes after a `context`-token prompt (block size 4)."""
    sched, runner = make_scheduler(block_size=4, num_blocks=1024, budget=4096, max_len=4096)
    sched.add_request(req("r", prompt(context), max_tokens=steps + 2))
    step(sched, runner)  # the prompt, and its whole table, in one step
    sent = []
    for _ in range(steps):
        scheduled, _ = step(sched, runner)
        sent.append(sum(len(c.new_block_ids) for c in scheduled.chunks))
        assert runner.tables["r"] == list(sched.kv_manager.block_ids("r"))
    return sent, runner.new_blocks_per_step[:1]


def test_block_ids_sent_per_step_do_not_grow_with_the_context():
    """A decode step sends the request's new block when it starts one, else nothing: the
    same at a 16-token context and a 2,000-token one (the table lives in the runner)."""
    short, short_prompt = _decode_steps(16)
    long, long_prompt = _decode_steps(2000)
    assert short == long  # the same pattern, block for block
    assert max(long) == 1 and sum(long) == 64 // 4
    assert (short_prompt, long_prompt) == ([4], [500])  # the prompt's blocks, sent once


# ---------------------------------------------------------------- preemption
def test_preemption_recomputes_and_gives_the_same_tokens():
    # 6 blocks of 4 tokens; each request grows to 5 blocks, so they cannot both fit.
    sched, runner = make_scheduler(block_size=4, num_blocks=6, max_len=24)
    a = req("a", prompt(8, 1), max_tokens=12)
    b = req("b", prompt(8, 40), max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    steps = run_all(sched, runner)
    preempting = [s for s in steps if s.preempted_request_ids]
    assert preempting and all(s.preempted_request_ids == ("b",) for s in preempting)
    assert sched.num_preemptions == len(preempting) == b.num_preemptions
    assert a.num_preemptions == 0
    # b is announced once; a resumption is not a new request.
    announced = [n.request_id for s in steps for n in s.new_requests]
    assert announced == ["a", "b"]
    first = preempting[0]
    assert chunk_sizes(first) == {"a": 1}
    sent_to_a = [b for s in steps[:steps.index(first) + 1] for c in s.chunks if c.request_id == "a"
                 for b in c.new_block_ids]
    assert sent_to_a == [0, 1, 4, 5]  # each block once, in table order
    assert a.output_token_ids == reference_tokens(prompt(8, 1), max_tokens=12)
    assert b.output_token_ids == reference_tokens(prompt(8, 40), max_tokens=10)
    assert a.finish_reason is b.finish_reason is FinishReason.LENGTH
    assert sched.kv_manager.num_free_blocks == 6


def test_preemption_without_prefix_cache_recomputes_everything():
    sched, runner = make_scheduler(block_size=4, num_blocks=6, max_len=24, caching=False)
    a = req("a", prompt(8, 1), max_tokens=12)
    b = req("b", prompt(8, 40), max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    steps = run_all(sched, runner)
    resumed = [c for s in steps for c in s.chunks if c.request_id == "b" and c.start == 0]
    assert len(resumed) == 2  # the first prefill and the recompute
    assert resumed[1].token_ids[:8] == tuple(prompt(8, 40)) and len(resumed[1].token_ids) > 8
    assert b.output_token_ids == reference_tokens(prompt(8, 40), max_tokens=10)


def test_a_request_that_cannot_grow_preempts_itself_when_newest():
    sched, runner = make_scheduler(block_size=4, num_blocks=3, max_len=12)
    old = req("old", prompt(4), max_tokens=4)  # 8 tokens: 2 blocks
    new = req("new", prompt(4, 20), max_tokens=4)
    sched.add_request(old)
    sched.add_request(new)
    first, _ = step(sched, runner)
    assert [c.new_block_ids for c in first.chunks] == [(0,), (1,)]
    second, _ = step(sched, runner)  # both need a second block; only one is free
    assert second.preempted_request_ids == ("new",)
    assert chunk_sizes(second) == {"old": 1}
    run_all(sched, runner)
    assert new.output_token_ids == reference_tokens(prompt(4, 20), max_tokens=4)


def test_request_larger_than_the_pool_is_a_configuration_error():
    sched, _ = make_scheduler(block_size=4, num_blocks=2)
    with pytest.raises(AssertionError):
        sched.add_request(req("big", prompt(9), max_tokens=0))


# ---------------------------------------------------------------- abort / finish
def test_abort_frees_blocks_at_the_next_schedule():
    sched, runner = make_scheduler(num_blocks=8)
    running = req("run", prompt(6), max_tokens=10)
    waiting = req("wait", prompt(3))
    sched.add_request(running)
    step(sched, runner)
    sched.add_request(waiting)
    assert sched.kv_manager.num_free_blocks == 6
    assert sched.abort_request("run") is running
    assert sched.abort_request("wait") is waiting
    assert sched.abort_request("nobody") is None
    assert running.status is RequestStatus.FINISHED and running.finish_reason is FinishReason.ABORT
    assert sched.kv_manager.num_free_blocks == 6  # a step may still be writing them
    assert not sched.has_unfinished and sched.has_finished_to_report
    out = sched.schedule()
    assert out.is_empty
    assert out.finished_request_ids == ("run", "wait")
    assert sched.kv_manager.num_free_blocks == 8
    assert not sched.has_finished_to_report


def test_abort_during_a_step_drops_its_results():
    sched, runner = make_scheduler()
    r = req("r", prompt(5))
    sched.add_request(r)
    scheduled = sched.schedule()
    output = runner.execute(scheduled)
    sched.abort_request("r")
    assert sched.update_from_output(scheduled, output) == []
    assert r.output_token_ids == [] and r.num_computed_tokens == 0


def test_finish_request_from_the_output_processor():
    sched, runner = make_scheduler()
    r = req("r", prompt(5), max_tokens=10)
    sched.add_request(r)
    step(sched, runner)
    assert sched.finish_request("r") is r
    assert r.finish_reason is FinishReason.STOP
    assert sched.schedule().finished_request_ids == ("r",)
    assert sched.kv_manager.num_free_blocks == 64
    assert sched.finish_request("r") is None


# ---------------------------------------------------------------- finishing
def test_max_tokens_finishes_with_length():
    sched, runner = make_scheduler()
    r = req("r", prompt(5), max_tokens=3)
    sched.add_request(r)
    run_all(sched, runner)
    assert r.num_output_tokens == 3 and r.finish_reason is FinishReason.LENGTH
    assert sched.kv_manager.num_free_blocks == 64


def test_eos_finishes_with_stop_unless_ignored():
    tokens = reference_tokens(prompt(5), max_tokens=6)
    eos = tokens[2]
    first = tokens.index(eos)
    sched, runner = make_scheduler()
    r = req("r", prompt(5), max_tokens=6, stop_token_ids=(eos,))
    ignoring = req("i", prompt(5), max_tokens=6, stop_token_ids=())
    sched.add_request(r)
    sched.add_request(ignoring)
    run_all(sched, runner)
    assert r.output_token_ids == tokens[: first + 1]
    assert r.finish_reason is FinishReason.STOP
    assert ignoring.output_token_ids == tokens and ignoring.finish_reason is FinishReason.LENGTH


def test_context_window_finishes_with_length():
    sched, runner = make_scheduler(max_len=8)
    r = req("r", prompt(5), max_tokens=50)
    sched.add_request(r)
    run_all(sched, runner)
    assert r.num_tokens == 8 and r.num_output_tokens == 3
    assert r.finish_reason is FinishReason.LENGTH


def test_logprobs_and_cumulative_logprob_are_recorded():
    sched, runner = make_scheduler()
    plain = req("p", prompt(5), max_tokens=3)
    with_lp = req("l", prompt(5), max_tokens=3, logprobs=2)
    sched.add_request(plain)
    sched.add_request(with_lp)
    run_all(sched, runner)
    assert plain.output_logprobs == []
    assert [lp.token_id for lp in with_lp.output_logprobs] == with_lp.output_token_ids
    assert with_lp.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in with_lp.output_logprobs))
    assert plain.cumulative_logprob == with_lp.cumulative_logprob


# ---------------------------------------------------------------- prompt logprobs
def test_prompt_logprob_targets_follow_each_chunk():
    sched, runner = make_scheduler(block_size=4, budget=4)
    r = req("r", prompt(10, 100), max_tokens=1, prompt_logprobs=1)
    sched.add_request(r)
    steps = run_all(sched, runner)
    targets = [c.prompt_logprob_targets for s in steps for c in s.chunks]
    assert targets == [(101, 102, 103, 104), (105, 106, 107, 108), (109,)]
    assert [lp.token_id for lp in r.prompt_logprobs] == prompt(9, 101)
    assert r.num_output_tokens == 1


def test_scoring_with_max_tokens_zero_never_samples():
    sched, runner = make_scheduler(block_size=4, budget=6)
    r = req("r", prompt(10, 100), max_tokens=0, prompt_logprobs=0)
    sched.add_request(r)
    first, updated = step(sched, runner)
    assert updated == [r] and not first.chunks[0].sample
    second, updated = step(sched, runner)
    assert updated == [r] and not second.chunks[0].sample
    assert second.chunks[0].prompt_logprob_targets == (107, 108, 109)
    assert r.finish_reason is FinishReason.LENGTH and r.output_token_ids == []
    assert len(r.prompt_logprobs) == 9
    assert not sched.has_unfinished


def test_max_tokens_zero_without_scoring_still_finishes():
    sched, runner = make_scheduler()
    r = req("r", prompt(3), max_tokens=0)
    sched.add_request(r)
    _, updated = step(sched, runner)
    assert updated == [r] and r.finish_reason is FinishReason.LENGTH


def test_prompt_logprob_requests_take_no_prefix_hits():
    sched, runner = make_scheduler(block_size=4)
    sched.add_request(req("warm", prompt(13)))
    run_all(sched, runner)
    scoring = req("s", prompt(13), prompt_logprobs=0, max_tokens=1)
    sched.add_request(scoring)
    scheduled, _ = step(sched, runner)
    assert scheduled.chunks[0].start == 0 and len(scheduled.chunks[0].token_ids) == 13
    assert scoring.num_cached_tokens == 0 and len(scoring.prompt_logprobs) == 12


def test_prompt_logprobs_survive_preemption_without_duplicates():
    sched, runner = make_scheduler(block_size=4, num_blocks=64, budget=4)
    alone = req("s", prompt(10, 30), max_tokens=2, prompt_logprobs=0)
    sched.add_request(alone)
    run_all(sched, runner)
    # Again in a pool too small for two: the scoring request is the newest and is
    # preempted mid-prefill, then rescored from position 0.
    sched, runner = make_scheduler(block_size=4, num_blocks=4, budget=4, max_len=16)
    hog = req("hog", prompt(4, 1), max_tokens=9)
    scoring = req("s", prompt(10, 30), max_tokens=2, prompt_logprobs=0)
    sched.add_request(hog)
    step(sched, runner)
    sched.add_request(scoring)
    steps = run_all(sched, runner)
    assert any(s.preempted_request_ids == ("s",) for s in steps)
    assert scoring.prompt_logprobs == alone.prompt_logprobs
    assert len(scoring.prompt_logprobs) == 9
    assert scoring.output_token_ids == alone.output_token_ids
    # Decode chunks of a scoring request carry no targets.
    assert steps[-1].chunks[0].prompt_logprob_targets is None


# ---------------------------------------------------------------- prefix cache
def test_second_request_reuses_a_three_block_prefix():
    sched, runner = make_scheduler(block_size=16)
    shared = prompt(48, 7)
    first = req("a", shared + [1, 2], max_tokens=1)
    sched.add_request(first)
    step(sched, runner)
    second = req("b", shared + [3], max_tokens=3)
    sched.add_request(second)
    scheduled, _ = step(sched, runner)
    assert scheduled.finished_request_ids == ("a",)
    (chunk,) = scheduled.chunks
    assert (chunk.start, chunk.token_ids, chunk.new_block_ids) == (48, (3,), (0, 1, 2, 4))
    assert second.num_cached_tokens == 48
    run_all(sched, runner)
    assert second.output_token_ids == reference_tokens(shared + [3], max_tokens=3)
    stats = sched.kv_manager.stats()
    assert (stats.prefix_queries, stats.prefix_hits) == (50 + 49, 48)


def test_running_requests_share_blocks_with_refcounts():
    sched, runner = make_scheduler(block_size=16)
    shared = prompt(48, 7)
    sched.add_request(req("a", shared + [1], max_tokens=5))
    step(sched, runner)
    sched.add_request(req("b", shared + [2], max_tokens=5))
    step(sched, runner)
    assert sched.kv_manager.block_ids("a") == (0, 1, 2, 3)
    assert sched.kv_manager.block_ids("b") == (0, 1, 2, 4)
    assert [sched.kv_manager.pool.ref_count(i) for i in range(5)] == [2, 2, 2, 1, 1]


def test_n_siblings_compute_the_shared_prompt_once():
    sched, runner = make_scheduler(block_size=4)
    shared = prompt(10, 3)  # two full blocks and a partial one
    siblings = [req(f"s{i}", shared, max_tokens=3, seed=i) for i in range(4)]
    for s in siblings:
        sched.add_request(s)
    first, _ = step(sched, runner)
    assert chunk_sizes(first) == {"s0": 10}  # the others wait for its blocks
    assert sched.num_waiting == 3
    second, _ = step(sched, runner)
    assert chunk_sizes(second) == {"s0": 1, "s1": 2, "s2": 2, "s3": 2}
    # s0 got its blocks in the first step; the others get theirs, hits included, now.
    assert [c.new_block_ids for c in second.chunks] == [(), (0, 1, 3), (0, 1, 4), (0, 1, 5)]
    assert [runner.tables[c.request_id] for c in second.chunks] == [[0, 1, 2], [0, 1, 3], [0, 1, 4], [0, 1, 5]]
    assert [s.num_cached_tokens for s in siblings] == [0, 8, 8, 8]
    assert sched.kv_manager.pool.ref_count(0) == 4
    run_all(sched, runner)
    assert runner.tokens_computed == 10 + 3 * 2 + 4 * 2
    expected = reference_tokens(shared, max_tokens=3)
    assert all(s.output_token_ids == expected for s in siblings)


def test_siblings_wait_through_a_chunked_prefill():
    sched, runner = make_scheduler(block_size=4, budget=6)
    shared = prompt(14, 3)
    siblings = [req(f"s{i}", shared, max_tokens=2) for i in range(2)]
    for s in siblings:
        sched.add_request(s)
    sizes = [chunk_sizes(s) for s in run_all(sched, runner)]
    # s1 joins once every block it could hit is published, before s0 samples.
    assert sizes[:3] == [{"s0": 6}, {"s0": 6}, {"s0": 2, "s1": 2}]
    assert siblings[1].num_cached_tokens == 12


def test_without_prefix_caching_siblings_do_not_wait():
    sched, runner = make_scheduler(block_size=4, caching=False)
    for i in range(3):
        sched.add_request(req(f"s{i}", prompt(10, 3)))
    first, _ = step(sched, runner)
    assert chunk_sizes(first) == {"s0": 10, "s1": 10, "s2": 10}


# ---------------------------------------------------------------- everything at once
def test_random_mix_matches_requests_run_alone():
    """Shared prefixes, chunking, a tight pool (preemption) and aborts; outputs stay exact."""
    import random

    rng = random.Random(1234)
    sched, runner = make_scheduler(block_size=4, num_blocks=16, budget=12, max_seqs=5, max_len=40)
    system = prompt(9, 700)
    requests, aborted = [], set()
    for i in range(30):
        body = [rng.randrange(1, 50) for _ in range(rng.randrange(1, 12))]
        tokens = (system if rng.random() < 0.6 else []) + body
        params = {"max_tokens": rng.randrange(0, 10)}
        if rng.random() < 0.2:
            params["prompt_logprobs"] = 0
        requests.append((req(f"r{i}", tokens, **params), params))
    pending = list(requests)
    steps = 0
    while pending or sched.has_unfinished:
        for _ in range(rng.randrange(0, 3)):
            if pending:
                sched.add_request(pending.pop(0)[0])
        if rng.random() < 0.05 and sched.running:
            victim = rng.choice(sched.running).request_id
            sched.abort_request(victim)
            aborted.add(victim)
        step(sched, runner)
        steps += 1
        assert steps < 2000
    sched.schedule()  # frees the last aborts
    assert sched.kv_manager.num_free_blocks == 16
    assert aborted and sched.num_preemptions > 0 and sched.kv_manager.stats().prefix_hits > 0
    for r, params in requests:
        if r.request_id in aborted:
            continue
        assert r.output_token_ids == reference_tokens(list(r.prompt_token_ids), **params)
        if "prompt_logprobs" in params:
            assert len(r.prompt_logprobs) == r.num_prompt_tokens - 1
