"""Clients that vanish, bodies that are garbage, and what the operator sees meanwhile.

All against the shared session server (the default test configuration).
"""
from __future__ import annotations

import asyncio
import json
import logging
import random

import httpx
import pytest

from textmill.api.access_log import JsonFormatter

from .conftest import MODEL
from .ops_server import scrape, wait_for


NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end tokens: generation runs to max_tokens


def _idle(base_url: str) -> bool:
    m = scrape(base_url)
    return (m.get("vllm:num_requests_running") == 0 and m.get("vllm:num_requests_waiting") == 0
            and m.get("textmill:kv_cache_blocks_in_use") == 0 and m.get("textmill:admitted_sequences") == 0
            and m.get("vllm:kv_cache_usage_perc") == 0)


async def _storm_client(client: httpx.AsyncClient, i: int, rng: random.Random) -> str:
    body = {"model": MODEL, "prompt": f"Story number {i}: once upon a time", "max_tokens": 48,
            "stream": True, "temperature": 1.0, "seed": i}
    plan = rng.choice(["at_once", "after_some", "after_some", "after_some", "complete"])
    if plan == "at_once":  # gone before the first byte of the answer
        with pytest.raises((asyncio.TimeoutError, httpx.TimeoutException)):
            await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=rng.uniform(0.0, 0.2))
        return plan
    keep = rng.randint(1, 12)
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines += 1
                if line == "data: [DONE]":
                    break
                if plan == "after_some" and lines >= keep:
                    return plan  # leaving the block closes the connection mid-stream
    return plan


async def _storm(base_url: str, num_clients: int) -> list[str]:
    rng = random.Random(1234)
    limits = httpx.Limits(max_connections=num_clients + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as client:
        async def delayed(i: int) -> str:
            await asyncio.sleep(rng.uniform(0, 0.5))
            return await _storm_client(client, i, rng)
        return await asyncio.gather(*(delayed(i) for i in range(num_clients)))


def test_disconnect_storm_frees_every_block(base_url):
    plans = asyncio.run(_storm(base_url, 64))
    assert plans.count("complete") >= 1 and plans.count("after_some") >= 20, plans
    # Every aborted request gives its KV blocks back within a step or two.
    assert wait_for(lambda: _idle(base_url), timeout=30), scrape(base_url)
    # ...and the engine serves again: nothing of the storm is left running or queued.
    r = httpx.post(f"{base_url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "After the storm", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert wait_for(lambda: _idle(base_url), timeout=30), scrape(base_url)


def test_non_stream_client_that_leaves_aborts_its_work(base_url):
    before = scrape(base_url)["textmill:generation_tokens_total"]
    body = {"model": MODEL, "prompt": "Write a very long essay.", "max_tokens": 1500, "temperature": 1.0,
            "seed": 3, "logit_bias": NO_EOS}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=1.5)
    assert wait_for(lambda: _idle(base_url), timeout=10)
    generated = scrape(base_url)["textmill:generation_tokens_total"] - before
    assert generated < 1500, "the abandoned completion ran to its end"


MALFORMED: list[tuple[str, bytes]] = [
    ("invalid json", b'{"model": "x", "prompt": '),
    ("trailing garbage", b'{"model": "m", "prompt": "hi"} extra'),
    ("empty body", b""),
    ("array body", b'[{"model": "m"}]'),
    ("string body", b'"hello"'),
    ("null body", b"null"),
    ("wrong type model", json.dumps({"model": 5, "prompt": "hi"}).encode()),
    ("wrong type prompt", json.dumps({"model": MODEL, "prompt": {"a": 1}}).encode()),
    ("prompt of floats", json.dumps({"model": MODEL, "prompt": [1.5, 2.5]}).encode()),
    ("bool as int", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": True}).encode()),
    ("huge max_tokens", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 10**30}).encode()),
    ("huge n", json.dumps({"model": MODEL, "prompt": "hi", "n": 10**12}).encode()),
    ("huge seed", json.dumps({"model": MODEL, "prompt": "hi", "seed": 10**40}).encode()),
    ("huge token id", json.dumps({"model": MODEL, "prompt": [10**20]}).encode()),
    ("NaN temperature", b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL.encode()),
    ("NaN top_p", b'{"model": "%s", "prompt": "hi", "top_p": NaN}' % MODEL.encode()),
    ("Infinity penalty", b'{"model": "%s", "prompt": "hi", "presence_penalty": Infinity}' % MODEL.encode()),
    ("NaN logit bias", b'{"model": "%s", "prompt": "hi", "logit_bias": {"5": NaN}}' % MODEL.encode()),
    ("-Infinity logit bias", b'{"model": "%s", "prompt": "hi", "logit_bias": {"5": -Infinity}}' % MODEL.encode()),
    ("1e999 max_tokens", b'{"model": "%s", "prompt": "hi", "max_tokens": 1e999}' % MODEL.encode()),
    ("huge string prompt", json.dumps({"model": MODEL, "prompt": "lorem ipsum " * 150_000}).encode()),
    ("body over the size limit", json.dumps({"model": MODEL, "prompt": "a" * (5 * 2**20)}).encode()),
    ("non-utf8 bytes", b'{"model": "\xff\xfe\xfa", "prompt": "hi"}'),
    ("non-utf8 in prompt", b'{"model": "%s", "prompt": "\xc3\x28\xa0"}' % MODEL.encode()),
    ("lone surrogate", b'{"model": "%s", "prompt": "\\ud800", "stop": "\\udfff"}' % MODEL.encode()),
    ("deep nesting", b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("moderate nesting", b'{"model": "m", "prompt": ' + b"[" * 500 + b"]" * 500 + b"}"),
    ("many logit_bias keys", json.dumps({"model": MODEL, "prompt": "hi",
                                         "logit_bias": {str(i): 1 for i in range(5000)}}).encode()),
    ("many prompts", json.dumps({"model": MODEL, "prompt": ["a"] * 1000}).encode()),
    ("null bytes", b'{"model": "%s", "prompt": "hi\\u0000", "stop": "\x00"}' % MODEL.encode()),
    ("duplicate keys", b'{"model": "%s", "prompt": "hi", "n": 1, "n": "two"}' % MODEL.encode()),
]


@pytest.mark.parametrize("name,raw", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_body_is_an_openai_4xx(base_url, name, raw):
    r = httpx.post(f"{base_url}/v1/completions", content=raw, timeout=120,
                   headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"] and len(error["message"]) < 2000


def test_still_correct_after_the_corpus(base_url):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    first = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()
    again = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] == 6 and first["choices"][0]["finish_reason"] == "length"


def test_request_id_is_honoured_and_echoed(base_url):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers={"X-Request-Id": "trace-42.a:b"}, timeout=60)
    assert r.headers["x-request-id"] == "trace-42.a:b" and r.json()["id"] == "cmpl-trace-42.a:b"
    # Two requests may share an id (retries, careless clients): both still complete.
    both = [httpx.post(f"{base_url}/v1/completions", json=body, headers={"X-Request-Id": "same"}, timeout=60)
            for _ in range(2)]
    assert [x.status_code for x in both] == [200, 200]
    bad = httpx.post(f"{base_url}/v1/completions", json=body, headers={"X-Request-Id": "no spaces <allowed>"},
                     timeout=60)
    fresh = bad.headers["x-request-id"]
    assert fresh != "no spaces <allowed>" and bad.json()["id"] == f"cmpl-{fresh}"
    assert httpx.get(f"{base_url}/health", timeout=10).headers["x-request-id"]
    stream = httpx.post(f"{base_url}/v1/completions", json={**body, "stream": True},
                        headers={"X-Request-Id": "streamed-1"}, timeout=60)
    assert stream.headers["x-request-id"] == "streamed-1" and '"id":"cmpl-streamed-1"' in stream.text


def test_metrics_follow_the_requests(base_url):
    before = scrape(base_url)
    # Long enough to fill whole KV blocks, which the prefix cache stores.
    body = {"model": MODEL, "prompt": "Counting tokens for metrics, one by one. " * 8, "max_tokens": 5,
            "temperature": 0, "logit_bias": NO_EOS}
    usage = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()["usage"]
    httpx.post(f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=60)
    after = scrape(base_url)
    assert after["textmill:prompt_tokens_total"] - before["textmill:prompt_tokens_total"] == 2 * usage["prompt_tokens"]
    assert after["textmill:generation_tokens_total"] - before["textmill:generation_tokens_total"] == 10
    assert after["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"] == 2
    assert after["textmill:inter_token_latency_seconds_count"] - before["textmill:inter_token_latency_seconds_count"] == 8
    assert after["textmill:http_requests_total"] - before["textmill:http_requests_total"] >= 2
    # The second identical prompt hit the prefix cache.
    assert usage["prompt_tokens"] > 32
    assert after["vllm:prefix_cache_hits_total"] > before.get("vllm:prefix_cache_hits_total", 0)
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "textmill:prefix_cache_hit_rate", "textmill:kv_cache_blocks"):
        assert name in after, name
    assert 0 < after["textmill:prefix_cache_hit_rate"] <= 1


def test_access_log_line_per_request(base_url, caplog):
    caplog.set_level(logging.INFO, logger="textmill.access")
    body = {"model": MODEL, "prompt": "Log me", "max_tokens": 3}
    # The usage the client got, not a fixed 3: the model may end with EOS sooner, e.g. when
    # another test's request shares its steps.
    usage = httpx.post(f"{base_url}/v1/completions", json=body, headers={"X-Request-Id": "logged-1"},
                       timeout=60).json()["usage"]
    httpx.post(f"{base_url}/v1/completions", json={**body, "n": 0}, headers={"X-Request-Id": "logged-2"}, timeout=60)
    assert wait_for(lambda: sum(r.name == "textmill.access" for r in caplog.records) >= 2, timeout=5)
    records = {r.access["request_id"]: r for r in caplog.records if r.name == "textmill.access"}
    ok, bad = records["logged-1"], records["logged-2"]
    assert ok.access["status"] == 200 and ok.access["completion_tokens"] == usage["completion_tokens"] >= 1
    assert ok.access["prompt_tokens"] == usage["prompt_tokens"] >= 1
    assert ok.access["ttft_s"] > 0 and ok.access["duration_s"] >= ok.access["ttft_s"]
    assert "logged-1 POST /v1/completions 200" in ok.getMessage()
    assert bad.access["status"] == 400 and bad.access["completion_tokens"] is None
    line = json.loads(JsonFormatter().format(ok))
    assert line["request_id"] == "logged-1" and line["status"] == 200 and line["logger"] == "textmill.access"
