"""The server end to end through the official openai client: sync, async, streaming,
continuous batching (concurrent == sequential), /v1/models and /health."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from .conftest import MODEL

NO_EOS = {"2": -100}  # SmolLM2's EOS (<|im_end|>) banned: every request runs to max_tokens

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    "The quick brown fox",
    "In machine learning, a transformer is",
    "My favourite food is",
    "Water boils at",
    "import numpy as np\n",
    "The three primary colours are",
    "Dear Sir or Madam,",
    "The best way to learn a language is",
]


def test_health_and_models(base_url, client):
    assert httpx.get(f"{base_url}/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_greedy_completion_shape(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                  temperature=0, logit_bias=NO_EOS)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert r.system_fingerprint and r.created > 0
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert choice.text.strip()
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == 5 and r.usage.total_tokens == 13


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt="Hello", temperature=0, logit_bias=NO_EOS)
    assert r.usage.completion_tokens == 16


def test_greedy_is_deterministic(client):
    a = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0)
    b = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def test_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=20, temperature=0, logit_bias=NO_EOS)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_include_usage(client):
    chunks = list(client.completions.create(
        model=MODEL, prompt="Hi there", max_tokens=5, temperature=0, logit_bias=NO_EOS,
        stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens == 2
    assert all(c.usage is None for c in body)


def test_concurrent_greedy_equals_sequential(client, async_client):
    kwargs = dict(model=MODEL, max_tokens=24, temperature=0)
    sequential = [client.completions.create(prompt=p, **kwargs).choices[0].text for p in PROMPTS]

    async def all_at_once():
        rs = await asyncio.gather(*(async_client.completions.create(prompt=p, **kwargs) for p in PROMPTS))
        return [r.choices[0].text for r in rs]

    assert asyncio.run(all_at_once()) == sequential


def test_concurrent_seeded_sampling_equals_sequential(client, async_client):
    kwargs = dict(model=MODEL, max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    sequential = [client.completions.create(prompt=p, **kwargs).choices[0].text for p in PROMPTS]

    async def all_at_once():
        rs = await asyncio.gather(*(async_client.completions.create(prompt=p, **kwargs) for p in PROMPTS))
        return [r.choices[0].text for r in rs]

    assert asyncio.run(all_at_once()) == sequential


def test_seed_changes_the_sample(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.0)
    texts = {client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}
    assert len(texts) > 1


def test_async_streaming_concurrent(async_client):
    async def one(p):
        stream = await async_client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0,
                                                       logit_bias=NO_EOS, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        return await asyncio.gather(*(one(p) for p in PROMPTS[:6]))

    texts = asyncio.run(main())
    assert all(t for t in texts)


def test_stop_string_cuts_text(client):
    base = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0).choices[0].text
    assert "," in base
    stop = base[base.index(","):][:3]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == base[: base.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=[stop], stream=True))
    assert streamed == r.choices[0].text


def test_context_window(base_url):
    # The test server's window is 2048 tokens: prompt + max_tokens may fill it exactly.
    ids = [17] * 2040
    body = {"model": MODEL, "prompt": ids, "max_tokens": 8, "temperature": 0, "logit_bias": NO_EOS}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 8
    r = httpx.post(f"{base_url}/v1/completions", json={**body, "max_tokens": 9}, timeout=300)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and "2048" in error["message"] and "2049" in error["message"]
