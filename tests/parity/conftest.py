"""Shared fixtures for parity tests: the bundled GGUF, loaded once per module by each side; the
tiny checkpoints' tokenizer and prompts (tiny_models.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parity.tiny_models import prompt_ids, train_tokenizer
from textmill.loader import LoadedModel, load_model
from textmill.loader.bundled import bundled_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, torch.Tensor]:
    return prompt_ids(tokenizer)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="module")
def ours(gguf_path: Path) -> LoadedModel:
    return load_model(gguf_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model(gguf_path: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: Path):
    """transformers' own reading of the GGUF vocabulary, so parity does not lean on ours."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for the parity modules.

    These tests check numbers, not speed; on a busy machine with few cores, OpenMP threads
    that wait on each other made the 32-step greedy loops up to 20x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
