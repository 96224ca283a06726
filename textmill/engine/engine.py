"""Engine: one step is schedule -> execute -> update -> outputs.

The engine is synchronous and single-threaded; AsyncEngine runs it in its own thread.
It keeps the live requests by id so that an abort or a failed step can always produce a
final output, and so that a request's failure never reaches the requests of other steps.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from textmill.engine.output_processor import DecodingTokenizer, OutputProcessor
from textmill.engine.request import Request, RequestStatus
from textmill.engine.runner_protocol import Runner
from textmill.messages import EngineRequest, RequestOutput
from textmill.sampling_params import FinishReason

log = logging.getLogger("textmill.engine")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; the totals count since the engine started."""

    num_waiting: int
    num_running: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions_total: int
    num_requests_finished: int
    num_step_failures: int
    # Guessed tokens (engine/ngram_draft.py): steps of a request that carried guesses, the
    # guesses, and those that sampling confirmed.
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class Engine:
    def __init__(self, scheduler, runner: Runner, tokenizer: DecodingTokenizer):
        self._scheduler = scheduler
        self._runner = runner
        if scheduler.drafter is not None and not getattr(runner, "chunks_match_steps", False):
            # Guessed tokens would still be right, but not bit for bit plain decoding's.
            log.info("guessed tokens: off (this runner's chunks are not bitwise one-token steps)")
            scheduler.drafter = None
        self._outputs = OutputProcessor(tokenizer)
        self._requests: dict[str, Request] = {}  # live requests: no final output yet
        self._pending: list[RequestOutput] = []  # final outputs made between steps (aborts)
        self._num_finished = 0
        self._num_step_failures = 0
        self.last_step_idle = False  # the last step scheduled nothing

    # ------------------------------------------------------------ requests
    def add_request(self, engine_request: EngineRequest) -> None:
        """Queue a request. Raises ValueError for a request id that is still live."""
        if engine_request.request_id in self._requests:
            raise ValueError(f"request id {engine_request.request_id!r} is already running")
        request = Request.from_engine_request(engine_request)
        self._scheduler.add_request(request)
        self._requests[request.request_id] = request

    def abort(self, request_id: str) -> bool:
        """Stop a request (the client went away). Its blocks are freed at the next step, and
        its final output (finish_reason ABORT) comes with the next step's outputs. False when
        the request is unknown or already finished."""
        if request_id not in self._requests:
            return False
        self._pending.append(self._end(request_id, FinishReason.ABORT, None))
        return True

    @property
    def has_unfinished(self) -> bool:
        """Whether step() has anything to do (including freeing finished requests)."""
        sched = self._scheduler
        return bool(self._requests or self._pending or sched.has_unfinished
                    or sched.has_finished_to_report)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        scheduled = self._scheduler.schedule()
        self.last_step_idle = scheduled.is_empty
        if scheduled.is_empty and not scheduled.finished_request_ids:
            return outputs
        try:
            # Also with no chunks: the runner drops the state of finished requests.
            started = time.perf_counter()
            result = self._runner.execute(scheduled)
            self._scheduler.record_step(time.perf_counter() - started)
        except Exception as exc:  # the runner failed: fail this step's requests only
            log.exception("runner failed a step of %d requests", len(scheduled.chunks))
            self._num_step_failures += 1
            ids = [chunk.request_id for chunk in scheduled.chunks]
            return outputs + self.fail_requests(ids, f"engine error: {type(exc).__name__}: {exc}")
        updated = self._scheduler.update_from_output(scheduled, result)
        for request in updated:  # one request's text failing never touches the others
            try:
                outputs += self._outputs.process([request], self._scheduler.finish_request)
            except Exception as exc:
                log.exception("output processing failed for request %s", request.request_id)
                outputs += self.fail_requests([request.request_id], f"output error: {type(exc).__name__}")
        self._forget_finished(outputs)
        return outputs

    def fail_requests(self, request_ids, message: str) -> list[RequestOutput]:
        """End live requests with finish_reason ERROR and `message`, freeing their blocks."""
        return [
            self._end(request_id, FinishReason.ERROR, message)
            for request_id in request_ids
            if request_id in self._requests
        ]

    def fail_all(self, message: str) -> list[RequestOutput]:
        return self.fail_requests(list(self._requests), message)

    def stats(self) -> EngineStats:
        sched = self._scheduler
        kv = sched.kv_manager.stats()
        return EngineStats(
            num_waiting=sched.num_waiting,
            num_running=sched.num_running,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            prompt_tokens_total=self._outputs.total_prompt_tokens,
            generation_tokens_total=self._outputs.total_generated_tokens,
            num_preemptions_total=sched.num_preemptions,
            num_requests_finished=self._num_finished,
            num_step_failures=self._num_step_failures,
            num_drafts=sched.num_drafts,
            num_draft_tokens=sched.num_draft_tokens,
            num_accepted_tokens=sched.num_accepted_tokens,
        )

    # ------------------------------------------------------------ helpers
    def _end(self, request_id: str, reason: FinishReason, error: str | None) -> RequestOutput:
        """Take a live request out of the scheduler and make its final output."""
        request = self._requests[request_id]
        try:
            self._scheduler.abort_request(request_id)
        except Exception:  # a broken scheduler must not keep the request from ending
            log.exception("scheduler failed to abort request %s", request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.error = error
        try:
            output = self._outputs.finish(request)
        except Exception:  # e.g. an id the tokenizer cannot spell: still end the request
            log.exception("output processing failed while ending request %s", request_id)
            output = RequestOutput(request_id, "", (), (), None, finished=True,
                                   finish_reason=FinishReason.ERROR,
                                   error=error or "the server could not turn the output into text")
        self._forget_finished([output])
        return output

    def _forget_finished(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.finished:
                if self._requests.pop(output.request_id, None) is not None:
                    self._num_finished += 1
