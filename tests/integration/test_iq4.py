"""An IQ4_XS file served end to end: the bundled SmolLM2's weights rewritten in IQ4_XS (and
IQ4_NL where a row is not a whole number of 256-value super-blocks, as llama.cpp does) by
bench/iq4_gguf.py, served with the default plan (the file's 4-bit indices on the IQ4
kernels) through the real app and the official openai client.

The prompt's logprobs through the server are compared with the same file run densely in
float32 in this process: they differ by the kernels' int8 activations and the float16 KV
cache alone, as on any other quantized file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest
import torch

from textmill.config import EngineConfig, ServerConfig
from textmill.loader.bundled import bundled_model_path

from .server import free_port, running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from iq4_gguf import write_iq4  # noqa: E402

pytestmark = pytest.mark.slow  # writes a 90 MB file, then serves it
NAME = "smollm2-iq4xs"
TEXT = ("The lighthouse keeper logged every ship that passed the rocks. In the winter of that year "
        "the storms came early, and the keeper wrote that the sea had never been so loud.")


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("iq4") / "SmolLM2-135M-Instruct.IQ4_XS.gguf"
    counts = write_iq4(bundled_model_path(), path)
    assert counts["IQ4_XS"] == 30 and counts["IQ4_NL"] == 180  # ffn_down (K = 1536) and the rest (K = 576)
    return path


@pytest.fixture(scope="module")
def served(path):
    options = EngineConfig(model=str(path)).updated(max_model_len=1024, memory_gib=0.1)  # the default plan
    server = ServerConfig(port=free_port(), served_model_name=NAME)
    with running_server(options, server) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_runs_on_the_iq4_kernels(served, path) -> None:
    from textmill.runner.qlinear import QLinear
    from textmill.wiring import build_engine

    url, client = served
    assert [m.id for m in client.models.list().data] == [NAME]
    built = build_engine(EngineConfig(model=str(path)).updated(max_model_len=256, memory_gib=0.02))
    modes = [m.mode for m in built.engine._runner.model.modules() if isinstance(m, QLinear)]
    # the four matmuls of each of the 30 layers on the file's indices; the tied Q8_0 head on 8-bit codes
    assert modes.count("iq4") == 120 and modes.count("q8") == 1, modes


def test_answers(served) -> None:
    _, client = served
    r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text, r.choices[0].text


def test_prompt_logprobs_track_the_dense_float_model(served, path) -> None:
    from tests.parity.compare import our_logits, prompt_logprobs
    from textmill.loader import load_model
    from textmill.tokenizer import load_gguf_tokenizer

    _, client = served
    ids = load_gguf_tokenizer(path).encode(TEXT)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    got = torch.tensor(r.choices[0].logprobs.token_logprobs[1:], dtype=torch.float64)
    model = load_model(path, dtype=torch.float32).model
    with torch.no_grad():
        ids_t = torch.tensor(ids)
        expected = prompt_logprobs(our_logits(model, ids_t), ids_t)
    diff = (got - expected).abs()
    assert expected.std() > 1.0  # real text: logprobs spread over several nats
    print(f"mean |logprob diff| {diff.mean():.4f}, max {diff.max():.3f}")
    assert diff.mean() < 0.08, f"mean |logprob diff| {diff.mean():.3f}"
    assert torch.corrcoef(torch.stack([got, expected]))[0, 1] > 0.995
