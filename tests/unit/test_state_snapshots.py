"""A hybrid's prefix cache (engine/kv_cache/state_snapshots.py): prefix hits end where the runner kept
a recurrent state, and the scheduler's chunks name which states to keep and which to resume from.

The fake runner keeps each request's "recurrent state" as the tokens it has run through, in its
own slots and snapshot slots, as the real runner copies them: a restore from the wrong snapshot,
a snapshot read before it was written, or a hit that no snapshot backs shows as a state that is
not the request's context.
"""
from textmill.config import CacheConfig, SchedulerConfig
from textmill.engine.kv_cache.state_snapshots import StateSnapshots
from textmill.engine.scheduler import Scheduler

from tests.unit.test_scheduler import FakeRunner, prompt, req, run_all, step


def test_snapshots_serve_after_their_step_and_make_room_by_use():
    snaps = StateSnapshots(2)
    a = snaps.claim(b"a")
    assert a is not None and b"a" not in snaps  # written after this step: no hit yet
    assert snaps.claim(b"a") is None  # kept already
    snaps.commit()
    assert b"a" in snaps and snaps.restore(b"a") == a
    b = snaps.claim(b"b")
    snaps.commit()
    snaps.restore(b"a")  # a is now the most recently used: c takes b's slot
    assert snaps.claim(b"c") == b and b"b" not in snaps
    assert snaps.claim(b"d") == a  # then a's
    assert snaps.claim(b"e") is None  # every slot claimed this step: none is taken from under a save
    snaps.commit()
    assert b"c" in snaps and b"d" in snaps and b"a" not in snaps


def test_a_requests_generated_text_keeps_one_snapshot():
    snaps = StateSnapshots(4)
    snaps.claim(b"t1", request_id="r")
    snaps.commit()
    snaps.claim(b"t2", request_id="r")  # replaces t1, whose slot is free again
    snaps.commit()
    assert b"t1" not in snaps and b"t2" in snaps and len(snaps) == 1
    snaps.forget("r")  # r left: its last snapshot stays for a next turn
    snaps.claim(b"t3", request_id="r")
    snaps.commit()
    assert b"t2" in snaps and b"t3" in snaps


class StateRunner(FakeRunner):
    """FakeRunner plus recurrent states: a slot per running request, snapshot slots, both holding
    the tokens run through them."""

    def __init__(self, block_size):
        super().__init__(block_size)
        self.states, self.snapshots = {}, {}
        self.restored = []  # (request, position) of each resume from a snapshot

    def execute(self, scheduled):
        for rid in (*scheduled.finished_request_ids, *scheduled.preempted_request_ids):
            self.states.pop(rid, None)
        for c in scheduled.chunks:  # restores before the step, as the runner's for_step
            if c.start == 0:
                self.states[c.request_id] = []
            elif c.restore_state is not None:
                self.states[c.request_id] = list(self.snapshots[c.restore_state])
                self.restored.append((c.request_id, c.start))
            assert len(self.states[c.request_id]) == c.start, "resumed without the state of its prefix"
        out = super().execute(scheduled)
        for c in scheduled.chunks:
            self.states[c.request_id] += c.token_ids
            table = self.tables[c.request_id]
            end = c.start + len(c.token_ids)
            context = [self.kv[table[p // self.block_size]][p % self.block_size] for p in range(end)]
            assert self.states[c.request_id] == context
            if c.save_state is not None:  # after the step, as the runner's save
                self.snapshots[c.save_state] = list(self.states[c.request_id])
        return out


def _scheduler(snapshots=4, budget=64):
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256),
                      CacheConfig(block_size=4, num_blocks=64, state_snapshots=snapshots))
    return sched, StateRunner(4)


def test_a_prompt_is_resumed_where_a_chunk_ended():
    """A 10-token prompt on a budget of 8 runs [0, 8) (its state kept at 8) and then [8, 10); the same
    prompt later resumes at 8 from that state and gives the same tokens."""
    sched, runner = _scheduler(budget=8)
    first = req("a", prompt(10), max_tokens=3)
    sched.add_request(first)
    scheduled, _ = step(sched, runner)
    [c] = scheduled.chunks
    assert (c.start, len(c.token_ids), c.save_state) == (0, 8, 0)
    run_all(sched, runner)
    again = req("b", prompt(10), max_tokens=3)
    sched.add_request(again)
    scheduled, _ = step(sched, runner)
    [c] = scheduled.chunks
    assert (c.start, c.restore_state) == (8, 0) and again.num_cached_tokens == 8
    run_all(sched, runner)
    assert again.output_token_ids == first.output_token_ids


def test_a_conversation_resumes_from_its_last_reply():
    """The state at each block boundary of generated text is kept (one per request, the latest):
    a next turn, the reply plus new text, resumes at the reply's last boundary."""
    sched, runner = _scheduler()
    first = req("turn1", prompt(6), max_tokens=9)
    sched.add_request(first)
    run_all(sched, runner)
    text = [*first.prompt_token_ids, *first.output_token_ids]  # 15 tokens: boundaries 4, 8, 12
    turn2 = req("turn2", text + prompt(5, base=500), max_tokens=2)
    sched.add_request(turn2)
    run_all(sched, runner)
    assert turn2.num_cached_tokens == 12 and ("turn2", 12) in runner.restored
    # turn 1's reply (12: its state at 8 gave way); one-chunk prompts keep none
    assert len(sched.kv_manager.snapshots) == 1


def test_without_a_snapshot_a_hit_is_cut_back_to_one():
    """Two prompts share 9 tokens: the second hits the first's blocks only as far as a kept state, here
    none inside the shared part, so it computes from 0."""
    sched, runner = _scheduler()
    sched.add_request(req("a", prompt(18), max_tokens=1))  # one chunk: no state kept
    run_all(sched, runner)
    other = req("b", prompt(9) + [900] * 9, max_tokens=1)
    sched.add_request(other)
    run_all(sched, runner)
    assert other.num_cached_tokens == 0


def test_prompts_after_a_shared_part_resume_from_its_last_chunk_end():
    """Prefill chunks end on block boundaries, each but the last keeping its state: a prompt that shares
    the first 19 tokens of one computed in chunks of 8 resumes at 16, the last chunk end inside the
    shared part."""
    sched, runner = _scheduler(budget=8)
    first = req("a", prompt(30), max_tokens=1)
    sched.add_request(first)
    steps = run_all(sched, runner)
    assert [(c.start, len(c.token_ids), c.save_state is not None) for s in steps for c in s.chunks][:4] == [
        (0, 8, True), (8, 8, True), (16, 8, True), (24, 6, False)]
    other = req("b", prompt(19) + [900] * 11, max_tokens=1)
    sched.add_request(other)
    run_all(sched, runner)
    assert other.num_cached_tokens == 16 and ("b", 16) in runner.restored


def test_a_budget_cut_chunk_ends_on_a_boundary():
    """With a budget of 10 and blocks of 4, a 25-token prompt runs 8, 8 and the last 9: each cut chunk
    ends on a boundary (its state kept; the budget's 2 more tokens wait for the next step), the last
    is whole."""
    sched, runner = _scheduler(budget=10)
    sched.add_request(req("a", prompt(25), max_tokens=1))
    steps = run_all(sched, runner)
    assert [(c.start, len(c.token_ids), c.save_state is not None) for s in steps for c in s.chunks] == [
        (0, 8, True), (8, 8, True), (16, 9, False)]


def test_siblings_of_a_hybrid_do_not_wait_for_blocks_without_a_state():
    """n requests with one short prompt: on a hybrid the blocks in flight would end where no state is
    kept, so the siblings start at once, each computing the prompt."""
    sched, runner = _scheduler()
    for rid in ("a", "b"):
        sched.add_request(req(rid, prompt(10), max_tokens=2))
    scheduled, _ = step(sched, runner)
    assert sorted(c.request_id for c in scheduled.chunks) == ["a", "b"]
    run_all(sched, runner)


def test_a_failed_step_keeps_no_state():
    """A step the runner failed (the engine fails its requests; no results come back) saved nothing
    that can be trusted: its claimed snapshots are dropped, and the next computation of that prefix
    claims the key again instead of finding it "kept"."""
    snaps = StateSnapshots(2)
    snaps.claim(b"k", request_id="r")
    snaps.discard_pending()
    assert len(snaps) == 0 and snaps.claim(b"k") is not None
    sched, runner = _scheduler(budget=8)
    sched.add_request(req("a", prompt(10), max_tokens=1))
    assert sched.schedule().chunks[0].save_state is not None  # ... and the runner raises
    sched.abort_request("a")
    sched.schedule()
    assert len(sched.kv_manager.snapshots) == 0
    again = req("b", prompt(10), max_tokens=1)
    sched.add_request(again)
    scheduled, _ = step(sched, runner)
    assert scheduled.chunks[0].save_state is not None and again.num_cached_tokens == 0
    run_all(sched, runner)
