"""AsyncEngine: the step loop in its own thread, many concurrent generate() streams,
aborts on early close or cancellation, failures that end requests but not the loop."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from tests.unit.test_engine import AlphabetRunner, make_engine, request
from textmill.engine.async_engine import AsyncEngine, EngineNotRunning
from textmill.messages import RequestOutput
from textmill.sampling_params import FinishReason

pytestmark = pytest.mark.timeout(30)


class SlowRunner(AlphabetRunner):
    """Takes a little time per step, as a model would (and releases the GIL meanwhile)."""

    def __init__(self, delay: float = 0.002):
        super().__init__()
        self.delay = delay

    def execute(self, scheduled):
        time.sleep(self.delay)
        return super().execute(scheduled)


def make_async(**kw):
    engine, scheduler, _ = make_engine(**kw)
    runner = SlowRunner()
    engine._runner = runner  # same engine, a runner that takes time
    return AsyncEngine(engine), engine, scheduler, runner


async def collect(aengine: AsyncEngine, req) -> list[RequestOutput]:
    return [out async for out in aengine.generate(req)]


async def until(condition) -> None:
    """Wait for a state of the engine; a state never reached fails by pytest-timeout."""
    while not condition():
        await asyncio.sleep(0.005)


def test_concurrent_generate_calls_each_get_their_own_stream():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        await aengine.start()
        prompts = {"a": "abc", "b": "mno", "c": "xy", "d": "hij", "e": "q"}
        results = await asyncio.gather(*(
            collect(aengine, request(rid, p, max_tokens=6)) for rid, p in prompts.items()))
        await aengine.shutdown()
        return results, runner

    results, runner = asyncio.run(main())
    texts = ["".join(o.text for o in outs) for outs in results]
    assert texts == ["defghi", "pqrstu", "zabcde", "klmnop", "rstuvw"]
    for outs in results:
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    # They ran batched: some step computed more than one request.
    assert max(len(s.chunks) for s in runner.steps) > 1


def test_early_close_aborts_the_request_and_frees_its_blocks():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        free = scheduler.kv_manager.num_free_blocks
        await aengine.start()
        other = asyncio.create_task(collect(aengine, request("keep", "abc", max_tokens=30)))
        async with contextlib.aclosing(aengine.generate(request("leave", "abc", max_tokens=200))) as gen:
            async for out in gen:
                assert out.text == "d"
                break  # the client disconnected
        await until(lambda: aengine.num_unfinished == 1)
        kept = await other
        await until(lambda: scheduler.kv_manager.num_free_blocks == free and not runner.known)
        steps_with_leave = [i for i, s in enumerate(runner.steps)
                            if "leave" in [c.request_id for c in s.chunks]]
        await aengine.shutdown()
        return kept, steps_with_leave, runner

    kept, steps_with_leave, runner = asyncio.run(main())
    assert "".join(o.text for o in kept) == "defghijklmnopqrstuvwxyzabcdefgh"[:30]
    assert len(steps_with_leave) < 100  # stopped long before its 200 tokens
    assert any("leave" in s.finished_request_ids for s in runner.steps)


def test_cancelled_consumer_task_aborts_the_request():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        free = scheduler.kv_manager.num_free_blocks
        await aengine.start()
        got_one = asyncio.Event()

        async def consume():
            async for _ in aengine.generate(request("x", "abc", max_tokens=200)):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: aengine.num_unfinished == 0)
        await until(lambda: scheduler.kv_manager.num_free_blocks == free and not runner.known)
        await aengine.shutdown()
        return runner

    runner = asyncio.run(main())
    assert sum(1 for s in runner.steps for c in s.chunks if c.request_id == "x") < 100


def test_runner_failure_ends_those_streams_and_later_requests_succeed():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        await aengine.start()
        runner.fail_next = True
        failed = await collect(aengine, request("a", "abc", max_tokens=5))
        ok = await collect(aengine, request("b", "abc", max_tokens=3))
        alive = aengine.is_running
        await aengine.shutdown()
        return failed, ok, alive

    failed, ok, alive = asyncio.run(main())
    assert len(failed) == 1 and failed[0].finish_reason is FinishReason.ERROR
    assert "device on fire" in failed[0].error
    assert "".join(o.text for o in ok) == "def" and alive


def test_an_exception_outside_the_runner_fails_in_flight_requests_and_the_loop_goes_on():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        real_update = scheduler.update_from_output
        calls = {"n": 0}

        def flaky_update(scheduled, result):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyError("bug")
            return real_update(scheduled, result)

        scheduler.update_from_output = flaky_update
        await aengine.start()
        first = await collect(aengine, request("a", "abc", max_tokens=5))
        second = await collect(aengine, request("b", "abc", max_tokens=2))
        await aengine.shutdown()
        return first, second

    first, second = asyncio.run(main())
    assert first[-1].finish_reason is FinishReason.ERROR and "KeyError" in first[-1].error
    assert "".join(o.text for o in first) == "d"  # what came before the failure stays
    assert "".join(o.text for o in second) == "de"


def test_refused_request_gets_an_error_output():
    async def main():
        aengine, *_ = make_async(num_blocks=4, block_size=4)
        await aengine.start()
        # 16 tokens of KV at most: a prompt of 26 can never fit the pool.
        outs = await collect(aengine, request("big", "abcdefghijklmnopqrstuvwxyz", max_tokens=1))
        ok = await collect(aengine, request("small", "ab", max_tokens=1))
        await aengine.shutdown()
        return outs, ok

    outs, ok = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ERROR and outs[-1].error
    assert ok[-1].text == "c"


def test_the_loop_sleeps_when_idle():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        steps = {"n": 0}
        real_step = engine.step

        def counting_step():
            steps["n"] += 1
            return real_step()

        engine.step = counting_step
        await aengine.start()
        await collect(aengine, request("a", "abc", max_tokens=3))
        await asyncio.sleep(0.05)  # let the loop free the finished request and go idle
        before = steps["n"]
        await asyncio.sleep(0.2)
        idle_steps = steps["n"] - before
        thread_alive = aengine._thread.is_alive()
        await collect(aengine, request("b", "abc", max_tokens=2))  # wakes at once
        await aengine.shutdown()
        return idle_steps, thread_alive

    idle_steps, thread_alive = asyncio.run(main())
    assert idle_steps == 0 and thread_alive


def test_lifecycle_and_bookkeeping():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        with pytest.raises(EngineNotRunning):
            await anext(aengine.generate(request("a", "abc")))
        assert not aengine.is_running and aengine.stats() is None
        await aengine.start()
        assert aengine.is_running and aengine.stats().num_running == 0
        gen = aengine.generate(request("a", "abc", max_tokens=100))
        first = await anext(gen)
        assert aengine.num_unfinished == 1
        with pytest.raises(ValueError):
            await anext(aengine.generate(request("a", "abc")))
        # Shutdown ends the open stream with an error instead of leaving it hanging.
        await aengine.shutdown()
        rest = [out async for out in gen]
        stats = aengine.stats()
        return first, rest, aengine.is_running, stats

    first, rest, running, stats = asyncio.run(main())
    assert first.text == "d" and not running
    assert rest[-1].finished and rest[-1].finish_reason is FinishReason.ERROR
    assert stats.generation_tokens_total >= 1


def test_engine_runs_in_its_own_thread():
    async def main():
        aengine, engine, scheduler, runner = make_async()
        seen = set()
        real_execute = runner.execute

        def execute(scheduled):
            seen.add(threading.get_ident())
            return real_execute(scheduled)

        runner.execute = execute
        await aengine.start()
        await collect(aengine, request("a", "abc", max_tokens=3))
        await aengine.shutdown()
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 1 and threading.get_ident() not in seen
