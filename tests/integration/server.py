"""Run the real app (real model, real engine) under uvicorn in a background thread."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from textmill.api.app import create_app
from textmill.config import ServerConfig
from textmill.loader.bundled import BUNDLED_NAME
from textmill.wiring import EngineOptions, build_serving

# float32 keeps greedy decoding independent of batch composition up to float rounding;
# a small context and cache keep the tests light on a 2-core machine.
TEST_OPTIONS = EngineOptions(dtype="float32", max_model_len=2048, kv_cache_gib=0.25,
                             max_num_batched_tokens=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(options: EngineOptions = TEST_OPTIONS, server: ServerConfig | None = None,
                   ) -> Iterator[str]:
    port = free_port()
    server = server or ServerConfig(port=port, served_model_name=BUNDLED_NAME)
    app = create_app(server, lambda: build_serving(options, server.served_model_name))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
