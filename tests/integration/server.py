"""Run the real app (real model, real engine) under textmill's own server in a thread."""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi import FastAPI

from textmill.api.app import create_app
from textmill.api.server import GracefulServer, make_server
from textmill.config import ServerConfig
from textmill.wiring import EngineOptions, build_serving

# float32 keeps greedy decoding independent of batch composition up to float rounding;
# a small context and cache keep the tests light on a 2-core machine.
TEST_OPTIONS = EngineOptions(dtype="float32", max_model_len=2048, kv_cache_gib=0.25,
                             max_num_batched_tokens=256)


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
def serving(server: ServerConfig | None = None, options: EngineOptions = TEST_OPTIONS,
            wrap_runner: Callable | None = None) -> Iterator[Running]:
    """The app as `textmill serve` builds it, on a free port; the server's own port is ignored."""
    port = free_port()
    server = dataclasses.replace(server or ServerConfig(), port=port)
    app = create_app(server, lambda: build_serving(options, server.served_model_name, wrap_runner))
    uv = make_server(app, "127.0.0.1", port, "warning")
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
def running_server(options: EngineOptions = TEST_OPTIONS, server: ServerConfig | None = None) -> Iterator[str]:
    with serving(server, options) as running:
        yield running.url
