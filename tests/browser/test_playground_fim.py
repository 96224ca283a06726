"""The suffix box, on a model whose vocabulary has fill-in-the-middle tokens: a tiny random
Qwen2 with a FIM tokenizer (tests/parity/tiny_models.py), built in a second."""
from __future__ import annotations

import httpx
import pytest

from tests.integration.server import running_server
from tests.parity.tiny_models import EOS, FIM, save_folder, tiny_hf_model, train_tokenizer
from textmill.config import EngineConfig, ServerConfig

from .playground import choice_texts, compose, load, run

NAME = "tiny-fim"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    folder = save_folder(tiny_hf_model("qwen2"), train_tokenizer(specials=(EOS, *FIM)),
                         tmp_path_factory.mktemp("fim") / NAME)
    options = EngineConfig(model=str(folder)).updated(dtype="float32", max_model_len=256, memory_gib=0.01)
    with running_server(options, ServerConfig(served_model_name=NAME)) as url:
        yield url


def test_a_fim_model_gets_a_suffix_box_and_the_suffix_is_sent(tab, base_url):
    page = tab.page
    load(page, base_url)
    assert httpx.get(f"{base_url}/v1/models").json()["data"][0]["supports_suffix"] is True
    assert page.is_visible("#suffix")
    prompt, suffix = "def calc(a, b):\n    return ", "  # the sum\n"
    compose(page, prompt, max_tokens=6, temperature=0, logprobs=1)
    page.fill("#suffix", suffix)
    assert run(page) == "done"
    api = httpx.post(f"{base_url}/v1/completions", json={"model": NAME, "prompt": prompt, "suffix": suffix,
                                                          "max_tokens": 6, "temperature": 0}).json()
    without = httpx.post(f"{base_url}/v1/completions", json={"model": NAME, "prompt": prompt,
                                                              "max_tokens": 6, "temperature": 0}).json()
    assert choice_texts(page) == [api["choices"][0]["text"]]
    assert api["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]  # the suffix was part of it
    page.click("#copy-curl")
    assert '"suffix": "  # the sum\\n"' in page.text_content("#snippet")
    assert tab.console.errors == []
