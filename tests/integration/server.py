"""Run the real app (real model, real engine) under textmill's own server in a thread."""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI

from textmill.api.app import create_app
from textmill.api.server import GracefulServer, make_server
from textmill.config import EngineConfig, ServerConfig
from textmill.wiring import build_serving

# float32 keeps greedy decoding independent of batch composition up to float rounding;
# a small context and cache keep the tests light on a 2-core machine.
# The KV cache is float32 too: several tests pick prompts by what greedy decoding says next
# (EOS after two tokens), and the default float16 pool moves near-ties (test_context_fit.py
# runs the default plan end to end).
TEST_OPTIONS = EngineConfig().updated(dtype="float32", max_model_len=2048, memory_gib=0.25,
                                     max_num_batched_tokens=256, kv_cache_dtype="float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    app: FastAPI
    server: GracefulServer
    thread: threading.Thread


@contextlib.contextmanager
def serving(server: ServerConfig | None = None, options: EngineConfig = TEST_OPTIONS,
            wrap_runner: Callable | None = None, wrap_app: Callable | None = None) -> Iterator[Running]:
    """The app as `textmill serve` builds it, on a free port; the server's own port is ignored.
    `wrap_app` may put an ASGI layer between the server and the app (e.g. asgi_spec_version)."""
    port = free_port()
    server = dataclasses.replace(server or ServerConfig(), port=port)
    app = create_app(server, lambda: build_serving(options, server.served_model_name, wrap_runner))
    uv = make_server(app, "127.0.0.1", port, "warning")
    if wrap_app is not None:
        uv.config.app = wrap_app(app)  # uvicorn loads config.app when it starts
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield Running(f"http://127.0.0.1:{port}", app, uv, thread)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def running_server(options: EngineConfig = TEST_OPTIONS, server: ServerConfig | None = None) -> Iterator[str]:
    with serving(server, options) as running:
        yield running.url


def alone_then_together(url: str, run: Callable[[dict], object], cases: list[dict]) -> tuple[list, list, float]:
    """Each case run alone, then all at once (a thread each), and the preemptions the server at `url`
    has counted by then: what the preemption tests compare."""
    import httpx

    alone = [run(kw) for kw in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(run, cases))
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    counted = [line for line in metrics.splitlines() if line.startswith("textmill:num_preemptions")]
    assert counted, "the server reports no preemption count"
    return alone, together, float(counted[0].split()[-1])


def asgi_spec_version(version: str) -> Callable:
    """An app wrapper that makes the server claim ASGI spec `version` for HTTP requests.

    From 2.4 on, a server may report a closed connection only by raising from send(), and
    Starlette's StreamingResponse stops listening for http.disconnect; the app must still
    notice a client that left while nothing was being written."""
    def wrap(app):
        async def claiming(scope, receive, send):
            if scope["type"] == "http":
                scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": version}}
            await app(scope, receive, send)
        return claiming
    return wrap
