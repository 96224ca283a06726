"""API keys and the server's limits, on one server that has both.

Keys: /health (and the docs) open; /v1/* and /metrics need `Authorization: Bearer <key>`.
Limits: each is a 400 naming the field (the body size: param null, code request_too_large).
"""
from __future__ import annotations

import argparse
import json

import httpx
import openai
import pytest

from textmill.cli import build_parser, server_config_from_args
from textmill.config import ServerConfig

from .ops_server import MODEL, ops_server, scrape

KEYS = ("sk-first-key", "sk-second-key")
LIMITS = ServerConfig(api_keys=KEYS, max_request_bytes=32 * 1024, max_prompt_tokens=40, max_n=3, max_best_of=4,
                      max_prompts_per_request=3, max_logit_bias_entries=2)
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def url():
    with ops_server(LIMITS) as running:
        yield running.url


def _post(url: str, body: dict, headers: dict | None = AUTH, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60, **kw)


# ---------------------------------------------------------------- auth
@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-first-key"},
                                     {"Authorization": "Basic c2stZmlyc3Qta2V5"},
                                     {"Authorization": "Bearer sk-first-ke"}, {"Authorization": "Bearer"},
                                     {"Authorization": "Bearer sk-first-key-and-more"}])
def test_missing_or_wrong_key_is_401(url, headers):
    r = _post(url, {"model": MODEL, "prompt": "Hi", "max_tokens": 1}, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                  "param": None, "code": "invalid_api_key"}}
    assert httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code == 401
    assert httpx.get(f"{url}/metrics", headers=headers, timeout=10).status_code == 401


def test_each_key_opens_the_api(url):
    for key in KEYS:
        headers = {"Authorization": f"Bearer {key}"}
        assert _post(url, {"model": MODEL, "prompt": "Hi", "max_tokens": 1}, headers=headers).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code == 200
        assert "vllm:num_requests_running" in scrape(url, headers)
    lower = {"Authorization": f"bearer {KEYS[0]}"}  # the scheme is case-insensitive (RFC 7235)
    assert httpx.get(f"{url}/v1/models", headers=lower, timeout=10).status_code == 200


def test_health_and_docs_stay_open(url):
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{url}/openapi.json", timeout=10).status_code == 200


def test_openai_client_with_keys(url):
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[0], max_retries=0)
    assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert exc.value.body["code"] == "invalid_api_key"


def test_unauthenticated_large_body_is_401_first(url):
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (64 * 1024), timeout=60)
    assert r.status_code == 401


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_keys_from_flags_or_environment():
    assert server_config_from_args(_args("--api-key", "a", "--api-key", "b"), {}).api_keys == ("a", "b")
    assert server_config_from_args(_args(), {"TEXTMILL_API_KEY": "k1,k2"}).api_keys == ("k1", "k2")
    # Flags win over the environment; neither means an open server.
    assert server_config_from_args(_args("--api-key", "a"), {"TEXTMILL_API_KEY": "env"}).api_keys == ("a",)
    assert server_config_from_args(_args(), {}).api_keys == ()


def test_limit_flags_reach_the_server_config():
    cfg = server_config_from_args(_args("--max-request-bytes", "1000", "--max-prompt-tokens", "9", "--max-n", "2",
                                        "--max-best-of", "3", "--max-prompts-per-request", "4",
                                        "--max-logit-bias-entries", "5", "--max-queued-requests", "6",
                                        "--shutdown-timeout", "7.5", "--log-format", "json"), {})
    assert (cfg.max_request_bytes, cfg.max_prompt_tokens, cfg.max_n, cfg.max_best_of, cfg.max_prompts_per_request,
            cfg.max_logit_bias_entries, cfg.max_queued_requests, cfg.shutdown_timeout, cfg.log_format) == (
        1000, 9, 2, 3, 4, 5, 6, 7.5, "json")
    assert cfg.load_in_background


# ---------------------------------------------------------------- limits
OVER = [
    ({"prompt": "word " * 60}, "prompt"),  # past --max-prompt-tokens 40
    ({"prompt": list(range(1, 42))}, "prompt"),
    ({"prompt": ["a", "b", "c", "d"]}, "prompt"),  # past --max-prompts-per-request 3
    ({"n": 4}, "n"),  # past --max-n 3
    ({"best_of": 5, "n": 1}, "best_of"),  # past --max-best-of 4
    ({"logit_bias": {"1": 1, "2": 1, "3": 1}}, "logit_bias"),  # past --max-logit-bias-entries 2
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),  # the spec's 4
]


@pytest.mark.parametrize("patch,param", OVER, ids=[p for _, p in OVER])
def test_limit_is_a_400_naming_the_field(url, patch, param):
    r = _post(url, {"model": MODEL, "prompt": "Hi", "max_tokens": 1, **patch})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_at_the_limits_is_fine(url):
    body = {"model": MODEL, "prompt": ["Hi", "Yo", "Ok"], "max_tokens": 1, "n": 3, "best_of": 4,
            "logit_bias": {"1": 1, "2": 1}, "stop": ["a", "b", "c", "d"]}
    r = _post(url, body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 9
    assert _post(url, {"model": MODEL, "prompt": list(range(1, 41)), "max_tokens": 1}).status_code == 200


def test_body_over_the_size_limit(url):
    big = {"model": MODEL, "prompt": "a" * (40 * 1024), "max_tokens": 1}
    r = _post(url, big)
    assert r.status_code == 400
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                 "param": None, "code": "request_too_large"}
    # Chunked (no Content-Length): counted as it arrives.
    chunks = (json.dumps(big).encode()[i:i + 4096] for i in range(0, 50 * 1024, 4096))
    r = httpx.post(f"{url}/v1/completions", content=chunks, headers={**AUTH, "content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
    assert _post(url, {"model": MODEL, "prompt": "Hi", "max_tokens": 1}).status_code == 200
