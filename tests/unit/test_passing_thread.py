"""The model loads in a thread that ends with the load (api/app.py run_in_passing_thread):
OpenMP keeps a worker pool per thread that ran a parallel loop, and a pool left in a
long-lived thread beside the engine's made every engine step pay futex wake-ups."""
from __future__ import annotations

import asyncio
import threading

import pytest

from textmill.api.app import run_in_passing_thread


def test_returns_the_result_from_a_thread_that_then_ends():
    seen: list[threading.Thread] = []

    def load():
        seen.append(threading.current_thread())
        return 42

    async def main():
        return await run_in_passing_thread(load)

    assert asyncio.run(main()) == 42
    (thread,) = seen
    assert thread is not threading.main_thread() and thread.name == "textmill-load"
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_an_exception_reaches_the_awaiting_task():
    def load():
        raise ValueError("corrupt file")

    async def main():
        return await run_in_passing_thread(load)

    with pytest.raises(ValueError, match="corrupt file"):
        asyncio.run(main())


def test_a_cancelled_wait_leaves_the_loop_usable():
    release = threading.Event()

    async def main():
        task = asyncio.create_task(run_in_passing_thread(lambda: release.wait(10)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()  # the thread finishes now and must not fail setting a cancelled future
        await asyncio.sleep(0.05)
        return await run_in_passing_thread(lambda: "next")

    assert asyncio.run(main()) == "next"
