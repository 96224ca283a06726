"""Every field of the Completions spec, as OpenAI documents it, through the openai client."""
from __future__ import annotations

import math

import httpx
import pytest

from .conftest import MODEL

NO_EOS = {"2": -100}


def test_prompt_forms_and_choice_index(client):
    ids = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=0, echo=True,
                                    logprobs=0).choices[0].logprobs.tokens
    assert "".join(ids) == "Hello world"
    r = client.completions.create(model=MODEL, prompt=["a b c", "The sky is blue and the grass"], n=2,
                                  max_tokens=3, temperature=0, logit_bias=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples of a prompt agree
    assert r.usage.completion_tokens == 12


def test_token_prompts_are_used_as_given(client):
    text_r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is" in SmolLM2's vocabulary
    tok_r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    both = client.completions.create(model=MODEL, prompt=[ids, [504, 3575]], max_tokens=6, temperature=0)
    assert tok_r.choices[0].text == text_r.choices[0].text == both.choices[0].text
    assert tok_r.usage.prompt_tokens == 5 and both.usage.prompt_tokens == 7


def test_echo(client):
    r = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=5, echo=True, temperature=0)
    plain = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=5, temperature=0)
    assert r.choices[0].text == "Roses are red," + plain.choices[0].text
    only = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=0, echo=True)
    assert only.choices[0].text == "Roses are red," and only.usage.completion_tokens == 0
    stream = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=5, echo=True,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_max_tokens_zero_without_echo(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length"


def _check_logprobs(lp, k, text, start):
    n = len(lp.tokens)
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and (n == 0 or lp.text_offset[0] == start)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        if value is None:
            continue
        assert value <= 0 and len(top) <= k + 1 and token in top
        assert math.isclose(top[token], value, abs_tol=1e-6)


def test_logprobs_object(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=3, temperature=0,
                                  logit_bias=NO_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and "".join(lp.tokens) == r.choices[0].text
    _check_logprobs(lp, 3, r.choices[0].text, len(prompt))
    # Greedy picks the most likely token: it is the best of the alternatives.
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert max(top, key=top.get) == token


def test_echo_logprobs_score_what_generation_gave(client):
    prompt = "The capital of France is"
    gen = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=2, temperature=0,
                                    logit_bias=NO_EOS)
    scored = client.completions.create(model=MODEL, prompt=prompt + gen.choices[0].text, max_tokens=0,
                                       echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and scored.choices[0].text == prompt + gen.choices[0].text
    tail = lp.token_logprobs[-8:]
    for a, b in zip(tail, gen.choices[0].logprobs.token_logprobs):
        assert abs(a - b) < 1e-3


def test_lm_eval_loglikelihood_request(base_url):
    # Exactly what lm-evaluation-harness's local-completions model sends.
    ctx = [504, 3575, 282, 4649, 314]
    cont = [7042, 30]
    body = {"model": MODEL, "prompt": [ctx + cont], "max_tokens": 1, "echo": True, "logprobs": 1,
            "temperature": 0, "seed": 1234}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ctx) + len(cont) + 1
    assert lp["token_logprobs"][0] is None
    continuation = lp["token_logprobs"][len(ctx):-1]
    assert len(continuation) == 2 and all(v < 0 for v in continuation)
    # is_greedy: lm-eval compares each continuation token with the top alternative.
    for token, top in zip(lp["tokens"][len(ctx):-1], lp["top_logprobs"][len(ctx):-1]):
        assert token in top


def test_n_and_best_of(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", n=3, max_tokens=6,
                                  temperature=1.0, seed=7, logit_bias=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    best = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, best_of=4, max_tokens=6,
                                     temperature=1.0, seed=7, logit_bias=NO_EOS, logprobs=0)
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == 24
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in best.choices]
    assert means[0] >= means[1]


def test_logit_bias_forces_and_bans(client):
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logit_bias={"17": 100},
                                       temperature=1.0, seed=3)
    assert forced.choices[0].text == "!!!!"
    greedy = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=1, temperature=0,
                                       logprobs=0)
    token = greedy.choices[0].logprobs.tokens[0]
    ids = client.completions.create(model=MODEL, prompt="1, 2, 3," + token, max_tokens=0, echo=True,
                                    logprobs=0).choices[0].logprobs.tokens
    assert ids[-1] == token


def test_penalties_change_repetition(client):
    kwargs = dict(model=MODEL, prompt="1 1 1 1 1 1 1 1", max_tokens=24, temperature=0, logprobs=0,
                  logit_bias=NO_EOS)

    def repeats(**extra):
        tokens = client.completions.create(**kwargs, **extra).choices[0].logprobs.tokens
        return len(tokens) - len(set(tokens))

    plain = repeats()
    assert plain > 12  # the model continues the run of ones
    assert repeats(frequency_penalty=2.0) < plain
    assert repeats(presence_penalty=2.0) < plain
    assert repeats(frequency_penalty=-2.0) >= plain


def test_seed_reproducible_with_n(client):
    kwargs = dict(model=MODEL, prompt="My name is", n=2, max_tokens=12, temperature=1.0, seed=99)
    a = [c.text for c in client.completions.create(**kwargs).choices]
    b = [c.text for c in client.completions.create(**kwargs).choices]
    assert a == b and a[0] != a[1]


def test_stream_with_logprobs_and_n(client):
    chunks = list(client.completions.create(model=MODEL, prompt=["Hi", "Yes"], n=2, max_tokens=4,
                                            temperature=0, logprobs=1, stream=True, logit_bias=NO_EOS))
    by_index = {}
    for c in chunks:
        for choice in c.choices:
            by_index.setdefault(choice.index, []).append(choice)
    assert sorted(by_index) == [0, 1, 2, 3]
    for parts in by_index.values():
        tokens = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
        assert "".join(tokens) == "".join(p.text for p in parts) and len(tokens) == 4
        assert parts[-1].finish_reason == "length"


def test_user_and_unknown_fields_accepted(base_url):
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                                      "user": "user-1234", "frobnicate": True}, timeout=60)
    assert r.status_code == 200, r.text


def test_empty_prompt_starts_a_document(client):
    r = client.completions.create(model=MODEL, prompt="", max_tokens=4, temperature=0, logit_bias=NO_EOS)
    assert r.usage.prompt_tokens == 1 and r.usage.completion_tokens == 4


def test_prefix_cache_reports_cached_tokens(client):
    prompt = "A shared system preamble that many requests begin with. " * 8  # several full blocks
    first = client.completions.create(model=MODEL, prompt=prompt + "First question?", max_tokens=4,
                                      temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt + "Second question?", max_tokens=4,
                                       temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens % 16 == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 * ((len(prompt.split()) + 8) // 16) - 16 and cached > 0
    assert cached < second.usage.prompt_tokens
    again = client.completions.create(model=MODEL, prompt=prompt + "First question?", max_tokens=4,
                                      temperature=0)
    assert again.choices[0].text == first.choices[0].text  # cache hits change nothing
