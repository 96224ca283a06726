"""Files in types nothing here can download, served end to end: the bundled SmolLM2's weights
rewritten by bench/requant_gguf.py in IQ4_XS, and in Q3_K (each with IQ4_NL where a row is
not a whole number of 256-value super-blocks, as llama.cpp does), served with the default
plan through the real app and the official openai client: IQ4 on the kernels' IQ4 form (the
file's 4-bit indices), Q3_K on the 3-bit form (the file's codes and 16-value scales).

The prompt's logprobs through the server are compared with the same file run densely in
float32 in this process: they differ by the kernels' int8 activations, the float16 KV cache
and (Q3_K, IQ4_XS) the sub-block scales rounded to halves, as on any other quantized file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest
import torch
from gguf import GGMLQuantizationType as T

from textmill.config import EngineConfig, ServerConfig
from textmill.loader.bundled import bundled_model_path

from .server import free_port, running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from requant_gguf import write_requant  # noqa: E402

pytestmark = pytest.mark.slow  # writes a ~90 MB file, then serves it
TEXT = ("The lighthouse keeper logged every ship that passed the rocks. In the winter of that year "
        "the storms came early, and the keeper wrote that the sea had never been so loud.")
# type -> the kernel form of the 30 ffn_down matmuls (K = 1536, whole super-blocks): the
# other three matmuls of each layer (K = 576) are IQ4_NL on the iq4 form in both files
DOWN_FORM = {T.IQ4_XS: "iq4", T.Q3_K: "q3"}


@pytest.fixture(scope="module", params=[T.IQ4_XS, T.Q3_K], ids=lambda t: t.name)
def path(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("requant") / f"SmolLM2-135M-Instruct.{request.param.name}.gguf"
    counts = write_requant(bundled_model_path(), path, request.param)
    assert counts[request.param.name] == 30 and counts["IQ4_NL"] == 180  # ffn_down (K = 1536) and the rest
    return path


@pytest.fixture(scope="module")
def served(path):
    options = EngineConfig(model=str(path)).updated(max_model_len=1024, memory_gib=0.1)  # the default plan
    server = ServerConfig(port=free_port(), served_model_name=path.stem)
    with running_server(options, server) as url:
        yield path.stem, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_runs_on_the_files_own_codes(served, path) -> None:
    from textmill.runner.qlinear import QLinear
    from textmill.wiring import build_engine

    name, client = served
    assert [m.id for m in client.models.list().data] == [name]
    built = build_engine(EngineConfig(model=str(path)).updated(max_model_len=256, memory_gib=0.02))
    modes = [m.mode for m in built.engine._runner.model.modules() if isinstance(m, QLinear)]
    # qkv, o and gate_up of each of the 30 layers on the IQ4_NL indices, down on its own
    # type's form, the tied Q8_0 head on 8-bit codes
    expected = {"iq4": 90, "q8": 1}
    down = DOWN_FORM[T[path.stem.rsplit(".", 1)[1]]]
    expected[down] = expected.get(down, 0) + 30
    assert {m: modes.count(m) for m in set(modes)} == expected, modes


def test_answers(served) -> None:
    name, client = served
    r = client.completions.create(model=name, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text, r.choices[0].text


def test_prompt_logprobs_track_the_dense_float_model(served, path) -> None:
    from tests.parity.compare import our_logits, prompt_logprobs
    from textmill.loader import load_model
    from textmill.tokenizer import load_gguf_tokenizer

    name, client = served
    ids = load_gguf_tokenizer(path).encode(TEXT)
    r = client.completions.create(model=name, prompt=ids, max_tokens=0, echo=True, logprobs=0)
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
