"""Scheduler: continuous batching over a paged KV cache.

Each step has one token budget (max_num_batched_tokens). Every scheduled request gets
`num_tokens - num_computed_tokens` new tokens, capped by what is left of the budget; there
are no prefill or decode modes. Order of a step:

  1. free the requests aborted or finished by the output processor since the last step;
  2. running requests, oldest first: a decode takes 1 token, a prompt still being
     prefilled takes what is left after reserving 1 token for every decode behind it,
     so a long prompt is chunked and running streams produce a token every step;
  3. waiting requests in FIFO order, while there is budget, a free slot (max_num_seqs)
     and KV blocks; a request that cannot get blocks stops admission (no overtaking).

Out of blocks, a running request preempts the most recently admitted running request
(possibly itself): its blocks are freed and it goes back to the front of the waiting
queue with num_computed_tokens = 0, to be recomputed from its prompt plus the tokens it
generated (its own published blocks may come back as prefix hits). No request fails for
lack of blocks; add_request asserts that each request fits the pool on its own.

The runner hears of a request once: `new_requests` carries it the first time it is
scheduled, never again (after a preemption the runner keeps its per-request state, and
`preempted_request_ids` tells it the old KV is gone). Block tables are sent the same way:
a chunk carries only the blocks added since the request was last scheduled (all of them
again after a preemption), so a step's messages do not grow with the context.

n siblings: when the next full block of a waiting request's prompt is being computed by a
scheduled chunk (registered "in flight" by the KV manager), the request stays waiting
until that step publishes the block, then takes it as a prefix hit; so n requests with
one prompt compute it once and each computes only its own tail.

A hybrid (recurrent layers beside attention) resumes a prefix only where the runner kept the
recurrent state (engine/kv_cache/state_snapshots.py): a prefill chunk the budget cuts ends on a
block boundary, chunks ask for their state to be kept there and at the block boundaries of
generated text, and a request admitted on hits names the snapshot it starts from.

Guessed tokens: in a step of decodes alone with nobody waiting, a draftable request
(nothing stateful in its sampling: no penalties, no grammar) may carry up to draft_tokens
guesses from its own text (engine/ngram_draft.py) as the rest of its chunk. The step then
computes every one of those positions; the runner keeps the guesses that sampling confirms
and samples one token after them, so the request advances by 1 + accepted tokens. How many
guesses a step carries is priced: the engine times every decode step by its rows
(engine/step_costs.py), and the likeliest guesses go in while they raise the tokens a
second the step is expected to make. So a stream or two on a CPU, whose steps only read
the weights, guess freely, and 64 streams guess only what nearly always holds. Slots for
the rejected guesses stay allocated and are written over by the next step; only computed
positions are published to the prefix cache.

The engine loop is synchronous: schedule() -> runner -> update_from_output() for the
same step. Aborts may arrive in between; an aborted request's chunk results are dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from textmill.config import CacheConfig, SchedulerConfig
from textmill.engine.guess_plan import plan_guesses
from textmill.engine.kv_cache.manager import KVCacheManager
from textmill.engine.ngram_draft import NgramDrafter
from textmill.engine.request import Request, RequestStatus
from textmill.engine.step_costs import StepCosts
from textmill.messages import (
    NewRequestData,
    RunnerOutput,
    ScheduledChunk,
    SchedulerOutput,
    TokenLogprob,
)
from textmill.sampling_params import FinishReason


@dataclass(eq=False)
class _StepPlan:
    """What one schedule() call has decided so far."""

    budget: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 step_costs: StepCosts | None = None):
        assert scheduler_config.max_num_batched_tokens > 0 and scheduler_config.max_num_seqs > 0
        self.config = scheduler_config
        self.kv_manager = KVCacheManager(cache_config)
        assert scheduler_config.draft_tokens >= 0
        self.drafter = NgramDrafter(scheduler_config.draft_tokens) if scheduler_config.draft_tokens else None
        self.step_costs = step_costs or StepCosts()  # the composition root's, priced for its model
        self._decode_rows = 0  # rows of the last step when it was decodes alone (record_step)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last is the newest
        self.num_preemptions = 0
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0  # guesses, for metrics
        self._requests: dict[str, Request] = {}  # waiting or running
        self._announced: set[str] = set()  # ids already sent in new_requests
        self._to_free: list[Request] = []  # aborted / finished outside a step
        self._finished_ids: list[str] = []  # left since the last schedule()

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, request: Request) -> None:
        assert request.request_id not in self._requests, f"duplicate id {request.request_id}"
        longest = min(
            request.num_prompt_tokens + request.params.max_tokens, self.config.max_model_len
        )
        assert self.kv_manager.num_blocks_for(max(longest, request.num_tokens)) <= (
            self.kv_manager.pool.num_blocks
        ), f"{request.request_id} needs more KV blocks than the pool has"
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Remove a waiting or running request; its blocks are freed by the next schedule()."""
        return self._remove(request_id, FinishReason.ABORT)

    def finish_request(
        self, request_id: str, reason: FinishReason = FinishReason.STOP
    ) -> Request | None:
        """The output processor found a stop string: finish like an abort, with `reason`."""
        return self._remove(request_id, reason)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_finished_to_report(self) -> bool:
        """Left requests the runner has not been told about yet (see finished_request_ids)."""
        return bool(self._finished_ids or self._to_free)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        if self.kv_manager.snapshots is not None:  # left pending: the last step failed (update_from_output commits)
            self.kv_manager.snapshots.discard_pending()
        for request in self._to_free:
            self.kv_manager.free(request)
            self._finished_ids.append(request.request_id)
        self._to_free.clear()
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        self._schedule_running(plan)
        if not plan.preempted:  # blocks are short: admitting more would only thrash
            self._schedule_waiting(plan)
        # A step of decodes alone (each chunk one token and its guesses; no request new to the
        # runner or preempted, whose bookkeeping it pays for) is timed by rows.
        decodes = (plan.chunks and not plan.new_requests and not plan.preempted
                   and all(len(c.token_ids) == 1 + len(c.draft) and c.sample for c in plan.chunks))
        self._decode_rows = sum(len(c.token_ids) for c in plan.chunks) if decodes else 0
        finished, self._finished_ids = tuple(self._finished_ids), []
        return SchedulerOutput(
            new_requests=tuple(plan.new_requests),
            chunks=tuple(plan.chunks),
            finished_request_ids=finished,
            preempted_request_ids=tuple(plan.preempted),
        )

    def _schedule_running(self, plan: _StepPlan) -> None:
        guesses = {}
        if (self.drafter is not None and not self.waiting and self.running
                and not 0 < self.config.draft_max_seqs < len(self.running)
                and all(r.num_tokens - r.num_computed_tokens == 1 for r in self.running)):
            guesses = plan_guesses(self.running, self.drafter, self.step_costs, plan.budget,
                                   self.config.max_model_len)
        index = 0
        while index < len(self.running) and plan.budget > 0:
            request = self.running[index]
            remaining = request.num_tokens - request.num_computed_tokens
            assert remaining > 0, f"running {request.request_id} has nothing to compute"
            if remaining > 1:  # still prefilling: leave one token for each decode behind it
                behind = self.running[index + 1 :]
                reserve = sum(1 for r in behind if r.num_tokens - r.num_computed_tokens == 1)
                num_new = self.kv_manager.snapshot_chunk(request, request.num_computed_tokens,
                                                         min(remaining, plan.budget - reserve))
                draft: tuple[int, ...] = ()
            else:
                num_new = 1
                draft = guesses.get(request.request_id, ())
            if num_new <= 0:
                index += 1
                continue
            # Each other running request may need a fresh block this step or the next (a failed
            # guess keeps its block until the request's tokens reach it).
            others = len(self.running) - 1
            if draft and (self.kv_manager.num_new_blocks(request, num_new + len(draft)) + others
                          > self.kv_manager.num_free_blocks
                          or not self.kv_manager.allocate_slots(request, num_new + len(draft))):
                draft = ()  # guesses never take blocks that another request needs
            if not draft and not self._allocate_or_preempt(request, num_new, plan):
                return  # it preempted itself: it was the newest, nothing is behind it
            self._add_chunk(request, num_new, plan, draft)
            index += 1

    def record_step(self, seconds: float) -> None:
        """How long the runner took for the last schedule()'s step; decode steps are timed."""
        if self._decode_rows:
            self.step_costs.record(self._decode_rows, seconds)

    def _allocate_or_preempt(self, request: Request, num_new: int, plan: _StepPlan) -> bool:
        while not self.kv_manager.allocate_slots(request, num_new):
            victim = self.running.pop()  # the newest; always behind or equal to `request`
            self._preempt(victim)
            plan.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        deferred: list[Request] = []  # waiting for in-flight blocks they can share
        while self.waiting and plan.budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            hits, num_hit_tokens = self.kv_manager.get_computed_blocks(request)
            if self.kv_manager.waits_for_in_flight(request, num_hit_tokens):
                deferred.append(request)
                continue
            num_new = self.kv_manager.snapshot_chunk(request, num_hit_tokens,
                                                     min(request.num_tokens - num_hit_tokens, plan.budget))
            if not self.kv_manager.allocate_slots(request, num_new, cached_blocks=hits):
                self.waiting.appendleft(request)
                break
            self._admit(request, num_hit_tokens, plan)
            self._add_chunk(request, num_new, plan, restore=self.kv_manager.restore_slot(request, num_hit_tokens))
        self.waiting.extendleft(reversed(deferred))

    def _admit(self, request: Request, num_hit_tokens: int, plan: _StepPlan) -> None:
        request.num_computed_tokens = num_hit_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        if request.request_id not in self._announced:
            self._announced.add(request.request_id)
            request.num_cached_tokens = num_hit_tokens
            plan.new_requests.append(NewRequestData(request.request_id, request.params, request.prompt_token_ids))

    def _add_chunk(self, request: Request, num_new: int, plan: _StepPlan, draft: tuple[int, ...] = (),
                   restore: int | None = None) -> None:
        start = request.num_computed_tokens
        end = start + num_new
        targets = None
        if request.params.prompt_logprobs is not None:
            # Position p scores prompt token p + 1; the last prompt position and the
            # generated tokens have none (None, not (), when the chunk has no target).
            last = min(end, request.num_prompt_tokens - 1)
            targets = tuple(request.prompt_token_ids[start + 1 : last + 1]) or None
        block_offset, new_block_ids = self.kv_manager.take_new_block_ids(request.request_id)
        plan.chunks.append(
            ScheduledChunk(
                request_id=request.request_id,
                token_ids=tuple(request.token_ids_between(start, end)) + draft,
                start=start,
                new_block_ids=new_block_ids,
                block_offset=block_offset,
                sample=end == request.num_tokens and request.params.max_tokens > 0,
                prompt_logprob_targets=targets,
                draft=draft,
                restore_state=restore,
                # (where guesses ride along, the state's end is known only after the step: none kept)
                save_state=None if draft else self.kv_manager.save_slot(request, start, end),
            )
        )
        plan.budget -= num_new + len(draft)

    # ------------------------------------------------------------------ results of a step
    def update_from_output(
        self, scheduled: SchedulerOutput, output: RunnerOutput
    ) -> list[Request]:
        """Apply one step's results; return the requests with news, in scheduled order.

        News: a sampled token, new prompt logprobs, or finishing (EOS, max_tokens, the
        context window, or max_tokens == 0 once the prompt is computed). Finished requests
        are freed here; stop strings are the output processor's (it calls finish_request).
        """
        updated: list[Request] = []
        if self.kv_manager.snapshots is not None:  # the runner saved the states the step asked for
            self.kv_manager.snapshots.commit()
        for chunk in scheduled.chunks:
            request = self._requests.get(chunk.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or finished while the step ran
            assert chunk.start == request.num_computed_tokens, "results out of step"
            # Guesses count as computed only once confirmed (below): a rejected one's KV
            # is not the request's, and its slot is written over by the next step.
            request.num_computed_tokens += len(chunk.token_ids) - len(chunk.draft)
            has_news = self._take_prompt_logprobs(request, chunk, output)
            reason = None
            if chunk.sample:
                accepted = output.accepted.get(request.request_id, ())
                if chunk.draft:
                    self.drafter.observe(request.request_id, len(chunk.draft), len(accepted))
                    self.num_drafts += 1
                    self.num_draft_tokens += len(chunk.draft)
                    self.num_accepted_tokens += len(accepted)
                tokens = (*accepted, output.sampled[request.request_id])
                for i, sampled in enumerate(tokens):
                    request.num_computed_tokens += i > 0  # the confirmed guess before this token
                    self._append_token(request, sampled)
                    reason = self._finish_reason(request, sampled=True)
                    if reason is not None:
                        break  # a stop token or the length among the guesses: the rest are dropped
                has_news = True
            else:
                reason = self._finish_reason(request, sampled=False)
            self.kv_manager.cache_full_blocks(request)
            if reason is not None:
                self._finish(request, reason)
                has_news = True
            if has_news:
                updated.append(request)
        return updated

    def _take_prompt_logprobs(
        self, request: Request, chunk: ScheduledChunk, output: RunnerOutput
    ) -> bool:
        if not chunk.prompt_logprob_targets:
            return False
        logprobs = output.prompt_logprobs[request.request_id]
        assert len(logprobs) == len(chunk.prompt_logprob_targets)
        # A recompute after preemption scores positions again: keep the first answers.
        have = len(request.prompt_logprobs)
        assert have >= chunk.start, "prompt logprobs must arrive in order"
        fresh = logprobs[have - chunk.start :]
        request.prompt_logprobs.extend(fresh)
        return bool(fresh)

    def _append_token(self, request: Request, sampled: TokenLogprob) -> None:
        request.append_output(sampled, keep_logprobs=request.params.logprobs is not None)

    def _finish_reason(self, request: Request, sampled: bool) -> FinishReason | None:
        params = request.params
        if params.max_tokens == 0:
            done = request.num_computed_tokens == request.num_tokens
            return FinishReason.LENGTH if done else None
        if not sampled:
            return None
        if request.output_token_ids[-1] in params.stop_token_ids:
            return FinishReason.STOP
        if request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.running.remove(request)
        self.kv_manager.free(request)
        self._forget(request)
        self._finished_ids.append(request.request_id)

    def _remove(self, request_id: str, reason: FinishReason) -> Request | None:
        request = self._requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        if request.finish_reason is None:
            request.finish_reason = reason
        self._forget(request)
        self._to_free.append(request)  # a step may still be writing its blocks
        return request

    def _forget(self, request: Request) -> None:
        del self._requests[request.request_id]
        self._announced.discard(request.request_id)
        if self.drafter is not None:
            self.drafter.forget(request.request_id)
