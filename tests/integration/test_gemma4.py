"""A tiny Gemma 4 (written as llama.cpp's converter writes one, Q8_0; tests/parity/tiny_gemma4.py)
served end to end on the default plan: the file's blocks on the kernel forward
(runner/gemma4_forward.py), the real app and engine, through the official openai client.

What Gemma 4 adds to the path: per-layer KV pools with the shared layers reading their source's,
and those layers run only for the rows a step reads. A prompt longer than the 8-token window,
prefilled in chunks, must score its own continuation exactly as generation gave it (echo), with
guessed tokens on, and two servers' seeded draws must agree.
"""
from __future__ import annotations

import openai
import pytest

from tests.parity.tiny_gemma4 import round_to_file, tiny_gemma4_hf, write_gemma4_gguf
from tests.parity.tiny_models import train_tokenizer
from textmill.config import EngineConfig, ServerConfig

from .server import free_port, running_server

pytest.importorskip("transformers")

NAME = "tiny-gemma4"
PROMPT = "the cat sat on the mat and the dog sat on the log while the bird sang in the tree"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    hf = tiny_gemma4_hf(ple_size=32)
    round_to_file(hf)
    path = write_gemma4_gguf(tmp_path_factory.mktemp("g4") / "tiny-gemma4.gguf", hf, train_tokenizer(), q8_0=True)
    options = EngineConfig(model=str(path)).updated(max_model_len=256, memory_gib=0.05, max_num_batched_tokens=8)
    with running_server(options, ServerConfig(port=free_port(), served_model_name=NAME)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_it(client) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]


def test_echo_scores_a_continuation_as_generation_gave_it(client) -> None:
    """Greedy tokens and their log-probs, then the prompt and those tokens scored in one request
    (chunks of 8 through the shared layers' kept rows): the same numbers, bit for bit."""
    gen = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
                                    extra_body={"return_token_ids": True})
    [choice] = gen.choices
    ids = choice.model_extra["prompt_token_ids"] + choice.model_extra["token_ids"]
    assert choice.finish_reason == "length" and len(ids) > 8 + 12  # past the window, in chunks of 8
    scored = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    tail = scored.choices[0].logprobs.token_logprobs[-len(choice.logprobs.token_logprobs):]
    assert tail == choice.logprobs.token_logprobs


def test_seeded_samples_repeat_and_streams_match(client) -> None:
    kwargs = dict(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=11)
    first = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert first == streamed and first


def test_a_prompt_past_the_window_is_refused_with_the_limit(client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=" ".join([PROMPT] * 40), max_tokens=4)
    assert "256" in str(err.value)
