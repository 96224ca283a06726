"""api/prepare.py at the edge: token ids the model has no row for never reach the engine
(one such id would fail every request of the step it runs in), and the 400 says
"out of vocabulary", as vLLM does, since clients match on those words."""
from __future__ import annotations

import pytest

from textmill.api.errors import APIError
from textmill.api.prepare import Limits, prepare
from textmill.api.protocol import CompletionRequest

VOCAB = 50  # the model's rows; the tokenizer below knows more ids than that


class Tok:
    """A tokenizer whose vocabulary runs past the model's embedding (ids 50..59), with an
    end id past it too, as a GGUF or an HF generation_config can have."""

    bos_token_id = None
    add_bos = False
    fim = None
    eos_token_ids = frozenset({2, 55})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [57 if word == "<|extra|>" else 3 + len(word) for word in text.split()]

    def decode(self, ids) -> str:
        return " ".join("w" * i for i in ids)


def prepared(**body):
    req = CompletionRequest(**{"model": "m", "prompt": "hello there", "max_tokens": 4, **body})
    return prepare(req, Tok(), Limits(max_model_len=128, vocab_size=VOCAB))


def refused(**body) -> APIError:
    with pytest.raises(APIError) as exc:
        prepared(**body)
    assert exc.value.status == 400 and exc.value.type == "invalid_request_error"
    return exc.value


def test_end_ids_past_the_model_vocabulary_are_dropped_from_stop_token_ids():
    # min_tokens bans every stop id by index: 55 would fail the whole step.
    params = prepared(min_tokens=2).params[0]
    assert params.stop_token_ids == (2,) and params.min_tokens == 2
    assert prepared(min_tokens=2, stop_token_ids=[7]).params[0].stop_token_ids == (2, 7)
    assert prepared(ignore_eos=True, min_tokens=1, stop_token_ids=[7]).params[0].stop_token_ids == (7,)


@pytest.mark.parametrize("bad", [VOCAB, 55, 10**9, -1])
def test_client_stop_token_ids_outside_the_vocabulary_are_a_400(bad):
    error = refused(min_tokens=2, stop_token_ids=[1, bad])
    assert error.param == "stop_token_ids" and "out of vocabulary" in error.message


@pytest.mark.parametrize("body,param", [
    ({"prompt": [1, VOCAB]}, "prompt"),
    ({"prompt": [[1], [2, -1]]}, "prompt"),
    ({"prompt": "a <|extra|> b"}, "prompt"),  # the tokenizer's own id 57, past the model's rows
    ({"logit_bias": {str(VOCAB): 5}}, "logit_bias"),
])
def test_out_of_range_token_ids_say_out_of_vocabulary(body, param):
    error = refused(**body)
    assert error.param == param
    assert "out of vocabulary" in error.message and f"0..{VOCAB - 1}" in error.message


def test_ids_inside_the_vocabulary_pass():
    p = prepared(prompt=[0, VOCAB - 1], logit_bias={str(VOCAB - 1): 1}, stop_token_ids=[VOCAB - 1])
    assert p.prompts[0].token_ids == (0, VOCAB - 1)
    assert p.params[0].logit_bias == ((VOCAB - 1, 1.0),) and VOCAB - 1 in p.params[0].stop_token_ids


def test_sampling_params_refuse_negative_stop_token_ids():
    # For callers of the engine that bypass the API (the generate command, tests).
    from textmill.sampling_params import InvalidParam, SamplingParams

    with pytest.raises(InvalidParam) as exc:
        SamplingParams(stop_token_ids=(2, -1))
    assert exc.value.param == "stop_token_ids"
