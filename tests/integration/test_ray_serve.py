"""textmill on Ray Serve as a user runs it: `textmill serve --replicas 2` (a local Ray head,
2 engine replicas of the bundled model, one CPU and one torch thread each), one process
shared by the whole module.

The project's conformance suite runs against this endpoint: every test of
test_conformance.py is imported here, and this module's `base_url` and `client` point
them at the Ray application instead of the single in-process server. Left out: the three
that are not about the endpoint (they start servers of their own, or read the server's
log records, which here live in the replica processes).

Then what only replicas have: prefix-aware routing, one scrape for all, a replica killed
mid-run, and SIGTERM (last: it ends the process). Nothing here is timed; pytest-timeout
bounds the waits.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from . import test_conformance
from .ray_app import shared_prefix_requests, shared_prefixes
from .server import free_port
from .test_conformance import *  # noqa: F401,F403 (the conformance tests, run here against Ray)
from .test_conformance import MODEL, NO_EOS

for _name in ("test_user_is_logged_and_unknown_fields_ignored_with_a_debug_line",
              "test_seed_and_greedy_survive_preemption", "test_system_fingerprint_changes_with_dtype"):
    del globals()[_name]

pytestmark = pytest.mark.timeout(900)

# The engine of tests/integration/server.py's TEST_OPTIONS, as flags; one thread per replica.
ENGINE_FLAGS = ("--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory", "0.25",
                "--max-num-batched-tokens", "256", "--kv-cache-dtype", "float32", "--threads", "1")


class App:
    def __init__(self, tmp: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / "textmill-serve.log"
        cmd = [sys.executable, "-m", "textmill.cli", "serve", "--replicas", "2", "--port", self.url.rsplit(":", 1)[1],
               "--shutdown-timeout", "60", *ENGINE_FLAGS]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("TEXTMILL_API_KEY", None)
        with self.log.open("w") as out:  # a session of its own: Ray's processes are all ours to end
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self) -> None:
        """Until /health is 200 (Ray's proxy answers 404 until the application is deployed)."""
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=10).status_code == 200:
                    return
            time.sleep(0.5)

    def engine_pids(self) -> list[int]:
        """The engine replicas' processes (Ray titles them ray::ServeReplica:<app>:<deployment>)."""
        return [pid for pid in _descendants(self.proc.pid)
                if b"ServeReplica:textmill:TextmillEngine" in _cmdline(pid)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of this session is left
        self.proc.wait()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory):
    app = App(tmp_path_factory.mktemp("ray"))
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def base_url(ray_serve):
    return ray_serve.url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _replica_labels(base_url: str) -> set[str]:
    """The replicas one scrape of /metrics saw."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {line.split('replica="', 1)[1].split('"', 1)[0] for line in text.splitlines()
            if line.startswith("vllm:num_requests_waiting{")}


# ------------------------------------------------------------------ the endpoint itself
def test_the_conformance_suite_is_imported():
    """The suite really runs here: every test of test_conformance.py but the three named."""
    theirs = {n for n in dir(test_conformance) if n.startswith("test_")}
    ours = {n for n in globals() if n.startswith("test_")}
    assert len(theirs) > 60 and len(theirs - ours) == 3


def test_headers_are_the_single_servers(base_url):
    """One X-Request-Id (Ray's proxy adds its own; the replica's is dropped), echoed as sent."""
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                   headers={"X-Request-Id": "ray-test-1"}, timeout=60)
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["ray-test-1"]
    assert r.json()["id"] == "cmpl-ray-test-1"
    assert r.headers["content-type"] == "application/json"
    assert httpx.get(f"{base_url}/health", timeout=30).json() == {"status": "ok"}


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_past_the_limit_is_the_replicas_400(base_url, declared):
    """The ingress reads at most --max-request-bytes + 1 and lets the replica's own limit answer."""
    body = b'{"prompt": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    content = body if declared else (body[i:i + 65536] for i in range(0, len(body), 65536))
    r = httpx.post(f"{base_url}/v1/completions", content=content, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text[:300]


def test_one_scrape_sees_every_replica(base_url, client, ray_serve):
    for i in range(4):
        client.completions.create(model=MODEL, prompt=f"Count to {i}", max_tokens=2)
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert len(_replica_labels(base_url)) == len(ray_serve.engine_pids()) == 2
    assert text.count("# TYPE vllm:num_requests_waiting gauge") == 1  # one family, every replica
    served = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith('textmill:http_requests_total{endpoint="/v1/completions"')]
    assert sum(served) >= 4


# ------------------------------------------------------------------ prefix routing
def test_shared_prefixes_go_where_they_are_cached(base_url):
    """32 requests on 4 distinct 300-word prefixes: one miss per prefix is the floor; a
    router blind to prefixes (round robin, random) misses about 8 with 2 replicas."""
    prefixes = shared_prefixes(4, 300)
    requests = shared_prefix_requests(prefixes, 8)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)

    def cached(item: tuple[int, str]) -> int:
        r = client.completions.create(model=MODEL, prompt=item[1], max_tokens=2, temperature=0)
        return r.usage.prompt_tokens_details.cached_tokens

    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(cached, requests[:4]))  # one per prefix, all at once
        rest = list(pool.map(cached, requests[4:]))
    misses = sum(1 for c in first + rest if c == 0)
    assert misses <= 5, (first, rest)


# ------------------------------------------------------------------ a client leaves
def _summed(base_url: str, name: str) -> float:
    """One sample family's value summed over the replicas."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_client_that_leaves_frees_its_engine_work(base_url):
    """Closing a stream travels the whole way: Ray cancels the ingress call, the ingress the
    replica's, the replica's app hears http.disconnect and aborts the engine request."""
    generated = _summed(base_url, "textmill:generation_tokens_total")
    body = {"model": MODEL, "prompt": "Write a very long essay.", "max_tokens": 2000, "logit_bias": NO_EOS,
            "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    while _summed(base_url, "vllm:num_requests_running") > 0:
        time.sleep(0.1)
    assert _summed(base_url, "textmill:generation_tokens_total") - generated < 2000


# ------------------------------------------------------------------ a replica dies
def _stream(base_url: str, seed: int, out: dict) -> None:
    body = {"model": MODEL, "prompt": f"Tell me a long story, number {seed}.", "max_tokens": 120,
            "temperature": 1.0, "seed": seed, "logit_bias": NO_EOS, "stream": True}
    events = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    out["events"] = events


def test_a_killed_replica_loses_no_new_request_and_is_replaced(base_url, client, ray_serve):
    before = _replica_labels(base_url)
    assert len(before) == 2
    streams = [{} for _ in range(4)]
    threads = [threading.Thread(target=_stream, args=(base_url, i, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # not a measurement: the streams are under way somewhere by now
    os.kill(ray_serve.engine_pids()[0], signal.SIGKILL)

    # Every request that starts after the kill is answered.
    after = [client.completions.create(model=MODEL, prompt=f"After the kill {i}:", max_tokens=4)
             for i in range(6)]
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in after)

    # The streams in flight end: complete, or with an error event, and always [DONE].
    for t in threads:
        t.join()
    for s in streams:
        assert s["status"] == 200 and s["events"][-1] == "[DONE]", s
        chunks = [json.loads(e) for e in s["events"][:-1]]
        finished = any(c.get("choices") and c["choices"][-1]["finish_reason"] == "length" for c in chunks)
        failed = "error" in chunks[-1]
        assert finished != failed, chunks[-3:]
        if failed:
            assert chunks[-1]["error"]["type"] == "server_error"

    # Ray replaces it: two healthy replicas again, one of them new.
    started = time.monotonic()
    while not (len(now := _replica_labels(base_url)) == 2 and now != before and len(ray_serve.engine_pids()) == 2):
        time.sleep(0.5)
    print(f"back to 2 replicas {time.monotonic() - started:.1f}s after the streams ended")
    assert client.completions.create(model=MODEL, prompt="Back to two", max_tokens=2).choices


# ------------------------------------------------------------------ SIGTERM (last: it ends the process)
def test_sigterm_drains_every_replica_and_exits_0(base_url, ray_serve):
    stream: dict = {}
    thread = threading.Thread(target=_stream, args=(base_url, 99, stream))
    thread.start()
    while not _in_flight(base_url):
        time.sleep(0.05)
    ray_serve.proc.send_signal(signal.SIGTERM)
    while (r := httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                           timeout=60)).status_code != 503:
        time.sleep(0.05)
    assert r.json()["error"]["code"] == "server_shutting_down"
    health = httpx.get(f"{base_url}/health", timeout=30)
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    thread.join()
    chunks = [json.loads(e) for e in stream["events"][:-1]]
    assert stream["events"][-1] == "[DONE]" and chunks[-1]["choices"][-1]["finish_reason"] == "length"
    assert ray_serve.proc.wait(timeout=120) == 0, ray_serve.log.read_text()[-3000:]


def _in_flight(base_url: str) -> bool:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return any(line.startswith("textmill:http_requests_in_flight{") and float(line.rsplit(" ", 1)[1]) > 0
               for line in text.splitlines())
