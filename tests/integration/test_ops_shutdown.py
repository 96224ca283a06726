"""Starting and stopping: /health while the model loads, the drain on SIGTERM (new work
503, work in flight finishes, exit 0), the drain deadline, and models that cannot load.

The in-process tests call the server's signal handler directly; the subprocess tests
run the real `textmill serve` and send it a real SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from textmill.config import ServerConfig
from textmill.loader.bundled import bundled_model_path

from .ops_server import MODEL, NO_EOS, Stream, ops_server, wait_for
from .server import free_port


def _body(max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": "Count slowly:", "max_tokens": max_tokens, "temperature": 0.5, "seed": 7,
            "logit_bias": NO_EOS}


def _health(url: str) -> tuple[int, str]:
    r = httpx.get(f"{url}/health", timeout=10)
    return r.status_code, r.json()["status"]


@pytest.mark.slow
def test_loading_then_drain_on_sigterm(tmp_path):
    with ops_server(ServerConfig(load_in_background=True, shutdown_timeout=60)) as srv:
        # The port is open before the model is loaded: probes and clients hear 503.
        first = _health(srv.url)
        assert first in ((503, "loading"), (200, "ok")), first
        if first[0] == 503:
            r = httpx.post(f"{srv.url}/v1/completions", json=_body(2), timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert wait_for(lambda: _health(srv.url) == (200, "ok"), timeout=120)

        stream = Stream(srv.url, _body(40))
        assert stream.started.wait(60)
        srv.server.handle_exit(signal.SIGTERM, None)
        assert _health(srv.url) == (503, "draining")
        r = httpx.post(f"{srv.url}/v1/completions", json=_body(2), timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "server_shutting_down"
        text, chunks = stream.result()
        assert stream.events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in c for c in chunks)
        srv.thread.join(timeout=30)
        assert not srv.thread.is_alive(), "the server did not exit after draining"


@pytest.mark.slow
def test_drain_deadline_ends_what_is_left_with_an_error():
    with ops_server(ServerConfig(shutdown_timeout=1.0)) as srv:
        stream = Stream(srv.url, _body(1500))
        assert stream.started.wait(60)
        srv.server.handle_exit(signal.SIGTERM, None)
        _, chunks = stream.result()
        # Ended by the deadline, not run to its 1500 tokens.
        assert stream.events[-1] == "[DONE]" and chunks[-1]["error"]["type"] == "server_error"
        assert len(chunks) < 1500
        srv.thread.join(timeout=30)
        assert not srv.thread.is_alive()


# ---------------------------------------------------------------- the real process
def _serve(*args: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "textmill.cli", "serve", *args, "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--kv-cache-memory", "0.1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TEXTMILL_API_KEY", None)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _probe(url: str) -> tuple[int, str] | None:
    try:
        return _health(url)
    except httpx.TransportError:
        return None


@pytest.mark.slow
def test_sigterm_drains_the_real_server_and_exits_0():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve("--shutdown-timeout", "60", "--log-format", "json", port=port)
    try:
        seen = set()
        deadline = time.monotonic() + 120
        while (state := _probe(url)) != (200, "ok"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            seen.add(state)
            time.sleep(0.05)
        assert seen <= {None, (503, "loading")}, seen
        stream = Stream(url, _body(40))
        assert stream.started.wait(60)
        proc.send_signal(signal.SIGTERM)
        assert _health(url) == (503, "draining")
        assert httpx.post(f"{url}/v1/completions", json=_body(2), timeout=10).status_code == 503
        text, chunks = stream.result()
        assert stream.events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    _, stderr = proc.communicate()
    access = [json.loads(line) for line in stderr.splitlines() if '"textmill.access"' in line]
    assert any(a["path"] == "/v1/completions" and a["status"] == 200 and a["completion_tokens"] == 40
               for a in access), stderr[-3000:]


def _fails_to_start(model: Path | str) -> str:
    proc = _serve(str(model), port=free_port())
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.communicate()[1]
    assert "Traceback" not in stderr, stderr
    ours = [line for line in stderr.splitlines() if line.startswith("textmill: ")]
    assert len(ours) == 1, stderr
    return ours[0]


def test_missing_model_exits_with_one_message(tmp_path):
    assert "model not found" in _fails_to_start(tmp_path / "nothing-here.gguf")


@pytest.mark.slow
def test_corrupt_model_exits_with_one_message(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(64 * 1024))
    assert "cannot load model" in _fails_to_start(garbage)
    truncated = tmp_path / "truncated.gguf"
    with open(bundled_model_path(), "rb") as f:
        truncated.write_bytes(f.read(3 * 2**20))
    assert "cannot load model" in _fails_to_start(truncated)
