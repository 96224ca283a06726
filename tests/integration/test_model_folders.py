"""Hugging Face folders served end to end: tiny random-weight models of each family, and a
tiny fill-in-the-middle model trained here, through the real app and the openai client.

Served greedy text (paged KV cache, prefill chunked into pieces shorter than the sliding
window) must equal transformers' greedy decode of the same folder.
"""
from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from tests.parity.compare import hf_greedy
from tests.parity.tiny_models import (EOS, FIM, PROMPTS, phi3_longrope_model, save_folder, tiny_hf_model,
                                     train_tokenizer)
from textmill.config import EngineConfig, ServerConfig
from textmill.tokenizer import load_hf_tokenizer

from .server import free_port, running_server

transformers = pytest.importorskip("transformers")

# Chunks of 6 tokens (< the window of 8) and 16-token blocks: windows span chunks and blocks.
TINY_OPTIONS = dict(dtype="float32", max_model_len=256, memory_gib=0.01, max_num_batched_tokens=6)


def serve(folder: Path, name: str):
    options = EngineConfig(model=str(folder)).updated(**TINY_OPTIONS)
    return running_server(options, ServerConfig(port=free_port(), served_model_name=name))


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("family", ["mistral", "phi3", "gemma2", "gemma3", "qwen2", "gpt2"])
def test_served_greedy_equals_transformers(family: str, tmp_path: Path) -> None:
    tokenizer = train_tokenizer()
    hf = tiny_hf_model(family)
    folder = save_folder(hf, tokenizer, tmp_path / family)
    ours = load_hf_tokenizer(folder)
    eos = tokenizer.token_to_id(EOS)
    with serve(folder, family) as url:
        client = client_for(url)
        assert [m.id for m in client.models.list().data] == [family]
        for text in PROMPTS.values():
            ids = ours.encode(text)
            expected = hf_greedy(hf, torch.tensor(ids))
            stopped = eos in expected
            expected = expected[:expected.index(eos)] if stopped else expected
            r = client.completions.create(model=family, prompt=text, max_tokens=32, temperature=0)
            [choice] = r.choices
            assert r.usage.prompt_tokens == len(ids)
            assert choice.text == ours.decode(expected), f"{family}: {text!r}"
            assert choice.finish_reason == ("stop" if stopped else "length")


def test_served_longrope_takes_the_factors_of_its_window(tmp_path: Path) -> None:
    """A LongRoPE Phi-3 (original context 8) served with its whole window takes the long
    factors, as transformers does past 8 tokens; served with an 8-token window, the short
    ones, as transformers does within 8: the server sizes its window before it loads."""
    tokenizer = train_tokenizer()
    hf = phi3_longrope_model(original=8)
    folder = save_folder(hf, tokenizer, tmp_path / "phi3")
    ours = load_hf_tokenizer(folder)
    long_ids = ours.encode(PROMPTS["prose"])
    short_ids = long_ids[:4]
    for window, ids, steps in ((256, long_ids, 16), (8, short_ids, 4)):
        options = EngineConfig(model=str(folder)).updated(**(TINY_OPTIONS | {"max_model_len": window}))
        expected = hf_greedy(hf, torch.tensor(ids), steps=steps)
        with running_server(options, ServerConfig(port=free_port(), served_model_name="phi3")) as url:
            r = client_for(url).completions.create(model="phi3", prompt=ids, max_tokens=steps, temperature=0,
                                                   extra_body={"ignore_eos": True})
        assert r.choices[0].text == ours.decode(expected), window


# --- fill-in-the-middle ------------------------------------------------------------------

PREFIX = "def calc(a, b):\n    return "
EXAMPLES = {"  # the sum\n": "a + b", "  # the product\n": "a * b", "  # the difference\n": "a - b"}


def fim_sequence(tok, suffix: str, middle: str) -> list[int]:
    """Prefix-suffix-middle order, each piece encoded alone, as the API builds FIM prompts."""
    pre, suf, mid = (tok.token_to_id(t) for t in FIM)
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    return [pre, *enc(PREFIX), suf, *enc(suffix), mid, *enc(middle), tok.token_to_id(EOS)]


def train_fim_model(tok, steps: int = 200):
    """A tiny Qwen2 that learns the middle of each example from its suffix (same prefix)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=tok.token_to_id(EOS))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    data = [fim_sequence(tok, s, m) for s, m in EXAMPLES.items()]
    width = max(map(len, data))
    mid = tok.token_to_id(FIM[2])
    x = torch.tensor([d + [0] * (width - len(d)) for d in data])
    # Loss on the middle (and its EOS) only: the rest is random text to the model.
    labels = torch.tensor([[t if i > d.index(mid) else -100 for i, t in enumerate(d)]
                           + [-100] * (width - len(d)) for d in data])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(x, labels=labels)
        predicted, target = out.logits[:, :-1].argmax(-1), labels[:, 1:]
        if (predicted == target)[target != -100].all() and out.loss.item() < 0.3:
            return model.eval()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    raise AssertionError(f"the FIM model did not learn its examples (loss {out.loss.item():.3f})")


@pytest.mark.slow  # training takes ~10 s on a busy 2-core machine
def test_suffix_fills_in_the_middle(tmp_path: Path) -> None:
    tok = train_tokenizer(specials=(EOS, *FIM))
    folder = save_folder(train_fim_model(tok), tok, tmp_path / "fim")
    fim = load_hf_tokenizer(folder).fim
    assert fim is not None and fim.prefix == tok.token_to_id("<fim_prefix>")
    with serve(folder, "tiny-fim") as url:
        client = client_for(url)
        for suffix, middle in EXAMPLES.items():
            r = client.completions.create(model="tiny-fim", prompt=PREFIX, suffix=suffix,
                                          max_tokens=12, temperature=0)
            assert (r.choices[0].text, r.choices[0].finish_reason) == (middle, "stop")
        streamed = client.completions.create(model="tiny-fim", prompt=PREFIX, suffix="  # the sum\n",
                                             max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == "a + b"


def test_folder_name_with_dots_names_the_model(tmp_path: Path) -> None:
    from textmill.wiring import build_engine

    folder = save_folder(tiny_hf_model("qwen2"), train_tokenizer(), tmp_path / "Tiny-0.5B-Instruct")
    built = build_engine(EngineConfig(model=str(folder)).updated(**TINY_OPTIONS))
    assert built.model_name == "Tiny-0.5B-Instruct"
    assert built.model_config.architecture == "qwen2"
