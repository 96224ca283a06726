"""One completion against a real AsyncEngine (the alphabet runner, no model): a failing
candidate, an error in the route, the server's deadline and a vanished client all abort
every candidate's engine request at once. Checked from the engine's own state (live
streams, running requests, free KV blocks), never from a clock."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.unit.test_async_engine import make_async
from tests.unit.test_engine import ids, make_tokenizer, request
from textmill.api.access_log import RequestTrace
from textmill.api.assemble import ChoiceState
from textmill.api.disconnect import EventStreamResponse
from textmill.api.errors import APIError
from textmill.api.prepare import PreparedCompletion, PromptInput
from textmill.api.routes import _complete
from textmill.api.serving import Deadline, ServingContext, merged_outputs
from textmill.api.streaming import stream_completion
from textmill.messages import RequestOutput, TokenLogprob
from textmill.sampling_params import FinishReason, SamplingParams

pytestmark = pytest.mark.timeout(60)  # a hang fails; no test here measures time

BAD_TOKEN = 10_000  # an id the tokenizer cannot spell: the output processor fails that request


async def settled(aengine, scheduler, free_blocks: int) -> None:
    """Wait (no deadline: pytest-timeout guards) until the engine has freed everything."""
    while not (aengine.num_unfinished == 0 and scheduler.num_running == 0 and scheduler.num_waiting == 0
               and scheduler.kv_manager.num_free_blocks == free_blocks):
        await asyncio.sleep(0.005)


def fail_on_third_token(runner, request_id: str) -> None:
    original = runner._sample

    def sample(rid, last):
        if rid == request_id and runner.num_sampled.get(rid, 0) == 2:
            runner.num_sampled[rid] += 1
            return TokenLogprob(BAD_TOKEN, -1.0)
        return original(rid, last)

    runner._sample = sample


def chunks_of(runner, request_id: str) -> int:
    return sum(1 for s in runner.steps for c in s.chunks if c.request_id == request_id)


def completion(aengine, best_of: int = 2, max_tokens: int = 200):
    prompt = PromptInput(ids("abc"), "abc", False)
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=(0,))
    prepared = PreparedCompletion((prompt,), (params,) * best_of, n=best_of, best_of=best_of, echo=False,
                                  logprobs=None, stream=False, include_usage=False)
    ctx = ServingContext(engine=aengine, tokenizer=make_tokenizer(), model_name="m", max_model_len=256,
                         fingerprint="fp")
    return ctx, prepared, prepared.engine_requests("cmpl", 0.0)


class Timer:
    """TokenTimer's interface; `fail_at` makes the n-th observation raise (a bug in the route)."""

    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def observe(self, key, num_output_tokens: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("bug while assembling")


def trace() -> RequestTrace:
    return RequestTrace("rid", "POST", "/v1/completions")


# ---------------------------------------------------------------- a failing candidate
def test_a_failed_candidate_ends_the_merged_stream_and_aborts_its_siblings():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        free = scheduler.kv_manager.num_free_blocks
        fail_on_third_token(runner, "bad")
        await aengine.start()
        reqs = [(0, 0, request("ok", "abc", max_tokens=200)), (0, 1, request("bad", "abc", max_tokens=200))]
        seen = [out async for out in merged_outputs(aengine, reqs)]  # a plain loop, as a route may write
        live_streams = aengine.num_unfinished  # right when the loop ends, before any step
        await settled(aengine, scheduler, free)
        ok_chunks = chunks_of(runner, "ok")
        await aengine.shutdown()
        return seen, live_streams, ok_chunks

    seen, live_streams, ok_chunks = asyncio.run(main())
    last = seen[-1][2]
    assert last.request_id == "bad" and last.finish_reason is FinishReason.ERROR
    assert not any(out.request_id == "ok" and out.finished for _, _, out in seen)
    assert live_streams == 0  # both engine streams ended with the merged stream
    assert ok_chunks < 100  # the sibling was aborted, not run to its 200 tokens


def test_non_streaming_completion_with_a_failed_candidate_is_a_500_and_frees_everything():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        free = scheduler.kv_manager.num_free_blocks
        ctx, prepared, reqs = completion(aengine)
        fail_on_third_token(runner, reqs[1][2].request_id)
        await aengine.start()
        with pytest.raises(APIError) as exc:
            await _complete(ctx, prepared, reqs, trace(), Timer())
        live_streams = aengine.num_unfinished
        await settled(aengine, scheduler, free)
        sibling_chunks = chunks_of(runner, reqs[0][2].request_id)
        await aengine.shutdown()
        return exc.value, live_streams, sibling_chunks

    error, live_streams, sibling_chunks = asyncio.run(main())
    assert error.status == 500 and error.type == "server_error"
    assert live_streams == 0 and sibling_chunks < 100


def test_an_error_in_the_route_aborts_every_candidate_before_it_propagates():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        free = scheduler.kv_manager.num_free_blocks
        ctx, prepared, reqs = completion(aengine, best_of=3)
        await aengine.start()
        with pytest.raises(RuntimeError, match="bug while assembling"):
            await _complete(ctx, prepared, reqs, trace(), Timer(fail_at=4))
        # Not left to the garbage collector: the candidates' streams are gone already.
        live_streams = aengine.num_unfinished
        await settled(aengine, scheduler, free)
        await aengine.shutdown()
        return live_streams

    assert asyncio.run(main()) == 0


# ---------------------------------------------------------------- the server's deadline
def test_deadline_aborts_a_non_streaming_completion_with_a_504():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        free = scheduler.kv_manager.num_free_blocks
        ctx, prepared, reqs = completion(aengine, max_tokens=200)
        await aengine.start()
        with pytest.raises(APIError) as exc:
            # 200 steps of the slow runner cannot fit in 0.05 s.
            await _complete(ctx, prepared, reqs, trace(), Timer(), Deadline.after(0.05))
        live_streams = aengine.num_unfinished
        await settled(aengine, scheduler, free)
        finished = engine.stats().num_requests_finished
        await aengine.shutdown()
        return exc.value, live_streams, finished

    error, live_streams, finished = asyncio.run(main())
    assert error.status == 504 and error.type == "timeout_error" and error.code == "request_timeout"
    assert "0.05 s" in error.message
    assert live_streams == 0 and finished == 2  # both ended (aborted), their blocks free


def test_deadline_ends_a_stream_with_an_error_event_before_done():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        free = scheduler.kv_manager.num_free_blocks
        ctx, prepared, reqs = completion(aengine, best_of=1, max_tokens=200)
        await aengine.start()
        head = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m"}
        events = [e async for e in stream_completion(ctx, prepared, reqs, head, trace(), Timer(),
                                                     Deadline.after(0.05))]
        await settled(aengine, scheduler, free)
        await aengine.shutdown()
        return events

    events = asyncio.run(main())
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert all("choices" in json.loads(e.removeprefix("data: ")) for e in events[:-2])


def test_no_deadline_means_no_limit():
    assert Deadline.after(None) is None


# ---------------------------------------------------------------- a client that vanishes
class _Server:
    """An ASGI server that, like uvicorn, silently drops writes after the client left, and
    reports ASGI spec 2.4 (where Starlette stops listening for http.disconnect itself)."""

    def __init__(self, raise_on_send: bool = False):
        self.sent: list[dict] = []
        self.first_body = asyncio.Event()
        self.raise_on_send = raise_on_send
        self.scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}

    async def receive(self) -> dict:
        await self.first_body.wait()  # the client reads one event, then closes the connection
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if self.raise_on_send and self.first_body.is_set():
            raise OSError("connection reset")
        self.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.first_body.set()


@pytest.mark.parametrize("raise_on_send", [False, True])
def test_event_stream_stops_and_closes_its_generator_when_the_client_leaves(raise_on_send):
    closed = []

    async def events():
        try:
            yield "data: 1\n\n"
            if raise_on_send:
                while True:  # keeps writing: only a failing send can stop it
                    yield "data: more\n\n"
                    await asyncio.sleep(0)
            await asyncio.Event().wait()  # waits on an engine that never answers
        finally:
            closed.append(True)

    async def main():
        server = _Server(raise_on_send)
        response = EventStreamResponse(events(), media_type="text/event-stream")
        await response(server.scope, server.receive, server.send)
        return server

    server = asyncio.run(main())
    assert closed == [True]
    bodies = [m for m in server.sent if m["type"] == "http.response.body"]
    assert bodies[0]["body"] == b"data: 1\n\n"


def test_event_stream_runs_to_the_end_when_the_client_stays():
    async def events():
        for i in range(3):
            yield f"data: {i}\n\n"

    async def main():
        sent = []

        async def receive():
            await asyncio.Event().wait()

        async def send(message):
            sent.append(message)

        await EventStreamResponse(events())({"type": "http"}, receive, send)
        return sent

    sent = asyncio.run(main())
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]


# ---------------------------------------------------------------- a choice's text
def test_a_choice_keeps_its_deltas_and_joins_them_once():
    state = ChoiceState(PromptInput((1,), "a", False), echo=False, logprobs=None, tokenizer=make_tokenizer())
    for i in range(5000):
        state.apply(RequestOutput("r", "xy", (2,), (2 * i,), None, finished=False, num_output_tokens=i + 1))
    # Each delta is kept as it came (no copy of the text so far per token)...
    assert len(state.pieces) == 5000 and all(p == "xy" for p in state.pieces)
    # ...and joined when the choice is read.
    assert state.text == "xy" * 5000 and len(state.pieces) == 1
