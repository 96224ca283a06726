"""A black-box conformance suite for POST /v1/completions, written from the OpenAI spec
(../shared/spec/completions.openapi.yaml) and issue 4, run through the official openai
client and, where the client hides the wire (SSE framing, exact keys, nulls), raw httpx.

It knows nothing of textmill's internals. The one outside aid is the model's vocabulary,
read straight from the GGUF file, to turn the token texts the API returns into the ids
that token prompts and logit_bias need.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest

from textmill.loader.bundled import bundled_model_path

from .conftest import MODEL

NO_EOS = {"2": -100}  # SmolLM2's <|im_end|> banned: generation runs to max_tokens
PARIS = "The capital of France is"
PARIS_IDS = [504, 3575, 282, 4649, 314]
TRANSFORMER = "In machine learning, a transformer is"  # ten distinct greedy tokens
COLOURS = "The three primary colours are"
EARLY_EOS = "My favourite colour is"  # greedy ends with EOS after two tokens
ERROR_KEYS = {"message", "type", "param", "code"}
CONTEXT = 2048  # the test server's window


# ------------------------------------------------------------------ helpers
@dataclass(frozen=True)
class Vocab:
    texts: tuple[str | None, ...]  # id -> text (None for byte fragments)
    ids: dict[str, int]  # text -> id

    def id(self, text: str) -> int:
        return self.ids[text]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each visible char stands for one byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


@pytest.fixture(scope="session")
def vocab() -> Vocab:
    import gguf

    reader = gguf.GGUFReader(bundled_model_path())
    tokens, kinds = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    decoder = _byte_decoder()
    texts: list[str | None] = []
    for i, kind in zip(tokens.data, kinds.data):
        raw = bytes(tokens.parts[i]).decode()
        if int(kinds.parts[kind][0]) == 3:  # control tokens are their own text
            texts.append(raw)
            continue
        try:
            texts.append(bytes(decoder[c] for c in raw).decode("utf-8"))
        except (KeyError, UnicodeDecodeError):
            texts.append(None)
    ids: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text is not None:
            ids.setdefault(text, i)
    return Vocab(tuple(texts), ids)


def post(base_url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json={"model": MODEL, **body}, timeout=300)


def ok(base_url: str, body: dict) -> dict:
    r = post(base_url, body)
    assert r.status_code == 200, r.text
    return r.json()


def bad(base_url: str, body: dict, param: str) -> dict:
    r = post(base_url, body)
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS, error
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], error
    return error


def sse(base_url: str, body: dict) -> list[dict]:
    """The raw event stream: every event is `data: <json>\\n\\n`, the last `data: [DONE]\\n\\n`."""
    r = post(base_url, {**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n"), r.text[-200:]
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1]), events
    return [json.loads(e[len("data: "):]) for e in events[:-2]]


def by_index(chunks: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            out.setdefault(choice["index"], []).append(choice)
    return out


def joined(parts: list[dict]) -> str:
    return "".join(p["text"] for p in parts)


def greedy(client, prompt, max_tokens: int, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def bad_client(client, param: str, **kw) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, **{"prompt": "Hi", "max_tokens": 2, **kw})
    assert exc.value.status_code == 400 and exc.value.body["param"] == param, exc.value.body


def offsets_from(tokens: list[str], start: int) -> list[int]:
    out, pos = [], start
    for t in tokens:
        out.append(pos)
        pos += len(t)
    return out


def mean(values) -> float:
    return sum(values) / len(values)


# ------------------------------------------------------------------ prompt
def test_four_prompt_forms_agree(client, vocab):
    assert "".join(vocab.texts[i] for i in PARIS_IDS) == PARIS
    forms = [PARIS, [PARIS], PARIS_IDS, [PARIS_IDS]]
    texts = [greedy(client, f, 6, logit_bias=NO_EOS).choices[0].text for f in forms]
    assert len(set(texts)) == 1 and texts[0]


def test_mixed_lengths_index_is_prompt_times_n_plus_i(client):
    prompts = ["Hi", COLOURS + " " + TRANSFORMER + " " + PARIS, "1, 2, 3,"]
    alone = [greedy(client, p, 4, logit_bias=NO_EOS).choices[0].text for p in prompts]
    r = greedy(client, prompts, 4, n=2, logit_bias=NO_EOS)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        assert c.text == alone[c.index // 2] and c.finish_reason == "length"
    tok = greedy(client, [[504], PARIS_IDS, PARIS_IDS[:3]], 3, n=2, logit_bias=NO_EOS)
    assert [c.index for c in tok.choices] == list(range(6))
    assert tok.choices[2].text == tok.choices[3].text == greedy(client, PARIS_IDS, 3, logit_bias=NO_EOS).choices[0].text


def test_token_prompts_are_used_as_given(client, vocab):
    # A split that the tokenizer would never produce, and an explicit <|im_start|>
    # (SmolLM2's BOS): both must reach the model untouched, with nothing added.
    ids = [vocab.id("T"), vocab.id("he"), vocab.id(" capital")]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].logprobs.tokens == ["T", "he", " capital"] and r.choices[0].text == "The capital"
    assert r.usage.prompt_tokens == 3
    r = client.completions.create(model=MODEL, prompt=[1, 504], max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].logprobs.tokens == ["<|im_start|>", "The"] and r.usage.prompt_tokens == 2
    r = client.completions.create(model=MODEL, prompt=[504], max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].logprobs.tokens == ["The"] and r.usage.prompt_tokens == 1


@pytest.mark.parametrize("prompt", [
    [49152], [-1], [504, 10**12], [[504], [49152]], [[504], []], [], [[]], [504, "x"], [[504], "x"], 5,
    {"text": "Hi"}, [1.5], [True], [["a"]], [None],
])
def test_bad_prompts_are_400_naming_prompt(base_url, prompt):
    bad(base_url, {"prompt": prompt, "max_tokens": 1}, "prompt")


# ------------------------------------------------------------------ echo
def test_echo_non_stream_and_stream(client, base_url):
    prompts = ["Roses are red,", PARIS]
    plain = [greedy(client, p, 4, logit_bias=NO_EOS).choices[0].text for p in prompts]
    r = greedy(client, prompts, 4, echo=True, n=2, logit_bias=NO_EOS)
    assert [c.text for c in r.choices] == [prompts[0] + plain[0]] * 2 + [prompts[1] + plain[1]] * 2
    assert r.usage.completion_tokens == 16  # the echoed prompt is not a completion token
    parts = by_index(sse(base_url, {"prompt": prompts, "max_tokens": 4, "temperature": 0, "echo": True,
                                    "n": 2, "logit_bias": NO_EOS}))
    assert {i: joined(p) for i, p in parts.items()} == {c.index: c.text for c in r.choices}
    for i, p in parts.items():  # the prompt comes first, whole
        assert p[0]["text"].startswith(prompts[i // 2])


def test_echo_with_max_tokens_zero_returns_the_prompt(client, base_url):
    for prompt, text in ((PARIS, PARIS), (PARIS_IDS, PARIS), ([PARIS_IDS[:2], PARIS_IDS], None)):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True)
        expected = [text] if text else ["The capital", PARIS]
        assert [c.text for c in r.choices] == expected
        assert r.usage.completion_tokens == 0 and all(c.finish_reason == "length" for c in r.choices)
    chunks = sse(base_url, {"prompt": PARIS, "max_tokens": 0, "echo": True})
    parts = by_index(chunks)
    assert joined(parts[0]) == PARIS and parts[0][-1]["finish_reason"] == "length"


def test_token_prompt_echo_is_the_decoded_text(client):
    r = greedy(client, [PARIS_IDS[:3], PARIS_IDS[3:]], 2, echo=True, logit_bias=NO_EOS)
    plain = greedy(client, [PARIS_IDS[:3], PARIS_IDS[3:]], 2, logit_bias=NO_EOS)
    assert r.choices[0].text == "The capital of" + plain.choices[0].text
    assert r.choices[1].text == " France is" + plain.choices[1].text


# ------------------------------------------------------------------ logprobs
@pytest.mark.parametrize("k", range(6))
def test_logprobs_k_legacy_object(base_url, k):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 100 + k,
            "logprobs": k, "logit_bias": NO_EOS}
    choice = ok(base_url, body)["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value is not None and value <= 0 and token in top
        assert math.isclose(top[token], value, abs_tol=1e-5)
        assert all(v <= 0 for v in top.values()) and sum(math.exp(v) for v in top.values()) <= 1 + 1e-4
        others = {t: v for t, v in top.items() if t != token}
        if k == 0:
            assert top == {token: value}
        # the k most likely tokens, plus the sampled one when it is not among them
        assert len(top) in (k, k + 1) if k else len(top) == 1
        if len(top) == k + 1 and k:
            assert value <= min(others.values()) + 1e-6


def test_greedy_token_is_the_top_alternative(client):
    lp = greedy(client, COLOURS, 8, logprobs=5, logit_bias=NO_EOS).choices[0].logprobs
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert max(top, key=top.get) == token and len(top) == 5


def test_text_offset_without_echo_starts_at_len_prompt(client):
    prompt = "Café au lait, s'il vous plaît. Le café est"  # characters, not bytes
    r = greedy(client, prompt, 6, logprobs=1, logit_bias=NO_EOS).choices[0]
    assert "".join(r.logprobs.tokens) == r.text
    assert r.logprobs.text_offset == offsets_from(r.logprobs.tokens, len(prompt))


def test_text_offset_with_echo_starts_at_zero(client):
    prompts = ["Roses are red,", "Café au lait, s'il vous plaît.", PARIS]
    r = greedy(client, prompts, 4, echo=True, logprobs=2, logit_bias=NO_EOS)
    t = greedy(client, PARIS_IDS, 4, echo=True, logprobs=2, logit_bias=NO_EOS)
    assert t.choices[0].logprobs.text_offset == r.choices[2].logprobs.text_offset
    for choice, prompt in zip([*r.choices, *t.choices], [*prompts, PARIS]):
        lp = choice.logprobs
        assert "".join(lp.tokens) == choice.text and choice.text.startswith(prompt)
        assert lp.text_offset == offsets_from(lp.tokens, 0)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
        assert all(t is not None and 1 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert len(r.choices[2].logprobs.tokens) == 5 + 4


def _close(a: list[float], b: list[float], tol: float = 1e-3) -> bool:
    return len(a) == len(b) and all(abs(x - y) < tol for x, y in zip(a, b))


def _same_tops(a, b, tol: float = 1e-3) -> bool:
    return all(set(x) == set(y) and all(abs(x[t] - y[t]) < tol for t in x) for x, y in zip(a, b))


def test_logprobs_ignore_logit_bias_penalties_temperature_top_p(client, vocab):
    base = greedy(client, TRANSFORMER, 8, logprobs=2).choices[0].logprobs
    assert len(set(base.tokens)) == 8  # distinct: positive penalties cannot change greedy here
    bias = {str(vocab.id(t)): 100 for t in base.tokens}
    variants = [
        dict(temperature=0, logit_bias=bias),
        dict(temperature=0, presence_penalty=2.0, frequency_penalty=2.0),
        dict(temperature=0.05, top_p=0.05, seed=1),
        dict(temperature=0, logit_bias=bias, presence_penalty=1.5, frequency_penalty=0.5),
    ]
    for kw in variants:
        lp = client.completions.create(model=MODEL, prompt=TRANSFORMER, max_tokens=8, logprobs=2,
                                       **kw).choices[0].logprobs
        assert lp.tokens == base.tokens, kw
        assert _close(lp.token_logprobs, base.token_logprobs), (kw, lp.token_logprobs, base.token_logprobs)
        assert _same_tops(lp.top_logprobs, base.top_logprobs), (kw, lp.top_logprobs)


def test_sampled_logprobs_equal_scoring_the_same_tokens(client, vocab):
    ctx = PARIS_IDS
    gen = client.completions.create(model=MODEL, prompt=ctx, max_tokens=8, temperature=1.6, top_p=0.97,
                                    seed=5, presence_penalty=0.7, logprobs=1, logit_bias=NO_EOS)
    lp = gen.choices[0].logprobs
    ids = [vocab.id(t) for t in lp.tokens]
    scored = client.completions.create(model=MODEL, prompt=ctx + ids, max_tokens=0, echo=True,
                                       logprobs=1).choices[0].logprobs
    assert scored.tokens[len(ctx):] == lp.tokens
    assert _close(scored.token_logprobs[len(ctx):], lp.token_logprobs)


def test_lm_eval_loglikelihood_request(base_url, client, vocab):
    """lm-evaluation-harness local-completions: the exact request; reads token_logprobs[ctxlen:-1]
    and compares each continuation token with max(top_logprobs) for is_greedy."""
    gen = greedy(client, PARIS_IDS, 3, logprobs=5).choices[0].logprobs
    cont = [vocab.id(t) for t in gen.tokens]
    london = [vocab.id(" London")]
    body = {"prompt": [PARIS_IDS + cont, PARIS_IDS + london], "max_tokens": 1, "echo": True, "logprobs": 1,
            "temperature": 0, "seed": 1234}
    out = ok(base_url, body)
    choices = sorted(out["choices"], key=lambda c: c["index"])
    ctxlen = len(PARIS_IDS)
    results = []
    for choice, continuation in zip(choices, (cont, london)):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == ctxlen + len(continuation) + 1
        logprobs = lp["token_logprobs"][ctxlen:-1]
        tops = lp["top_logprobs"][ctxlen:-1]
        is_greedy = all(max(top, key=top.get) == tok for tok, top in zip(lp["tokens"][ctxlen:-1], tops))
        results.append((sum(logprobs), is_greedy, logprobs))
    assert results[0][1] is True and results[1][1] is False
    assert _close(results[0][2], gen.token_logprobs)
    assert abs(results[1][0] - gen.top_logprobs[0][" London"]) < 1e-3


LONG_TEXT = (
    "The history of the city begins with a small fishing village on the northern bank of the river. "
    "Over the centuries it grew into a busy port, trading grain, wool and timber with merchants from "
    "across the sea. In the twelfth century a stone bridge was built, and the town walls followed soon "
    "after. The cathedral, begun in 1180, took more than two hundred years to finish; its tower is still "
    "the tallest building in the old town. During the industrial revolution, mills and warehouses lined "
    "the docks, and the population tripled within fifty years. Railways arrived in 1845, linking the port "
    "to the capital and to the coal fields in the west. Today the old warehouses hold museums, studios and "
    "restaurants, while the modern harbour lies further downstream. Visitors come for the markets, the "
    "festivals in late summer, and the long walk along the river to the ruined abbey, where the monks once "
    "kept bees and brewed a dark, bitter ale that the town still sells under the same name. "
    "The abbey itself was founded by a group of twelve monks who walked north from a larger house in "
    "1134. They drained the marshes, planted orchards and built a mill on a side stream; their records, "
    "kept in a careful hand for four centuries, are now among the most valuable documents in the county "
    "archive. When the abbey was dissolved, its lands were sold to a wool merchant whose family held them "
    "until the last heir died without children, leaving the estate to the town as a public park."
)


def test_prompt_logprobs_across_chunks_and_cache(client, vocab):
    """Echo scoring of a prompt longer than one prefill chunk: every position's logprob is the one
    that generating that token gave, cold or from the prefix cache."""
    cold = client.completions.create(model=MODEL, prompt=LONG_TEXT, max_tokens=0, echo=True, logprobs=0)
    lp = cold.choices[0].logprobs
    assert cold.choices[0].text == LONG_TEXT and len(lp.tokens) == cold.usage.prompt_tokens > 256
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    warm = client.completions.create(model=MODEL, prompt=LONG_TEXT, max_tokens=1, echo=True, logprobs=0)
    assert _close(warm.choices[0].logprobs.token_logprobs[1:len(lp.tokens)], lp.token_logprobs[1:])
    ids = [vocab.id(t) for t in lp.tokens]
    for j in (1, 17, 255, 256, 257, len(ids) - 1):
        forced = client.completions.create(model=MODEL, prompt=ids[:j], max_tokens=1, temperature=0, logprobs=0,
                                           logit_bias={str(ids[j]): 100}).choices[0].logprobs
        assert forced.tokens == [lp.tokens[j]]
        assert abs(forced.token_logprobs[0] - lp.token_logprobs[j]) < 1e-3, j


def test_lm_eval_batch_with_a_shared_context(base_url, vocab):
    """Multiple choice: one context, several continuations in one request (shared prefix)."""
    ctx_text = LONG_TEXT[:400]
    ctx = [vocab.id(t) for t in ok(base_url, {"prompt": ctx_text, "max_tokens": 0, "echo": True,
                                                 "logprobs": 0})["choices"][0]["logprobs"]["tokens"]]
    conts = [[vocab.id(w)] for w in (" the", " a", " river")] + [[vocab.id(" old"), vocab.id(" town")]]
    body = {"max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
    together = ok(base_url, {**body, "prompt": [ctx + c for c in conts]})["choices"]
    for choice, cont in zip(sorted(together, key=lambda c: c["index"]), conts):
        alone = ok(base_url, {**body, "prompt": [ctx + cont]})["choices"][0]["logprobs"]
        got = choice["logprobs"]["token_logprobs"][len(ctx):-1]
        assert len(got) == len(cont) and _close(got, alone["token_logprobs"][len(ctx):-1])


# ------------------------------------------------------------------ n and best_of
def test_n_128(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", n=128, max_tokens=1, temperature=1.0,
                                  seed=1, logit_bias=NO_EOS)
    assert [c.index for c in r.choices] == list(range(128))
    assert r.usage.completion_tokens == 128 and len({c.text for c in r.choices}) > 1


def test_best_of_returns_the_best_n_best_first(client):
    kw = dict(model=MODEL, prompt=["Once upon a time", "My dog"], max_tokens=4, temperature=1.0, seed=11,
              logprobs=0, logit_bias=NO_EOS)
    best = client.completions.create(n=2, best_of=3, **kw)
    assert [c.index for c in best.choices] == [0, 1, 2, 3]
    assert best.usage.completion_tokens == 2 * 3 * 4  # every candidate counts
    means = [mean(c.logprobs.token_logprobs) for c in best.choices]
    assert means[0] >= means[1] and means[2] >= means[3]
    # The same candidates, all returned: best_of picked the two highest means of each prompt.
    every = client.completions.create(n=3, best_of=3, **kw)
    for p in range(2):
        cands = sorted(every.choices[3 * p:3 * p + 3], key=lambda c: mean(c.logprobs.token_logprobs), reverse=True)
        assert [c.text for c in best.choices[2 * p:2 * p + 2]] == [c.text for c in cands[:2]]


def test_best_of_20_counts_every_candidate(client):
    r = client.completions.create(model=MODEL, prompt="Hi", n=1, best_of=20, max_tokens=2, temperature=1.0,
                                  seed=3, logit_bias=NO_EOS)
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.usage.completion_tokens == 40


def test_best_of_with_echo_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PARIS, best_of=3, max_tokens=3, temperature=1.0, seed=5,
                                  echo=True, logprobs=0, logit_bias=NO_EOS)
    [choice] = r.choices
    assert choice.text.startswith(PARIS) and choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == 5 + 3 and r.usage.completion_tokens == 9


def test_n_and_best_of_limits(base_url, client):
    bad(base_url, {"prompt": "Hi", "n": 2, "best_of": 1}, "best_of")
    bad(base_url, {"prompt": "Hi", "best_of": 21}, "best_of")
    bad(base_url, {"prompt": "Hi", "n": 129}, "n")
    bad(base_url, {"prompt": "Hi", "n": 0}, "n")
    bad(base_url, {"prompt": "Hi", "stream": True, "n": 1, "best_of": 2}, "best_of")
    bad_client(client, "best_of", n=3, best_of=2)
    chunks = sse(base_url, {"prompt": "Hi", "n": 2, "best_of": 2, "max_tokens": 2, "logit_bias": NO_EOS})
    assert sorted(by_index(chunks)) == [0, 1]


# ------------------------------------------------------------------ logit_bias
def test_logit_bias_bans_and_forces(client, vocab):
    paris = vocab.id(" Paris")
    assert greedy(client, PARIS, 1).choices[0].text == " Paris"
    assert greedy(client, PARIS, 1, logit_bias={str(paris): -100}).choices[0].text != " Paris"
    forced = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=3, temperature=1.0, seed=2,
                                       logit_bias={str(vocab.id(" London")): 100})
    assert forced.choices[0].text == " London" * 3


def test_logprobs_of_a_banned_token_stay_the_models(client, vocab):
    want = greedy(client, PARIS, 1, logprobs=5).choices[0].logprobs
    got = greedy(client, PARIS, 1, logprobs=5, logit_bias={str(vocab.id(" Paris")): -100}).choices[0].logprobs
    assert got.tokens[0] != " Paris" and abs(got.top_logprobs[0][" Paris"] - want.token_logprobs[0]) < 1e-3
    assert abs(got.token_logprobs[0] - want.top_logprobs[0][got.tokens[0]]) < 1e-3


def test_logit_bias_is_added_to_the_logits(client, vocab):
    top = greedy(client, PARIS, 1, logprobs=2).choices[0].logprobs.top_logprobs[0]
    (a, la), (b, lb) = sorted(top.items(), key=lambda kv: -kv[1])[:2]
    gap = la - lb  # first minus second: a bias on b above the gap flips the choice, below it does not
    low, high = math.floor(gap), math.ceil(gap)
    assert 0 < low and gap - low > 0.05 and high - gap > 0.05, gap
    first = lambda bias: greedy(client, PARIS, 1, logit_bias=bias).choices[0].text  # noqa: E731
    assert first({str(vocab.id(b)): high}) == b
    assert first({str(vocab.id(b)): low}) == a
    assert first({str(vocab.id(a)): -high}) == b
    assert first({str(vocab.id(a)): -low}) == a


@pytest.mark.parametrize("bias", [
    {"abc": 1}, {"-1": 1}, {"49152": 1}, {"1.5": 1}, {"": 1}, {"5": 101}, {"5": -101}, {"5": "x"},
    {"5": None}, [5], "x",
])
def test_bad_logit_bias_is_400(base_url, bias):
    bad(base_url, {"prompt": "Hi", "max_tokens": 1, "logit_bias": bias}, "logit_bias")


def test_logit_bias_bounds_accepted(base_url):
    ok(base_url, {"prompt": "Hi", "max_tokens": 1, "logit_bias": {"5": 100, "6": -100, "0": 0}})


# ------------------------------------------------------------------ penalties, temperature, top_p
def test_penalties_count_generated_tokens_only(client):
    prompt = "1 1 1 1 1 1 1 1"
    plain = greedy(client, prompt, 1).choices[0].text
    assert greedy(client, prompt, 1, presence_penalty=2, frequency_penalty=2).choices[0].text == plain


def test_penalties_follow_openai_formula(client):
    """logit[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c counting the tokens
    generated so far; replayed from the raw logprobs of the path actually taken."""
    f, p = 0.45, 0.35
    lp = greedy(client, "1 1 1 1 1 1 1 1", 14, frequency_penalty=f, presence_penalty=p,
                logprobs=5).choices[0].logprobs
    counts: Counter = Counter()
    checked = changed = 0
    for token, top in zip(lp.tokens, lp.top_logprobs):
        scores = {t: v - f * counts[t] - p * (counts[t] > 0) for t, v in top.items()}
        ranked = sorted(scores.values(), reverse=True)
        floor = sorted(top.values(), reverse=True)[4]  # no unlisted token is above the 5th best
        if ranked[0] - ranked[1] > 1e-3 and ranked[0] > floor:
            expected = max(scores, key=scores.get)
            assert token == expected, (lp.tokens, counts)
            checked += 1
            changed += expected != max(top, key=top.get)
        counts[token] += 1
    assert checked >= len(lp.tokens) - 2 and changed >= 1, (checked, changed, lp.tokens)


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", -2), ("presence_penalty", 2), ("frequency_penalty", -2), ("frequency_penalty", 2),
    ("temperature", 0), ("temperature", 2), ("top_p", 0), ("top_p", 1), ("top_p", 0.5), ("temperature", None),
    ("seed", -(2**63)), ("seed", 2**63 - 1), ("seed", 0),
])
def test_range_bounds_accepted(base_url, field, value):
    ok(base_url, {"prompt": "Hi", "max_tokens": 2, "seed": 1, field: value})


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", -2.01), ("presence_penalty", 2.01), ("frequency_penalty", -2.01),
    ("frequency_penalty", 2.01), ("temperature", -0.01), ("temperature", 2.01), ("top_p", -0.01),
    ("top_p", 1.01), ("temperature", "1"), ("top_p", True), ("seed", 2**63), ("seed", -(2**63) - 1),
])
def test_range_violations_are_400(base_url, field, value):
    bad(base_url, {"prompt": "Hi", "max_tokens": 2, field: value}, field)


def test_top_p_zero_and_temperature_zero_are_greedy(client):
    want = greedy(client, COLOURS, 10, logit_bias=NO_EOS).choices[0].text
    for kw in (dict(temperature=1.0, top_p=0.0, seed=9), dict(temperature=2.0, top_p=0.0, seed=8),
               dict(temperature=1e-6, seed=7), dict(temperature=1.0, top_p=1e-9, seed=6)):
        got = client.completions.create(model=MODEL, prompt=COLOURS, max_tokens=10, logit_bias=NO_EOS, **kw)
        assert got.choices[0].text == want, kw
    hot = client.completions.create(model=MODEL, prompt=COLOURS, max_tokens=10, logit_bias=NO_EOS,
                                    temperature=2.0, seed=8)
    assert hot.choices[0].text != want


def test_batched_requests_keep_their_own_params(client):
    """One vectorized sampling pass for the batch: bias, penalties and logprobs stay per request."""
    cases = [
        dict(prompt=PARIS, logit_bias=NO_EOS),
        dict(prompt=PARIS, logit_bias={**NO_EOS, "7042": -100}),
        dict(prompt="1 1 1 1 1 1 1 1", frequency_penalty=1.5, presence_penalty=0.5),
        dict(prompt="1 1 1 1 1 1 1 1", logit_bias=NO_EOS),
        dict(prompt=COLOURS, logprobs=3, echo=True, logit_bias=NO_EOS),
        dict(prompt=COLOURS, temperature=0.8, seed=77, top_p=0.9),
    ]

    def run(kw):
        kw = {"temperature": 0, **kw}
        r = client.completions.create(model=MODEL, max_tokens=8, **kw).choices[0]
        return r.text, r.logprobs.token_logprobs if r.logprobs else None

    alone = [run(kw) for kw in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(run, cases))
    for (text, lps), (text2, lps2), kw in zip(alone, together, cases):
        assert text2 == text, kw
        assert lps is None or _close(lps[1:], lps2[1:]), kw
    assert len({t for t, _ in alone[:2]}) == 2 and len({t for t, _ in alone[2:4]}) == 2


# ------------------------------------------------------------------ seed
def test_seed_reproducible_under_concurrent_load(client, base_url):
    kw = dict(model=MODEL, prompt="Once upon a time", n=2, max_tokens=10, temperature=1.0, top_p=0.9, seed=4242)
    alone = [c.text for c in client.completions.create(**kw).choices]
    assert alone[0] != alone[1]

    def noise(i: int) -> None:
        client.completions.create(model=MODEL, prompt=[PARIS, COLOURS][i % 2] * (i + 1), max_tokens=3 + 4 * i,
                                  n=1 + i % 3, temperature=1.0)

    def streamed() -> list[str]:
        body = {k: v for k, v in kw.items() if k != "model"}
        return [joined(p) for _, p in sorted(by_index(sse(base_url, body)).items())]

    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(noise, i) for i in range(4)]
        again = pool.submit(lambda: [c.text for c in client.completions.create(**kw).choices])
        stream = pool.submit(streamed)
        [f.result() for f in others]
    assert again.result() == alone and stream.result() == alone


@pytest.mark.slow
def test_seed_and_greedy_survive_preemption():
    """A server whose KV cache holds about 350 tokens, given four requests of about 100 tokens:
    some are preempted and recomputed, and each still gives the text it gives alone."""
    from .server import TEST_OPTIONS, alone_then_together, running_server

    options = TEST_OPTIONS.updated(max_model_len=256, memory_gib=0.016)
    cases = [dict(prompt=LONG_TEXT[i * 200:i * 200 + 200], max_tokens=40, logit_bias=NO_EOS,
                  **(dict(temperature=0) if i % 2 else dict(temperature=1.0, top_p=0.9, seed=i, n=1 + (i == 2))))
             for i in range(4)]
    with running_server(options) as url:
        alone, together, preemptions = alone_then_together(
            url, lambda kw: [c["text"] for c in sorted(ok(url, kw)["choices"], key=lambda c: c["index"])], cases)
    assert preemptions > 0 and together == alone


# ------------------------------------------------------------------ stop
@pytest.fixture(scope="module")
def colours(client):
    """The greedy continuation of COLOURS and its tokens."""
    r = greedy(client, COLOURS, 12, logprobs=0, logit_bias=NO_EOS).choices[0]
    return r.text, r.logprobs.tokens


def _stop_run(client, base_url, stop, max_tokens: int = 12):
    r = greedy(client, COLOURS, max_tokens, stop=stop, logit_bias=NO_EOS).choices[0]
    parts = by_index(sse(base_url, {"prompt": COLOURS, "max_tokens": max_tokens, "temperature": 0,
                                    "stop": stop, "logit_bias": NO_EOS}))[0]
    return r, parts


def test_stop_across_token_boundaries(client, base_url, colours):
    text, tokens = colours
    i = next(j for j in range(1, len(tokens) - 1) if len(tokens[j]) >= 4 and len(tokens[j + 1]) >= 4)
    stop = tokens[i][2:] + tokens[i + 1][:2]  # starts inside one token, ends inside the next
    cut = text[:text.index(stop)]
    r, parts = _stop_run(client, base_url, stop)
    assert r.text == cut and r.finish_reason == "stop"
    assert joined(parts) == cut and parts[-1]["finish_reason"] == "stop"
    # no chunk ever carried the start of the stop string
    assert all(not p["text"] or cut.startswith(joined(parts[:k + 1])) for k, p in enumerate(parts))


def test_stop_list_earliest_wins(client, base_url, colours):
    text, tokens = colours
    late, early = tokens[6].strip(), tokens[2].strip()
    assert text.index(early) < text.index(late)
    r, parts = _stop_run(client, base_url, [late, "zzzq", early])
    assert r.text == text[:text.index(early)] and r.finish_reason == "stop"
    assert joined(parts) == r.text
    r = greedy(client, COLOURS, 12, stop=late, logit_bias=NO_EOS).choices[0]  # a plain string
    assert r.text == text[:text.index(late)] and r.finish_reason == "stop"


def test_stream_releases_a_stop_prefix_that_never_completes(client, base_url, colours):
    text, tokens = colours
    stop = "".join(tokens[1:4]) + " zebra"  # matches three tokens, then diverges
    r, parts = _stop_run(client, base_url, stop)
    assert r.text == text and r.finish_reason == "length"
    assert joined(parts) == text and parts[-1]["finish_reason"] == "length"


def test_stop_completed_by_the_last_allowed_token_is_stop(client, base_url, colours):
    text, tokens = colours
    stop = tokens[3]  # completed by the 4th token, the last that max_tokens allows
    r, parts = _stop_run(client, base_url, stop, max_tokens=4)
    assert r.text == "".join(tokens[:3]) and r.finish_reason == "stop"
    assert joined(parts) == r.text and parts[-1]["finish_reason"] == "stop"


def test_held_back_text_is_released_at_the_end(client, base_url, colours):
    text, tokens = colours
    r, parts = _stop_run(client, base_url, tokens[3] + " zebra", max_tokens=4)  # length ends it mid-match
    assert r.text == "".join(tokens[:4]) and r.finish_reason == "length"
    assert joined(parts) == r.text and parts[-1]["finish_reason"] == "length"
    plain = greedy(client, EARLY_EOS, 16).choices[0]  # EOS ends it mid-match
    body = {"prompt": EARLY_EOS, "max_tokens": 16, "temperature": 0, "stop": plain.text[-1] + "zq"}
    r = ok(base_url, body)["choices"][0]
    parts = by_index(sse(base_url, body))[0]
    assert r["text"] == joined(parts) == plain.text and r["finish_reason"] == parts[-1]["finish_reason"] == "stop"


def test_stop_applies_to_the_completion_not_the_prompt(client):
    plain = greedy(client, "1, 2, 3,", 8, logit_bias=NO_EOS).choices[0].text
    assert "," in plain
    r = greedy(client, "1, 2, 3,", 8, stop=",", logit_bias=NO_EOS).choices[0]
    assert r.text == plain[:plain.index(",")] and r.finish_reason == "stop"
    e = greedy(client, "1, 2, 3,", 8, stop=",", echo=True, logit_bias=NO_EOS).choices[0]
    assert e.text == "1, 2, 3," + r.text


def test_eos_finishes_with_stop(client):
    r = greedy(client, EARLY_EOS, 16)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 16


@pytest.mark.parametrize("stop", ["", ["a", ""], ["a", "b", "c", "d", "e"], 5, [1], {"a": 1}])
def test_bad_stop_is_400(base_url, stop):
    bad(base_url, {"prompt": "Hi", "max_tokens": 1, "stop": stop}, "stop")


def test_four_stops_accepted(base_url):
    ok(base_url, {"prompt": "Hi", "max_tokens": 1, "stop": ["a", "b", "c", "d"]})


# ------------------------------------------------------------------ suffix
def test_suffix_is_400_for_a_model_without_fim(base_url, client):
    for prompt in ("def f(x):", PARIS_IDS):
        error = bad(base_url, {"prompt": prompt, "suffix": "return y", "max_tokens": 4}, "suffix")
        assert "suffix" in error["message"] and "support" in error["message"]
    bad_client(client, "suffix", suffix="end")


# ------------------------------------------------------------------ streaming wire format
def test_sse_framing_usage_ids_and_logprobs(base_url):
    prompts = ["Hi there", PARIS]
    body = {"prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0, "logprobs": 1,
            "logit_bias": NO_EOS, "stream_options": {"include_usage": True}}
    chunks = sse(base_url, body)
    *body_chunks, last = chunks
    head = {k: chunks[0][k] for k in ("id", "created", "model", "system_fingerprint")}
    assert head["model"] == MODEL and head["id"].startswith("cmpl-")
    for c in chunks:
        assert c["object"] == "text_completion" and {k: c[k] for k in head} == head
        assert "usage" in c
    assert all(c["usage"] is None and c["choices"] for c in body_chunks)
    assert last["choices"] == []
    non_stream = ok(base_url, {k: v for k, v in body.items() if k != "stream_options"})
    usage = last["usage"]
    assert head["system_fingerprint"] == non_stream["system_fingerprint"]
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == \
        {k: non_stream["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage["completion_tokens"] == 12 and usage["total_tokens"] == usage["prompt_tokens"] + 12
    parts = by_index(body_chunks)
    assert sorted(parts) == [0, 1, 2, 3]
    for index, choices in parts.items():
        assert all(set(c) == {"text", "index", "logprobs", "finish_reason"} for c in choices)
        assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
        assert choices[-1]["finish_reason"] == "length"
        tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
        offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
        assert "".join(tokens) == joined(choices) == non_stream["choices"][index]["text"]
        assert offsets == offsets_from(tokens, len(prompts[index // 2]))
        for c in choices:  # each chunk carries the logprobs of its own text
            assert "".join(c["logprobs"]["tokens"]) == c["text"]


def test_stream_without_include_usage_has_no_usage_chunk(base_url):
    chunks = sse(base_url, {"prompt": "Hi", "max_tokens": 3, "logit_bias": NO_EOS})
    assert all(c["choices"] and c.get("usage") is None for c in chunks)
    assert joined(by_index(chunks)[0]) and chunks[-1]["choices"][-1]["finish_reason"] == "length"


def test_stream_via_client_matches_non_stream(client):
    kw = dict(model=MODEL, prompt=TRANSFORMER, max_tokens=6, temperature=0, logit_bias=NO_EOS)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1


def test_stream_echo_logprobs_match_non_stream(base_url):
    body = {"prompt": ["Roses are red,", PARIS], "max_tokens": 4, "temperature": 0, "echo": True,
            "logprobs": 2, "logit_bias": NO_EOS, "stop": " zebra"}
    whole = sorted(ok(base_url, body)["choices"], key=lambda c: c["index"])
    parts = by_index(sse(base_url, body))
    for choice in whole:
        chunks = parts[choice["index"]]
        merged = {k: [v for c in chunks for v in c["logprobs"][k]] for k in choice["logprobs"]}
        assert joined(chunks) == choice["text"] and merged["tokens"] == choice["logprobs"]["tokens"]
        assert merged["text_offset"] == choice["logprobs"]["text_offset"]
        assert merged["token_logprobs"][0] is None and merged["top_logprobs"][0] is None
        assert _close(merged["token_logprobs"][1:], choice["logprobs"]["token_logprobs"][1:])


def test_stream_echo_with_a_stop_string(base_url):
    body = {"prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0, "echo": True, "stop": ",",
            "logit_bias": NO_EOS}
    whole = ok(base_url, body)["choices"][0]
    parts = by_index(sse(base_url, body))[0]
    assert whole["text"].startswith("1, 2, 3,") and whole["finish_reason"] == "stop"
    assert joined(parts) == whole["text"] and parts[-1]["finish_reason"] == "stop"


def test_stream_never_splits_a_character(base_url):
    body = {"prompt": "東京は日本の首都です。大阪は", "max_tokens": 12, "temperature": 0, "logit_bias": NO_EOS}
    whole = ok(base_url, body)["choices"][0]["text"]
    parts = by_index(sse(base_url, body))[0]
    # A character cut by max_tokens may end the text as U+FFFD; none may appear inside it.
    assert joined(parts) == whole and "\ufffd" not in whole[:-1]
    assert all("\ufffd" not in p["text"] for p in parts[:-1])
    assert any(ord(ch) > 0x3000 for ch in whole)


# ------------------------------------------------------------------ response shape, usage, models
def test_response_shape(base_url):
    before = time.time()
    a = ok(base_url, {"prompt": "Hi", "max_tokens": 2, "logit_bias": NO_EOS})
    b = ok(base_url, {"prompt": "Hi", "max_tokens": 2, "logit_bias": NO_EOS})
    for r in (a, b):
        assert {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"} <= set(r)
        assert set(r) <= {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
        assert re.fullmatch(r"cmpl-[A-Za-z0-9]{24,}", r["id"]) and r["object"] == "text_completion"
        assert isinstance(r["created"], int) and before - 5 <= r["created"] <= time.time() + 5
        assert r["model"] == MODEL and isinstance(r["system_fingerprint"], str) and r["system_fingerprint"]
        [choice] = r["choices"]
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
        assert choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
        usage = r["usage"]
        assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(usage)
        assert set(usage) <= {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
                              "completion_tokens_details"}
    assert a["id"] != b["id"] and a["system_fingerprint"] == b["system_fingerprint"]


def test_usage_arithmetic(client):
    prompts = ["Hi", PARIS, "Roses are red,"]
    sizes = [client.completions.create(model=MODEL, prompt=p, max_tokens=0).usage.prompt_tokens for p in prompts]
    assert sizes[1] == 5
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, echo=True,
                                  logit_bias=NO_EOS, temperature=0)
    assert r.usage.prompt_tokens == sum(sizes) and r.usage.completion_tokens == 3 * 2 * 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_prefix_cache_reported_in_cached_tokens(client):
    prompt = " ".join(f"item {i}," for i in range(40)) + " and finally"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 64 and 16 <= cached <= second.usage.prompt_tokens


def test_max_tokens_null_means_16(base_url):
    r = ok(base_url, {"prompt": "Hi", "max_tokens": None, "temperature": 0, "logit_bias": NO_EOS})
    assert r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "length"


def test_context_window_400_names_both_numbers(base_url):
    for prompt in ([17] * 2000, [[17] * 10, [17] * 2000]):
        error = bad(base_url, {"prompt": prompt, "max_tokens": 49}, "max_tokens")
        assert str(CONTEXT) in error["message"] and "2049" in error["message"]


def test_every_nullable_field_accepts_null(base_url):
    nullable = ["best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
                "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p"]
    r = ok(base_url, {"prompt": "Hi", **{k: None for k in nullable}, "logit_bias": None})
    [choice] = r["choices"]
    assert choice["logprobs"] is None and r["usage"]["completion_tokens"] <= 16
    r = ok(base_url, {"prompt": None, "max_tokens": 2})  # null: from the start of a new document
    assert r["usage"]["prompt_tokens"] >= 1


def test_empty_string_prompts_are_accepted(base_url):
    r = ok(base_url, {"prompt": ["", "Hi"], "max_tokens": 2, "logit_bias": NO_EOS})
    assert [c["index"] for c in r["choices"]] == [0, 1] and r["usage"]["completion_tokens"] == 4


@pytest.mark.slow
def test_system_fingerprint_changes_with_dtype(base_url):
    from .server import TEST_OPTIONS, running_server

    here = ok(base_url, {"prompt": "Hi", "max_tokens": 1})["system_fingerprint"]
    with running_server(TEST_OPTIONS.updated(dtype="bfloat16")) as other:
        there = ok(other, {"prompt": "Hi", "max_tokens": 1})["system_fingerprint"]
    assert there and there != here


@pytest.mark.timeout(120)  # the wait below has no clock of its own
def test_user_is_logged_and_unknown_fields_ignored_with_a_debug_line(client, caplog):
    # The test server runs in this process, so its log records reach caplog.
    caplog.set_level(logging.DEBUG)
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, user="user-1234",
                                  extra_body={"frobnicate": True, "nested": {"a": [1, 2]}, "x_vendor": None})
    assert r.choices[0].finish_reason in ("stop", "length")

    def logged_user() -> bool:  # in the message, or in the structured fields of the access record
        return any("user-1234" in rec.getMessage() or (getattr(rec, "access", None) or {}).get("user") == "user-1234"
                   for rec in caplog.records)

    while not logged_user():  # the access line is written once the response has ended
        time.sleep(0.05)
    assert any("frobnicate" in rec.getMessage() and rec.levelno == logging.DEBUG for rec in caplog.records)


def test_models_endpoint_shape(base_url, client):
    r = httpx.get(f"{base_url}/v1/models", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == MODEL and card["object"] == "model"
    assert isinstance(card["created"], int) and isinstance(card["owned_by"], str)
    assert [m.id for m in client.models.list()] == [MODEL]


def test_models_retrieve(client):
    # OpenAI's GET /v1/models/{model}: drop-in clients call client.models.retrieve(name).
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("patch,param", [
    ({"model": 5}, "model"), ({"n": 1.5}, "n"), ({"n": True}, "n"), ({"logprobs": True}, "logprobs"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": 6}, "logprobs"), ({"echo": 1}, "echo"),
    ({"stream": "yes"}, "stream"), ({"stream_options": 5}, "stream_options"), ({"seed": 1.5}, "seed"),
    ({"seed": "1"}, "seed"), ({"suffix": 5}, "suffix"), ({"user": 5}, "user"), ({"best_of": 1.5}, "best_of"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
    ({"presence_penalty": "a"}, "presence_penalty"),
    ({"frequency_penalty": [1]}, "frequency_penalty"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "temperature": 5}, "temperature"), ({"stream": True, "prompt": [49152]}, "prompt"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
])
def test_bad_values_are_400_never_422(base_url, patch, param):
    bad(base_url, {"prompt": "Hi", "max_tokens": 2, **patch}, param)


def test_client_sees_bad_request_error(client):
    bad_client(client, "temperature", temperature=3)
    bad_client(client, "logprobs", logprobs=6)
    bad_client(client, "stop", stop=["a", "b", "c", "d", "e"])
    bad_client(client, "prompt", prompt=[[]])


def test_still_serving_after_errors(client):
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=[99999999], max_tokens=2)
    r = greedy(client, PARIS, 2)
    assert r.choices[0].text == " Paris."


# ------------------------------------------------------------------ vLLM extras (issue 4, last bullet)
def test_vllm_top_k_and_min_p(client):
    want = greedy(client, COLOURS, 10, logit_bias=NO_EOS).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        got = client.completions.create(model=MODEL, prompt=COLOURS, max_tokens=10, temperature=1.5, seed=8,
                                        logit_bias=NO_EOS, extra_body=extra)
        assert got.choices[0].text == want, extra


def test_vllm_ignore_eos_min_tokens_stop_token_ids(client, vocab):
    r = client.completions.create(model=MODEL, prompt=EARLY_EOS, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model=MODEL, prompt=EARLY_EOS, max_tokens=8, temperature=0,
                                  extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens >= 5
    r = client.completions.create(model=MODEL, prompt=PARIS, max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [vocab.id(".")]})
    assert r.choices[0].text == " Paris" and r.choices[0].finish_reason == "stop"


def test_vllm_repetition_penalty(client):
    kw = dict(model=MODEL, prompt="1 1 1 1 1 1 1 1", max_tokens=12, temperature=0, logprobs=0)
    plain = client.completions.create(**kw).choices[0].logprobs.tokens
    penalized = client.completions.create(**kw, extra_body={"repetition_penalty": 1.8}).choices[0].logprobs.tokens
    assert penalized != plain


def test_vllm_tokenize_and_detokenize(base_url):
    r = post(base_url, {"prompt": PARIS}, path="/tokenize")
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == PARIS_IDS and r.json()["count"] == 5 and r.json()["max_model_len"] == CONTEXT
    r = post(base_url, {"tokens": PARIS_IDS}, path="/detokenize")
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == PARIS
