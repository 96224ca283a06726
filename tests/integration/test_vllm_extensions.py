"""vLLM's completion extensions, with vLLM's names and shapes, through the official openai
client (`extra_body=`) against the bundled model: return_token_ids, prompt_logprobs,
truncate_prompt_tokens, allowed_token_ids, bad_words, stream_options.continuous_usage_stats,
and the 400s for fields textmill knows but does not implement."""
from __future__ import annotations

import math

import openai
import pytest

from .conftest import MODEL

PROMPT = "The capital of France is"


def _extra(obj, name: str):
    return (obj.model_extra or {}).get(name)


def test_return_token_ids(client) -> None:
    ids = [504, 3575, 282, 4649, 314]  # a token prompt: its ids come back as they were sent
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=0,
                                  extra_body={"return_token_ids": True})
    [choice] = r.choices
    assert _extra(choice, "prompt_token_ids") == ids
    token_ids = _extra(choice, "token_ids")
    assert len(token_ids) == len(choice.logprobs.tokens) == r.usage.completion_tokens == 6
    # Without the field, neither appears.
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0).choices[0]
    assert _extra(plain, "token_ids") is None and _extra(plain, "prompt_token_ids") is None


def test_return_token_ids_streamed_equals_non_streamed(client) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"return_token_ids": True})
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    assert _extra(chunks[0].choices[0], "prompt_token_ids") == _extra(whole, "prompt_token_ids")
    assert all(_extra(c.choices[0], "prompt_token_ids") is None for c in chunks[1:])
    assert [t for c in chunks for t in _extra(c.choices[0], "token_ids")] == _extra(whole, "token_ids")


def test_continuous_usage_stats(client) -> None:
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    with_text = [c for c in chunks if c.choices]
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts) and counts[-1] == 5
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in with_text)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_prompt_logprobs_have_vllm_shape_and_exact_ranks(client) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 2, "return_token_ids": True})
    [choice] = r.choices
    entries = _extra(choice, "prompt_logprobs")
    prompt_ids = _extra(choice, "prompt_token_ids")
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token_id, entry in zip(prompt_ids[1:], entries[1:]):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        mine = entry[str(token_id)]
        assert mine["rank"] >= 1 and mine["logprob"] <= 0 and isinstance(mine["decoded_token"], str)
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        top = [e for e in ranked if e["rank"] <= 2]
        assert [e["rank"] for e in top] == [1, 2] and top[0]["logprob"] >= top[1]["logprob"]
        # A token outside the top 2 ranks below them, and its logprob says so.
        assert mine["rank"] <= 2 or mine["logprob"] <= top[-1]["logprob"]
    # echo with logprobs scores the same prompt positions with the same numbers.
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True,
                                     logprobs=2).choices[0]
    for entry, token_id, lp in zip(entries[1:], prompt_ids[1:], echo.logprobs.token_logprobs[1:]):
        assert math.isclose(entry[str(token_id)]["logprob"], lp, abs_tol=1e-6)


def test_truncate_prompt_tokens_keeps_the_last_tokens(client) -> None:
    ids = list(range(1000, 1040))
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True,
                                  extra_body={"truncate_prompt_tokens": 10, "return_token_ids": True})
    assert r.usage.prompt_tokens == 10
    assert _extra(r.choices[0], "prompt_token_ids") == ids[-10:]
    short = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                      extra_body={"truncate_prompt_tokens": -1})
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0)
    assert short.usage.prompt_tokens == full.usage.prompt_tokens


def test_allowed_token_ids_bound_every_token(client) -> None:
    allowed = [330, 331, 332, 333]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, n=2,
                                  extra_body={"allowed_token_ids": allowed, "return_token_ids": True})
    for choice in r.choices:
        ids = _extra(choice, "token_ids")
        assert ids and set(ids) <= set(allowed)


def test_bad_words_ban_the_word(client) -> None:
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                      extra_body={"return_token_ids": True}).choices[0]
    word = first.text.strip()
    assert word
    banned = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                       extra_body={"bad_words": [word], "return_token_ids": True}).choices[0]
    assert _extra(banned, "token_ids") != _extra(first, "token_ids")


@pytest.mark.parametrize("body, param", [
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ({"allowed_token_ids": [5], "guided_regex": "a+"}, "allowed_token_ids"),
    ({"bad_words": ["x"], "guided_regex": "a+"}, "bad_words"),
    ({"bad_words": [" "]}, "bad_words"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens"),
    ({"prompt_logprobs": 9}, "prompt_logprobs"),
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"mirostat": 2}, "mirostat"),
    ({"typical_p": 0.5}, "typical_p"),
])
def test_bad_extension_values_are_400s_naming_the_field(client, body, param) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body=body)
    assert err.value.body["param"] == param, err.value.body


def test_prompt_logprobs_with_stream_is_a_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream=True,
                                       extra_body={"prompt_logprobs": 1}))
    assert err.value.body["param"] == "prompt_logprobs"


def test_unsupported_fields_name_their_code(client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"use_beam_search": True})
    assert (err.value.body["param"], err.value.body["code"]) == ("use_beam_search", "unsupported_parameter")
