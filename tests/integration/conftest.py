from __future__ import annotations

import openai
import pytest

from textmill.loader.bundled import BUNDLED_NAME

from .server import running_server

MODEL = BUNDLED_NAME


@pytest.fixture(scope="session")
def base_url():
    with running_server() as url:
        yield url


@pytest.fixture(scope="session")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def async_client(base_url):
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
