"""Bad input always gets a 400 (or 404) OpenAI error naming the field, and the server keeps serving."""
from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import MODEL

BAD = [
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"stream": True, "n": 1, "best_of": 2}, "best_of"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 99999999]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"logprobs": 6}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"suffix": "end"}, "suffix"),
    ({"echo": "yes"}, "echo"),
    ({"seed": 2**64}, "seed"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 3}, "min_tokens"),  # more than max_tokens (2)
    ({"stop_token_ids": [99999999]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
]


@pytest.mark.parametrize("patch,param", BAD)
def test_bad_field_is_400_naming_it(base_url, patch, param):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **patch}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.parametrize("kwargs,param", [
    ({"prompt": [1, 99999999]}, "prompt"),
    ({"prompt": [[1], [2, 49152]]}, "prompt"),  # one past SmolLM2's last id
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"extra_body": {"stop_token_ids": [99999999]}}, "stop_token_ids"),
    ({"extra_body": {"min_tokens": 1, "stop_token_ids": [2, 49152]}}, "stop_token_ids"),
])
def test_out_of_range_token_ids_are_out_of_vocabulary(client, kwargs, param):
    # vLLM's words: clients match on "out of vocabulary".
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(**{"model": MODEL, "prompt": "Hi", "max_tokens": 2, **kwargs})
    assert exc.value.body["param"] == param and "out of vocabulary" in exc.value.body["message"]


def test_detokenize_out_of_range_is_out_of_vocabulary(base_url):
    r = httpx.post(f"{base_url}/detokenize", json={"tokens": [1, 10**9]}, timeout=10)
    assert r.status_code == 400 and "out of vocabulary" in r.json()["error"]["message"]


def test_missing_fields(base_url):
    for body, param in (({"prompt": "x"}, "model"), ({"model": MODEL}, "prompt")):
        r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe{}", b'"text"', b"null"])
def test_malformed_bodies(base_url, raw):
    r = httpx.post(f"{base_url}/v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-nonexistent", prompt="Hi", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found"


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="Hi", temperature=5)
    assert exc.value.body["param"] == "temperature"


def test_unknown_path_is_openai_shaped(base_url):
    r = httpx.get(f"{base_url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_server_still_serves_after_bad_input(client):
    r = client.completions.create(model=MODEL, prompt="Still alive?", max_tokens=3)
    assert r.choices[0].text is not None and r.usage.completion_tokens >= 1


def test_tokenize_and_detokenize_errors(base_url):
    r = httpx.post(f"{base_url}/detokenize", json={"tokens": [1, 10**9]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = httpx.post(f"{base_url}/tokenize", json={"prompt": 5}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{base_url}/tokenize", json={"model": "nope", "prompt": "x"}, timeout=10)
    assert r.status_code == 404


def test_extreme_but_valid_values_fail_nobody(base_url, client):
    # A huge top_k and a vanishing temperature are legal; they must neither fail the step
    # (and with it other clients' requests) nor produce a wrong token.
    greedy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                       temperature=0).choices[0].text
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4}
    for extra in ({"top_k": 2**62, "temperature": 1e-30}, {"temperature": 1e-40}):
        r = httpx.post(f"{base_url}/v1/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy
