"""What a replica's Ray health check says (scale/health.py), on the real engine: healthy
while idle or stepping, unhealthy when a step hangs with requests waiting, when the loop
has stopped, or when the model never loaded. The clock is the test's: nothing is timed."""
from __future__ import annotations

import asyncio
import threading

import pytest

from textmill.api.lifecycle import Lifecycle
from textmill.messages import EngineRequest
from textmill.sampling_params import SamplingParams
from textmill.scale.health import EngineWatch
from textmill.wiring import build_serving

from .server import TEST_OPTIONS

pytestmark = pytest.mark.timeout(300)


class Stuck:
    """Wraps the ModelRunner; once `hang` is set, a step waits at execute() until `free`."""

    def __init__(self, runner):
        self._runner = runner
        self.hang = threading.Event()
        self.free = threading.Event()
        self.entered = threading.Event()

    def execute(self, scheduled):
        if self.hang.is_set():
            self.entered.set()
            self.free.wait()
        return self._runner.execute(scheduled)

    def __getattr__(self, name):
        return getattr(self._runner, name)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_health_follows_the_engine():
    stuck: list[Stuck] = []

    def wrap(runner):
        stuck.append(Stuck(runner))
        return stuck[0]

    serving = build_serving(TEST_OPTIONS, wrap_runner=wrap)
    lifecycle, clock = Lifecycle(30.0), Clock()
    watch = EngineWatch(hang_timeout=60.0, clock=clock)

    async def run() -> None:
        engine = serving.engine
        assert watch.problem(lifecycle, None) == "the engine is not loaded"
        await engine.start()
        lifecycle.ready(engine)
        clock.now = 1000.0
        assert watch.problem(lifecycle, engine) is None  # idle for long: healthy

        params = SamplingParams(max_tokens=2, temperature=0.0)
        async for _ in engine.generate(EngineRequest("ok", (504, 3575, 282), params, 0.0)):
            pass
        assert watch.problem(lifecycle, engine) is None

        stuck[0].hang.set()
        consumer = asyncio.ensure_future(_drain(engine.generate(EngineRequest("stuck", (504, 3575), params, 0.0))))
        await asyncio.to_thread(stuck[0].entered.wait)
        assert watch.problem(lifecycle, engine) is None  # a step under way: not yet
        clock.now += 59.0
        assert watch.problem(lifecycle, engine) is None
        clock.now += 2.0
        assert "has not finished a step in 61s with 1 requests" in watch.problem(lifecycle, engine)

        stuck[0].hang.clear()
        stuck[0].free.set()
        await consumer
        clock.now += 1.0
        assert watch.problem(lifecycle, engine) is None  # it moved again

        await engine.shutdown()
        assert watch.problem(lifecycle, engine) == "the engine loop has stopped"

    asyncio.run(run())
    failed = Lifecycle(30.0)
    failed.fail("cannot load model x.gguf")
    assert watch.problem(failed, None) == "the model did not load: cannot load model x.gguf"


async def _drain(outputs) -> None:
    async for _ in outputs:
        pass
