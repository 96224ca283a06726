"""Structured outputs end to end: the real bundled model behind the real app, through the
official openai client (`extra_body=`), as a user of vLLM or llama.cpp would send them."""
from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest

from textmill.config import ServerConfig
from textmill.loader.bundled import BUNDLED_NAME as MODEL
from textmill.structured import StructuredOutput

from .ops_server import wait_for
from .server import TEST_OPTIONS, serving

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -5, "maximum": 5},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["city"], "additionalProperties": False},
        "quote": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "kind", "home"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]
GBNF = 'root ::= "[" num ("," num)* "]"\nnum ::= [1-9] [0-9]?'
GBNF_RE = r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]"


class Capture:
    """wrap_runner: keeps the ModelRunner so tests can see its sampler's matchers."""

    def __init__(self):
        self.runner = None

    def __call__(self, runner):
        self.runner = runner
        return runner

    @property
    def matchers(self) -> int:
        return len(self.runner.sampler.grammar_masks)


@pytest.fixture(scope="module")
def server():
    capture = Capture()
    with serving(ServerConfig(), TEST_OPTIONS, wrap_runner=capture) as running:
        running.capture = capture
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _complete(client, constraint: dict, **kw):
    kw.setdefault("max_tokens", 96)
    return client.completions.create(model=MODEL, extra_body=constraint, **kw)


def _matcher_accepts_prefix(server, structured: StructuredOutput, text: str) -> bool:
    """Whether `text` is a prefix of some text the grammar accepts (llguidance works on bytes:
    any tokenization of a valid prefix is consumed whole)."""
    ctx = server.app.state.serving
    ids = ctx.tokenizer.encode(text, add_special_tokens=False)
    return ctx.grammars.new_matcher(structured).try_consume_tokens(ids) == len(ids)


# ------------------------------------------------------------------ validity
def test_json_schema_outputs_parse_and_validate_at_temperature_1(client) -> None:
    finished = 0
    for seed, prompt in enumerate(["A pet record as JSON:\n", "Customer data:\n"]):
        r = _complete(client, {"structured_outputs": {"json": SCHEMA}}, prompt=prompt, n=16, seed=seed,
                      temperature=1.0, max_tokens=100)
        for choice in r.choices:
            if choice.finish_reason == "stop":
                jsonschema.validate(json.loads(choice.text), SCHEMA)
                finished += 1
    assert finished >= 16, finished  # most samples finish well inside max_tokens


def test_regex_choice_and_gbnf_outputs_match(client) -> None:
    r = _complete(client, {"structured_outputs": {"regex": PHONE}}, prompt="Call me at", n=4, seed=1)
    assert all(re.fullmatch(PHONE, c.text) and c.finish_reason == "stop" for c in r.choices), r.choices
    r = _complete(client, {"structured_outputs": {"choice": CHOICES}}, prompt="Review: great film! Sentiment:",
                  n=6, seed=2)
    assert all(c.text in CHOICES and c.finish_reason == "stop" for c in r.choices), r.choices
    r = _complete(client, {"grammar": GBNF}, prompt="Some numbers:", n=4, seed=3, max_tokens=60)
    stopped = [c.text for c in r.choices if c.finish_reason == "stop"]
    assert stopped and all(re.fullmatch(GBNF_RE, t) for t in stopped), r.choices


@pytest.mark.parametrize("constraint", [
    {"response_format": {"type": "json_object"}},
    {"structured_outputs": {"json_object": True}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}},
    {"json_schema": SCHEMA},
    {"guided_json": SCHEMA},
], ids=["response_format-json_object", "json_object", "response_format-json_schema", "llama.cpp", "guided_json"])
def test_every_json_field_gives_a_json_object(client, constraint) -> None:
    r = _complete(client, constraint, prompt="Data:", n=2, seed=4, temperature=0.7, max_tokens=100)
    stopped = [c.text for c in r.choices if c.finish_reason == "stop"]
    assert stopped, r.choices
    for text in stopped:
        assert isinstance(json.loads(text), dict)
        if "schema" in json.dumps(constraint) or "guided_json" in constraint or "json_schema" in constraint:
            jsonschema.validate(json.loads(text), SCHEMA)


def test_the_legacy_guided_fields_are_honoured(client) -> None:
    r = _complete(client, {"guided_regex": "[a-z]{3}-[0-9]{2}"}, prompt="Code:", seed=5)
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", r.choices[0].text)
    r = _complete(client, {"guided_choice": ["alpha", "beta"]}, prompt="Pick:", seed=5)
    assert r.choices[0].text in ("alpha", "beta")
    r = _complete(client, {"guided_grammar": GBNF}, prompt="Numbers:", seed=5, max_tokens=60)
    assert r.choices[0].finish_reason != "stop" or re.fullmatch(GBNF_RE, r.choices[0].text)


# ------------------------------------------------------------------ with the other fields
def test_constrained_n_and_seed_reproduce(client) -> None:
    kw = dict(prompt="A pet:", n=3, seed=77, temperature=1.0, max_tokens=80)
    first = _complete(client, {"structured_outputs": {"json": SCHEMA}}, **kw)
    second = _complete(client, {"structured_outputs": {"json": SCHEMA}}, **kw)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # siblings draw their own samples


def test_constrained_stream_equals_the_non_streamed_completion(client) -> None:
    kw = dict(prompt="A pet:", seed=8, temperature=1.0, max_tokens=80)
    whole = _complete(client, {"structured_outputs": {"json": SCHEMA}}, **kw).choices[0]
    chunks = list(_complete(client, {"structured_outputs": {"json": SCHEMA}}, stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(chunks) > 3 and text == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_a_length_finish_is_a_valid_prefix(server, client) -> None:
    r = _complete(client, {"structured_outputs": {"json": SCHEMA}}, prompt="A pet:", n=4, seed=9, max_tokens=7)
    structured = StructuredOutput("json", json.dumps(SCHEMA))
    for choice in r.choices:
        assert choice.finish_reason == "length"
        assert _matcher_accepts_prefix(server, structured, choice.text), choice.text


def test_stop_cuts_a_constrained_text_to_a_valid_prefix(server, client) -> None:
    r = _complete(client, {"structured_outputs": {"json": SCHEMA}}, prompt="A pet:", seed=10, stop=['"age"'])
    [choice] = r.choices
    assert choice.finish_reason == "stop" and '"age"' not in choice.text
    assert _matcher_accepts_prefix(server, StructuredOutput("json", json.dumps(SCHEMA)), choice.text)


def test_echo_and_logprobs_with_a_constraint(client) -> None:
    r = _complete(client, {"structured_outputs": {"choice": CHOICES}}, prompt="Sentiment:", echo=True,
                  logprobs=2, temperature=0)
    [choice] = r.choices
    assert choice.text.startswith("Sentiment:") and choice.text[len("Sentiment:"):] in CHOICES
    # Raw model logprobs (before the mask): the top alternatives need not be allowed tokens.
    generated = choice.logprobs.token_logprobs[-1]
    assert generated is not None and generated <= 0.0


def test_matchers_are_released_after_finish_and_abort(server, client) -> None:
    _complete(client, {"structured_outputs": {"regex": PHONE}}, prompt="Phone:", n=3)
    stream = _complete(client, {"structured_outputs": {"json": {"type": "array", "items": {"type": "integer"}}}},
                       prompt="Numbers:", stream=True, max_tokens=1500, logit_bias={"2": -100, "0": -100})
    next(iter(stream))  # running, with a matcher
    assert server.capture.matchers >= 1
    stream.close()  # the client goes: the engine aborts the request
    assert wait_for(lambda: server.capture.matchers == 0, timeout=60), server.capture.matchers


def test_metrics_count_constrained_requests_and_compiles(server, client) -> None:
    def value(name: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return float(re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M).group(1))

    before = (value("textmill:structured_output_requests_total"), value("textmill:grammar_compiles_total"))
    unique = {"structured_outputs": {"regex": "metrics-[0-9]{4}"}}
    _complete(client, unique, prompt="x", max_tokens=8)
    _complete(client, unique, prompt="y", max_tokens=8)
    after = (value("textmill:structured_output_requests_total"), value("textmill:grammar_compiles_total"))
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)
    assert value("textmill:grammar_compile_seconds_total") > 0


# ------------------------------------------------------------------ startup
def test_the_vocabulary_is_built_by_the_first_constrained_request_not_at_startup() -> None:
    """llguidance builds its view of the vocabulary holding the GIL (0.17 s for SmolLM2's 49k
    tokens, 1.2 s for Gemma 3's 262k): while it does, the server answers nothing. A server
    whose clients never constrain a request must never pay for it."""
    with serving(ServerConfig(), TEST_OPTIONS) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300)
        grammars = running.app.state.serving.grammars
        assert _complete(client, {}, prompt="Hello", max_tokens=4).choices[0].finish_reason == "length"
        assert not grammars.vocabulary_built
        r = _complete(client, {"structured_outputs": {"choice": CHOICES}}, prompt="Sentiment:", seed=5)
        assert r.choices[0].text in CHOICES
        assert grammars.vocabulary_built


# ------------------------------------------------------------------ 400s
@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"json": {"type": "no-such-type"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": "{oops"}}, "structured_outputs.json"),
    ({"structured_outputs": {"grammar": "root ::= undefined-rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"json_schema": SCHEMA, "grammar": GBNF}, "grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"guided_regex": "a+", "ignore_eos": True}, "ignore_eos"),
    ({"structured_outputs": {"json": {"type": "string", "description": "x" * 300_000}}}, "structured_outputs.json"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"n_probs": 2}, "n_probs"),
    ({"prompt_embeds": "AAAA"}, "prompt_embeds"),
])
def test_bad_constraints_are_400s_naming_the_field(client, body, param) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, body, prompt="x", max_tokens=4)
    assert err.value.body["param"] == param, err.value.body
    # The server keeps serving.
    assert _complete(client, {}, prompt="ok", max_tokens=2).choices[0].finish_reason == "length"


# ------------------------------------------------------------------ preemption
def test_preempted_constrained_requests_stay_valid() -> None:
    """A KV pool of ~17 blocks for six 100-token JSON streams: requests are preempted and
    recomputed mid-output; their matchers stay where their tokens are."""
    capture = Capture()
    tiny = TEST_OPTIONS.updated(max_model_len=256, memory_gib=0.0125)
    with serving(ServerConfig(), tiny, wrap_runner=capture) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300)
        results, errors = [], []

        def one(seed: int) -> None:
            try:
                results.append(_complete(client, {"structured_outputs": {"json": SCHEMA}}, prompt="A pet record:",
                                         seed=seed, temperature=1.0, max_tokens=100).choices[0])
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert running.app.state.serving.engine.stats().num_preemptions_total > 0
        for choice in results:
            if choice.finish_reason == "stop":
                jsonschema.validate(json.loads(choice.text), SCHEMA)
            else:
                assert _matcher_accepts_prefix(running, StructuredOutput("json", json.dumps(SCHEMA)), choice.text)
        assert wait_for(lambda: capture.matchers == 0, timeout=30)
