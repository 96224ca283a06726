"""AsyncEngine: the Engine's step loop in one dedicated thread, fed from asyncio.

Only the loop thread touches the Engine. Handlers talk to it through an inbox (adds and
aborts, drained between steps) and hear back through one asyncio.Queue per request, which
the loop thread fills with `loop.call_soon_threadsafe`, once per step for all outputs.
The model call releases the GIL, so the event loop keeps serving HTTP while a step runs.

When there is nothing to do the thread sleeps on an Event that every add, abort and
shutdown sets: no busy waiting.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from textmill.engine.engine import Engine, EngineStats
from textmill.messages import EngineRequest, RequestOutput
from textmill.sampling_params import FinishReason

log = logging.getLogger("textmill.engine")

_IDLE_POLL_S = 0.005


class EngineNotRunning(RuntimeError):
    """generate() was called before start() or after shutdown()."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self._engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", EngineRequest) | ("abort", id)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Touched only on the event loop thread.
        self._streams: dict[str, asyncio.Queue] = {}
        self._stats: EngineStats | None = None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.is_running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._stats = self._engine.stats()
        self._thread = threading.Thread(target=self._run, name="textmill-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop the loop thread. In-flight requests get up to `drain_timeout` seconds to
        finish; any left then end with finish_reason ERROR ("engine shut down")."""
        if self._thread is None:
            return
        deadline = asyncio.get_running_loop().time() + drain_timeout
        while self._streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self._stopping.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        for request_id in list(self._streams):
            self._streams[request_id].put_nowait(_final_error(request_id, "engine shut down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def num_unfinished(self) -> int:
        """Requests handed to generate() whose stream has not ended (for backpressure)."""
        return len(self._streams)

    def stats(self) -> EngineStats | None:
        """The snapshot taken after the last step (at start before any; None before start)."""
        return self._stats

    # ------------------------------------------------------------ requests
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come; the last one has finished=True.

        If the consumer stops early (the generator is closed or its task cancelled), the
        request is aborted in the engine and its blocks are freed at the next step.
        Raises EngineNotRunning, or ValueError for a request id already streaming.
        """
        if not self.is_running:
            raise EngineNotRunning("the engine is not running")
        request_id = request.request_id
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._submit(("add", request))
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.is_running:
                self._submit(("abort", request_id))

    def abort(self, request_id: str) -> None:
        """Abort from the event loop thread; the stream ends with an ABORT output."""
        self._submit(("abort", request_id))

    def _submit(self, item: tuple) -> None:
        self._inbox.put(item)
        self._wake.set()

    # ------------------------------------------------------------ the loop thread
    def _run(self) -> None:
        log.info("engine loop started")
        while not self._stopping.is_set():
            try:
                self._iterate()
            except Exception:  # never die silently; the next iteration starts clean
                log.exception("engine loop iteration failed")
        log.info("engine loop stopped")

    def _iterate(self) -> None:
        self._drain_inbox()
        if not self._engine.has_unfinished:
            self._wake.wait()
            self._wake.clear()
            return
        outputs = self._step()
        self._deliver(outputs)
        if not outputs and self._engine.last_step_idle:
            # Work exists but none could be scheduled (it waits on memory another request
            # holds): don't spin; wake at once when something arrives.
            self._wake.wait(_IDLE_POLL_S)
            self._wake.clear()

    def _step(self) -> list[RequestOutput]:
        try:
            outputs = self._engine.step()
        except Exception as exc:  # a bug outside the runner: fail what is in flight, go on
            log.exception("engine step failed; failing all in-flight requests")
            outputs = self._engine.fail_all(f"engine error: {type(exc).__name__}: {exc}")
        try:
            self._stats = self._engine.stats()
        except Exception:
            log.exception("engine stats failed")
        return outputs

    def _drain_inbox(self) -> None:
        failed: list[RequestOutput] = []
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "abort":
                try:
                    self._engine.abort(payload)
                except Exception:  # never let one abort keep the refusals below undelivered
                    log.exception("aborting request %s failed", payload)
                continue
            try:
                self._engine.add_request(payload)
            except Exception as exc:  # refused (bad prompt, duplicate id): end its stream
                log.warning("request %s refused: %s", payload.request_id, exc)
                failed.append(_final_error(payload.request_id, str(exc)))
        self._deliver(failed)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                log.warning("event loop closed; dropping %d outputs", len(outputs))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """On the event loop thread: route each output to its request's stream."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:  # None: the consumer already left
                stream.put_nowait(output)


def _final_error(request_id: str, message: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id, text="", token_ids=(), text_offsets=(), logprobs=None,
        finished=True, finish_reason=FinishReason.ERROR, error=message,
    )
