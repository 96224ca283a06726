"""Structured outputs below HTTP: the llguidance compiler and cache, the batched bitmask, the
sampler's matchers (on the bundled SmolLM2 vocabulary, random logits), and prepare()'s 400s."""
from __future__ import annotations

import json
import re

import llguidance
import pytest
import torch

from textmill.api.errors import APIError
from textmill.api.prepare import Limits, prepare
from textmill.api.protocol import CompletionRequest
from textmill.grammar.compiler import MAX_SPEC_CHARS, LLGuidanceCompiler
from textmill.loader.bundled import bundled_model_path
from textmill.runner.sampler import Sampler
from textmill.sampling_params import InvalidParam, SamplingParams
from textmill.structured import GrammarError, StructuredOutput
from textmill.tokenizer import Tokenizer, load_tokenizer

EOS = 2  # SmolLM2's <|im_end|>
END_IDS = (0, 2)  # its end ids: <|endoftext|>, <|im_end|>


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(bundled_model_path())


@pytest.fixture(scope="module")
def compiler(tokenizer) -> LLGuidanceCompiler:
    return LLGuidanceCompiler(tokenizer, tokenizer.vocab_size)


def regex(text: str) -> StructuredOutput:
    return StructuredOutput("regex", text)


# ------------------------------------------------------------------ compiler
@pytest.mark.parametrize("structured", [
    StructuredOutput("json", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})),
    regex(r"[a-c]{2,4}"),
    StructuredOutput("choice", json.dumps(["yes", "no"])),
    StructuredOutput("grammar", 'root ::= "x" [0-9]+'),
    StructuredOutput("grammar", 'start: "x" /[0-9]+/'),  # Lark
])
def test_compiles_each_kind(compiler, structured) -> None:
    compiler.compile(structured)
    assert not compiler.new_matcher(structured).is_error()


@pytest.mark.parametrize("structured, reason", [
    (regex("(a"), "unclosed group"),
    (StructuredOutput("json", '{"type": "foo"}'), "foo"),
    (StructuredOutput("grammar", "root ::= missing"), "missing"),
    (StructuredOutput("json", "x" * (MAX_SPEC_CHARS + 1)), "at most"),
])
def test_refuses_with_the_backend_reason(compiler, structured, reason) -> None:
    before = compiler.stats().failures
    with pytest.raises(GrammarError, match=reason):
        compiler.compile(structured)
    assert compiler.stats().failures == before + 1


def test_a_repeated_constraint_compiles_once(compiler) -> None:
    structured = regex(r"cache-me-[0-9]{3}")
    before = compiler.stats()
    compiler.compile(structured)
    compiler.compile(structured)
    compiler.new_matcher(structured)  # the runner's copy is neither a request nor a hit
    after = compiler.stats()
    assert (after.compiles - before.compiles, after.cache_hits - before.cache_hits,
            after.requests - before.requests) == (1, 1, 2)


# ------------------------------------------------------------------ masks
def test_unpacked_bitmask_is_llguidance_mask(tokenizer, compiler) -> None:
    sampler = Sampler(tokenizer.vocab_size, grammars=compiler)
    masks = sampler.grammar_masks
    matcher = compiler.new_matcher(regex(r"[0-9]+(\.[0-9]+)?"))
    raw = matcher.compute_bitmask()  # bytes, token t is bit t % 8 of byte t // 8
    expected = torch.tensor([(raw[t // 8] >> (t % 8)) & 1 for t in range(tokenizer.vocab_size)], dtype=torch.bool)
    bitmask = torch.frombuffer(bytearray(raw), dtype=torch.int32)[None]
    allowed = masks.unpack(bitmask)[0]
    assert torch.equal(allowed, expected)
    assert 0 < int(allowed.sum()) < tokenizer.vocab_size // 10
    assert all(re.fullmatch(r"[0-9.]+", tokenizer.decode([t])) for t in allowed.nonzero()[:, 0].tolist())


def _run(sampler: Sampler, tokenizer: Tokenizer, ids: list[str], steps: int, seed: int = 0) -> dict[str, list[int]]:
    """Sample `steps` tokens for each request from random logits, stopping a row at EOS."""
    gen = torch.Generator().manual_seed(seed)
    out = {r: [] for r in ids}
    live = list(ids)
    for _ in range(steps):
        if not live:
            break
        logits = torch.randn((len(live), tokenizer.vocab_size), generator=gen) * 3
        tokens = sampler.sample(logits, live).token_ids.tolist()
        for r, t in zip(live, tokens):
            out[r].append(t)
        live = [r for r, t in zip(live, tokens) if t not in END_IDS]
    return out


@pytest.mark.parametrize("params", [
    dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.9, top_p=0.9, top_k=40),
    dict(temperature=1.0, presence_penalty=1.5, frequency_penalty=1.0, logit_bias=((EOS, -50.0), (15, 100.0))),
], ids=["greedy", "t1", "top-p-k", "penalties-bias"])
def test_sampled_text_follows_the_grammar_and_ends_on_eos(tokenizer, compiler, params) -> None:
    structured = regex(r"(ab|cd){2,3}!")
    sampler = Sampler(tokenizer.vocab_size, grammars=compiler)
    ids = [f"r{i}" for i in range(4)]
    for i, r in enumerate(ids):
        sampler.add_request(r, SamplingParams(max_tokens=40, seed=i, stop_token_ids=END_IDS, structured=structured,
                                              **params))
    out = _run(sampler, tokenizer, ids, 40)
    for r in ids:
        assert out[r][-1] in END_IDS, out[r]
        assert re.fullmatch(r"(ab|cd){2,3}!", tokenizer.decode(out[r][:-1])), tokenizer.decode(out[r])


def test_a_failed_matcher_can_only_end_its_sequence(tokenizer, compiler) -> None:
    """A matcher in error (a llguidance limit hit mid-output) gets EOS alone: its sequence
    ends, and the step, with every other stream in it, goes on."""
    sampler = Sampler(tokenizer.vocab_size, grammars=compiler)
    sampler.add_request("broken", SamplingParams(temperature=0.0, structured=regex("[0-9]+")))
    sampler.add_request("fine", SamplingParams(temperature=0.0, structured=regex("[0-9]+")))
    sampler.grammar_masks._matchers["broken"].consume_token(tokenizer.encode("x", add_special_tokens=False)[0])
    tokens = sampler.sample(torch.zeros((2, tokenizer.vocab_size)), ["broken", "fine"]).token_ids.tolist()
    assert tokens[0] in END_IDS
    assert tokenizer.decode([tokens[1]]).isdigit()


def test_unconstrained_rows_are_untouched_beside_constrained_ones(tokenizer, compiler) -> None:
    sampler = Sampler(tokenizer.vocab_size, grammars=compiler)
    sampler.add_request("free", SamplingParams(temperature=0.0))
    sampler.add_request("tied", SamplingParams(temperature=0.0, structured=regex("z+")))
    logits = torch.randn((2, tokenizer.vocab_size), generator=torch.Generator().manual_seed(3))
    tokens = sampler.sample(logits.clone(), ["free", "tied"]).token_ids.tolist()
    assert tokens[0] == int(logits[0].argmax())
    assert set(tokenizer.decode([tokens[1]])) == {"z"}


def test_seeded_constrained_rows_reproduce(tokenizer, compiler) -> None:
    structured = StructuredOutput("json", json.dumps({"type": "object", "properties": {
        "k": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer"}}, "required": ["k", "n"]}))
    runs = []
    for _ in range(2):
        sampler = Sampler(tokenizer.vocab_size, grammars=compiler)
        for i in range(3):
            sampler.add_request(f"s{i}", SamplingParams(temperature=1.0, seed=100 + i, structured=structured))
        runs.append(_run(sampler, tokenizer, ["s0", "s1", "s2"], 30, seed=5))
    assert runs[0] == runs[1]


def test_matchers_are_released_with_their_requests(tokenizer, compiler) -> None:
    sampler = Sampler(tokenizer.vocab_size, grammars=compiler)
    for i in range(3):
        sampler.add_request(f"m{i}", SamplingParams(structured=regex("[xy]+")))
    sampler.add_request("plain", SamplingParams())
    assert len(sampler.grammar_masks) == 3
    for i in range(3):
        sampler.remove_request(f"m{i}")
    assert len(sampler.grammar_masks) == 0


def test_a_sampler_without_a_compiler_refuses_constrained_requests(tokenizer) -> None:
    with pytest.raises(ValueError, match="grammar compiler"):
        Sampler(tokenizer.vocab_size).add_request("r", SamplingParams(structured=regex("a")))


def test_min_tokens_and_a_constraint_are_refused() -> None:
    with pytest.raises(InvalidParam) as err:
        SamplingParams(max_tokens=5, min_tokens=2, structured=regex("a+"))
    assert err.value.param == "min_tokens"


# ------------------------------------------------------------------ prepare: the fields and their 400s
def _prepare(tokenizer, compiler, **fields):
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "max_tokens": 8, **fields})
    return prepare(req, tokenizer, Limits(2048, tokenizer.vocab_size), compiler)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("fields, kind", [
    (dict(structured_outputs={"json": SCHEMA}), "json"),
    (dict(structured_outputs={"json": json.dumps(SCHEMA)}), "json"),
    (dict(structured_outputs={"regex": "a+"}), "regex"),
    (dict(structured_outputs={"choice": ["a", "b"]}), "choice"),
    (dict(structured_outputs={"grammar": 'root ::= "a"'}), "grammar"),
    (dict(structured_outputs={"json_object": True}), "json"),
    (dict(response_format={"type": "json_object"}), "json"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}),
     "json"),
    (dict(json_schema=SCHEMA), "json"),
    (dict(grammar='root ::= "a"'), "grammar"),
    (dict(guided_json=SCHEMA), "json"),
    (dict(guided_regex="a+"), "regex"),
    (dict(guided_choice=["a"]), "choice"),
    (dict(guided_grammar='root ::= "a"'), "grammar"),
])
def test_every_constraint_field_reaches_the_sampling_params(tokenizer, compiler, fields, kind) -> None:
    prepared = _prepare(tokenizer, compiler, n=2, **fields)
    assert {p.structured.kind for p in prepared.params} == {kind}


def test_response_format_text_is_no_constraint(tokenizer, compiler) -> None:
    assert _prepare(tokenizer, compiler, response_format={"type": "text"}).params[0].structured is None


@pytest.mark.parametrize("fields, param, code", [
    (dict(structured_outputs={"regex": "a", "choice": ["a"]}), "structured_outputs.choice", None),
    (dict(json_schema=SCHEMA, grammar='root ::= "a"'), "grammar", None),
    (dict(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex", None),
    (dict(structured_outputs={}), "structured_outputs", None),
    (dict(structured_outputs={"structural_tag": "{}"}), "structured_outputs.structural_tag", "unsupported_parameter"),
    (dict(structured_outputs={"regex": "(a"}), "structured_outputs.regex", None),
    (dict(structured_outputs={"json": "{not json"}), "structured_outputs.json", None),
    (dict(structured_outputs={"json": "[1]"}), "structured_outputs.json", None),
    (dict(structured_outputs={"choice": []}), "structured_outputs.choice", None),
    (dict(guided_grammar="root ::= nowhere"), "guided_grammar", None),
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "nope"}}}), "json_schema", None),
    (dict(response_format={"type": "json_schema"}), "response_format", None),
    (dict(response_format={"type": "structural_tag"}), "response_format", "unsupported_parameter"),
    (dict(guided_regex="a+", ignore_eos=True), "ignore_eos", None),
    (dict(guided_regex="a+", min_tokens=2), "min_tokens", None),
    (dict(prompt_embeds="AAAA"), "prompt_embeds", "unsupported_parameter"),
    (dict(use_beam_search=True), "use_beam_search", "unsupported_parameter"),
    (dict(n_probs=3), "n_probs", "unsupported_parameter"),
    (dict(mirostat=2), "mirostat", "unsupported_parameter"),
    (dict(lora=[{"id": 0, "scale": 1.0}]), "lora", "unsupported_parameter"),
])
def test_bad_constraints_and_unsupported_fields_are_400s_naming_the_field(tokenizer, compiler, fields, param,
                                                                          code) -> None:
    with pytest.raises(APIError) as err:
        _prepare(tokenizer, compiler, **fields)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code), err.value.message


def test_unsupported_fields_at_their_off_value_pass(tokenizer, compiler) -> None:
    prepared = _prepare(tokenizer, compiler, use_beam_search=False, n_probs=0, length_penalty=1.0,
                        include_stop_str_in_output=False, guided_decoding_backend="xgrammar")
    assert prepared.params[0].structured is None


def test_without_a_compiler_a_constraint_is_unsupported(tokenizer) -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "guided_regex": "a"})
    with pytest.raises(APIError) as err:
        prepare(req, tokenizer, Limits(2048, tokenizer.vocab_size), None)
    assert (err.value.param, err.value.code) == ("guided_regex", "unsupported_parameter")


def test_llguidance_accepts_any_tokenization_of_a_valid_prefix(tokenizer, compiler) -> None:
    """What the integration tests rely on to check a `length` finish's text is a valid prefix."""
    m = compiler.new_matcher(StructuredOutput("json", json.dumps(SCHEMA)))
    ids = tokenizer.encode('{"a": 12', add_special_tokens=False)
    assert m.try_consume_tokens(ids) == len(ids)
    bad = compiler.new_matcher(StructuredOutput("json", json.dumps(SCHEMA)))
    ids = tokenizer.encode('{"a": "x', add_special_tokens=False)  # a string where an integer goes
    assert bad.try_consume_tokens(ids) < len(ids)
    assert isinstance(m, llguidance.LLMatcher)
