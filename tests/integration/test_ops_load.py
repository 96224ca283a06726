"""Backpressure (a full queue is a 429, then recovery; nothing admitted is dropped) and
engine failures (one failing step fails its requests only; the engine goes on).

One server with a tiny batch (2 sequences) and queue (2 more), whose runner fails every
step that holds a request whose X-Request-Id starts with "boom", at that request's
FAIL_AT-th step.
"""
from __future__ import annotations

import collections
import json

import httpx
import openai
import pytest

from textmill.config import ServerConfig

from .ops_server import MODEL, Stream, ops_server, scrape, wait_for
from .server import TEST_OPTIONS

FAIL_AT = 8  # the prefill step and six decode steps succeed; the eighth step fails


class FailingRunner:
    """The real ModelRunner, except that steps holding a 'boom' request fail at FAIL_AT."""

    def __init__(self, inner):
        self.inner = inner
        self.steps = collections.Counter()

    def execute(self, scheduled):
        marked = [c.request_id for c in scheduled.chunks if c.request_id.startswith("cmpl-boom")]
        self.steps.update(marked)
        if any(self.steps[r] >= FAIL_AT for r in marked):
            raise RuntimeError("injected runner failure")
        return self.inner.execute(scheduled)


@pytest.fixture(scope="module")
def srv():
    options = TEST_OPTIONS.updated(max_num_seqs=2)
    with ops_server(ServerConfig(max_queued_requests=2), options, wrap_runner=FailingRunner) as running:
        yield running


def _body(**kw) -> dict:
    # No end-of-text (SmolLM2's ids 0 and 2): every request runs for exactly max_tokens.
    return {"model": MODEL, "prompt": "Tell me a long story about a lighthouse.", "max_tokens": 48,
            "temperature": 0.7, "seed": 1, "logit_bias": {"0": -100, "2": -100}, **kw}


def test_full_queue_is_429_then_recovers(srv):
    url = srv.url
    running = [Stream(url, _body(seed=i)) for i in range(2)]
    for s in running:
        assert s.started.wait(60) and s.status == 200
    assert wait_for(lambda: scrape(url)["vllm:num_requests_running"] == 2, timeout=10)
    waiting = [Stream(url, _body(seed=10 + i)) for i in range(2)]
    assert wait_for(lambda: scrape(url)["textmill:admitted_sequences"] == 4, timeout=10)
    r = httpx.post(f"{url}/v1/completions", json=_body(max_tokens=4), timeout=60)
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "requests", "param": None,
                                 "code": "rate_limit_exceeded"}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    # Every admitted request runs to its end: none is dropped for the overflow.
    for s in running + waiting:
        text, chunks = s.result()
        assert s.events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length", s.events[-3:]
        assert text
    assert wait_for(lambda: scrape(url)["textmill:admitted_sequences"] == 0, timeout=10)
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert ok.usage.completion_tokens == 2
    # The client's own retries, told by Retry-After, get through once there is room.
    assert scrape(url)["textmill:http_requests_total"] > 0


def test_request_larger_than_the_queue_is_400_not_429(srv):
    r = httpx.post(f"{srv.url}/v1/completions", json=_body(n=3, max_tokens=2), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(f"{srv.url}/v1/completions", json=_body(prompt=["a", "b", "c"], max_tokens=2), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_failing_step_is_a_500_and_the_engine_goes_on(srv):
    r = httpx.post(f"{srv.url}/v1/completions", json=_body(max_tokens=20), headers={"X-Request-Id": "boom-1"},
                   timeout=60)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "server_error"
    assert "Traceback" not in error["message"] and "injected" not in error["message"]
    ok = httpx.post(f"{srv.url}/v1/completions", json=_body(max_tokens=5), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    assert scrape(srv.url)["textmill:step_failures_total"] >= 1


def test_failing_step_mid_stream_is_an_error_event(srv):
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=_body(max_tokens=20, stream=True),
                      headers={"X-Request-Id": "boom-2"}, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert "choices" in payloads[0] and payloads[0]["id"] == "cmpl-boom-2"  # text came before the failure
    assert payloads[-1]["error"]["type"] == "server_error"
    assert wait_for(lambda: scrape(srv.url)["vllm:num_requests_running"] == 0, timeout=10)
    ok = httpx.post(f"{srv.url}/v1/completions", json=_body(max_tokens=5, stream=True), timeout=60)
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]") and '"error"' not in ok.text


def test_only_the_failing_steps_requests_fail(srv):
    """The batch holds A and boom; B waits for room. The step that fails holds A and boom:
    both end with an error, and B, which was in no failed step, completes."""
    a = Stream(srv.url, _body(max_tokens=60, seed=5))
    assert a.started.wait(60)
    boom = Stream(srv.url, _body(max_tokens=60), request_id="boom-4")
    assert boom.started.wait(60)
    b = Stream(srv.url, _body(max_tokens=10, seed=6))
    for s, fails in ((a, True), (boom, True), (b, False)):
        _, chunks = s.result()
        assert s.events[-1] == "[DONE]"
        assert ("error" in chunks[-1]) is fails, (fails, s.events[-3:])
    _, b_chunks = b.result()
    assert b_chunks[-1]["choices"][0]["finish_reason"] == "length"
