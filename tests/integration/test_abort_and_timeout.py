"""Work nobody waits for any more stops: clients that vanish mid-generation, and requests
that run past --request-timeout. The real model through the real app; every check reads
the engine's own state (running requests, KV blocks in use), none a clock.

The engine's steps are metered by a gate around the runner: while it is shut, a step waits
at the runner for a permit, so the test knows exactly which step does what.
"""
from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest

from textmill.config import ServerConfig

from .ops_server import MODEL, NO_EOS, scrape, wait_for
from .server import TEST_OPTIONS, asgi_spec_version, serving

pytestmark = pytest.mark.timeout(600)  # a state never reached fails here; nothing is timed


class Gate:
    """Wraps the ModelRunner. Open: steps run freely. Shut: each step waits at execute()
    until release() hands it a permit. `entered` counts the steps that reached the runner."""

    def __init__(self, runner):
        self._runner = runner
        self._cond = threading.Condition()
        self._permits: int | None = None  # None: open
        self._blocked = False
        self.entered = 0

    def execute(self, scheduled):
        with self._cond:
            self.entered += 1
            while self._permits == 0:
                self._blocked = True
                self._cond.notify_all()
                self._cond.wait()
            self._blocked = False
            if self._permits is not None:
                self._permits -= 1
        return self._runner.execute(scheduled)

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def shut(self) -> None:
        with self._cond:
            self._permits = 0

    def open(self) -> None:
        with self._cond:
            self._permits = None
            self._cond.notify_all()

    def wait_until_blocked(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._blocked)

    def step(self) -> None:
        """Let one step run, and return once the next one waits at the runner: by then that
        next step has been scheduled (its schedule() freed whatever was aborted)."""
        with self._cond:
            target = self.entered + 1
            self._permits += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._blocked and self.entered >= target)


# The ASGI spec version the server claims: uvicorn's own (2.3, where Starlette listens for
# http.disconnect during a stream), and 2.4 (where nothing but the app itself does).
@pytest.fixture(scope="module", params=["2.3", "2.4"], ids=["asgi-2.3", "asgi-2.4"])
def gated(request):
    gates: list[Gate] = []

    def wrap(runner):
        gates.append(Gate(runner))
        return gates[0]

    # A context that holds prompt + 4000 tokens; 0.25 GiB of KV holds ~11k tokens.
    options = TEST_OPTIONS.updated(max_model_len=4200)
    with serving(ServerConfig(), options, wrap_runner=wrap, wrap_app=asgi_spec_version(request.param)) as running:
        yield running, gates[0]
        gates[0].open()


class Client:
    """One completion with max_tokens 4000 whose client vanishes on `leave`: it closes the
    connection mid-stream (stream) or while waiting for the answer (non-streaming)."""

    def __init__(self, url: str, port: int, stream: bool, seed: int):
        self.body = {"model": MODEL, "prompt": f"Tell me a very long story, number {seed}.", "max_tokens": 4000,
                     "temperature": 1.0, "seed": seed, "logit_bias": NO_EOS, "stream": stream}
        self.got_data = threading.Event()
        self.leave = threading.Event()
        target = self._stream if stream else self._wait_for_answer
        self.thread = threading.Thread(target=target, args=(url, port), daemon=True)
        self.thread.start()

    def _stream(self, url: str, port: int) -> None:
        with httpx.Client(timeout=None) as http, http.stream("POST", f"{url}/v1/completions", json=self.body) as r:
            lines = r.iter_lines()  # kept: closing the line iterator would close the connection now
            for line in lines:
                if line.startswith("data: "):
                    self.got_data.set()
                    break
            self.leave.wait()
        # Leaving both blocks closes the connection with the stream unfinished.

    def _wait_for_answer(self, url: str, port: int) -> None:
        payload = json.dumps(self.body).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + payload)
            self.got_data.set()
            self.leave.wait()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-streaming"])
def test_vanished_clients_free_their_kv_blocks_within_one_engine_step(gated, stream):
    running, gate = gated
    aengine = running.app.state.serving.engine
    engine = aengine._engine  # read only while the engine thread waits at the gate
    port = int(running.url.rsplit(":", 1)[1])
    gate.shut()
    before = engine.stats()
    assert before.num_running == 0 and before.num_waiting == 0
    clients = [Client(running.url, port, stream, seed) for seed in range(3)]
    gate.wait_until_blocked()  # the first request's first step
    # Step until all three run and each client has heard from the server.
    while not (engine.stats().num_running == 3 and all(c.got_data.is_set() for c in clients)):
        gate.step()
    assert engine.stats().kv_cache_usage > before.kv_cache_usage

    for c in clients:  # the clients vanish while a step waits at the gate
        c.leave.set()
        c.thread.join()
    # The HTTP side notices with the engine stalled: nothing is written to the clients
    # meanwhile, so only a listener for http.disconnect can tell.
    assert wait_for(lambda: aengine.num_unfinished == 0, timeout=120), "the server never noticed"
    gate.step()  # the stalled step ends; the next one is scheduled and waits at the gate
    after = engine.stats()
    assert after.num_running == 0 and after.num_waiting == 0
    assert after.kv_cache_usage == before.kv_cache_usage
    gate.open()


# ---------------------------------------------------------------- --request-timeout
@pytest.fixture(scope="module")
def timed():
    with serving(ServerConfig(request_timeout=0.5)) as running:
        yield running


def _engine_idle(running) -> bool:
    stats = running.app.state.serving.engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0


def test_request_timeout_non_streaming_is_a_504_timeout_error(timed):
    client = openai.OpenAI(base_url=f"{timed.url}/v1", api_key="unused", max_retries=0, timeout=300)
    with pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model=MODEL, prompt="Write a very long essay.", max_tokens=1500,
                                  temperature=1.0, seed=1, logit_bias=NO_EOS)
    assert exc.value.status_code == 504
    assert exc.value.body["type"] == "timeout_error" and exc.value.body["code"] == "request_timeout"
    assert "--request-timeout" in exc.value.body["message"]
    # Aborted, its KV blocks freed: not run on to its 1500 tokens.
    assert wait_for(lambda: _engine_idle(timed), timeout=120), timed.app.state.serving.engine.stats()
    assert scrape(timed.url)["textmill:generation_tokens_total"] < 1500


def test_request_timeout_ends_a_stream_with_an_error_event_before_done(timed):
    body = {"model": MODEL, "prompt": "Write a very long essay.", "max_tokens": 1500, "temperature": 1.0,
            "seed": 2, "logit_bias": NO_EOS, "stream": True}
    with httpx.stream("POST", f"{timed.url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert wait_for(lambda: _engine_idle(timed), timeout=120), timed.app.state.serving.engine.stats()


def test_request_timeout_reaches_the_openai_client_as_a_stream_error(timed):
    client = openai.OpenAI(base_url=f"{timed.url}/v1", api_key="unused", max_retries=0, timeout=300)
    stream = client.completions.create(model=MODEL, prompt="Write a very long essay.", max_tokens=1500,
                                       temperature=1.0, seed=3, logit_bias=NO_EOS, stream=True)
    with pytest.raises(openai.APIError) as exc:
        for _ in stream:
            pass
    assert exc.value.body["type"] == "timeout_error" and exc.value.body["code"] == "request_timeout"
    assert "--request-timeout" in exc.value.message
    assert wait_for(lambda: _engine_idle(timed), timeout=120), timed.app.state.serving.engine.stats()
