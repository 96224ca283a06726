"""With no --served-model-name, the server names the model after the file it serves (a
file's stem, a folder's name), not after the bundled model."""
from __future__ import annotations

from pathlib import Path

import openai
import pytest

from textmill.config import ServerConfig
from textmill.loader.bundled import BUNDLED_NAME, bundled_model_path

from .server import TEST_OPTIONS, running_server


def test_another_file_is_served_under_its_own_name(tmp_path: Path):
    other = tmp_path / "my-model.Q4_1.gguf"
    other.symlink_to(bundled_model_path())
    with running_server(TEST_OPTIONS.updated(model=str(other)), ServerConfig()) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["my-model.Q4_1"]
        done = client.completions.create(model="my-model.Q4_1", prompt="Hi", max_tokens=2, temperature=0)
        assert done.model == "my-model.Q4_1" and done.usage.completion_tokens == 2
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=BUNDLED_NAME, prompt="Hi", max_tokens=2)
