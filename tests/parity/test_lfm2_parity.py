"""LFM2 against transformers on a tiny random-weight model written as llama.cpp's converter writes
its GGUF files (tiny_lfm2.py): short convolutions of 3 taps carried across forwards beside Llama's
attention with per-head q/k norms. Float32 and Q8_0 (the source rounded to the file first): prompt
log-probabilities within 1e-3 and the same 32 greedy tokens, ours one token a forward through the
convolutions' states as a server decodes. A convolution read the other way round (taps reversed)
is far off.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, hf_greedy, max_logprob_diff, our_greedy
from tests.parity.one_sequence import OneSequence
from tests.parity.tiny_lfm2 import round_to_file, tiny_lfm2_hf, write_lfm2_gguf
from textmill.loader import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for name, q8_0 in (("f32", False), ("q8_0", True)):
        hf = tiny_lfm2_hf()
        if q8_0:
            round_to_file(hf)
        path = tmp_path_factory.mktemp(f"lfm2-{name}") / f"tiny-lfm2-{name}.gguf"
        out[name] = hf, write_lfm2_gguf(path, hf, tokenizer, q8_0=q8_0)
    return out


def _far(model, hf, prompts) -> float:
    return max(max_logprob_diff(model, hf, ids) for ids in prompts.values())


@pytest.mark.parametrize("variant", ("f32", "q8_0"))
def test_prompt_logprobs_and_greedy_tokens_match_transformers(variant, files, prompts) -> None:
    hf, path = files[variant]
    ours = OneSequence(load_model(path).model)
    assert _far(ours, hf, prompts) < LOGPROB_TOLERANCE
    for ids in prompts.values():
        assert our_greedy(ours, ids) == hf_greedy(hf, ids)


def test_config_read_from_the_file(files) -> None:
    config = load_model(files["f32"][1]).config
    assert (config.architecture, config.recurrent_layers, config.short_conv) == ("lfm2", (0, 1, 3, 4), 3)
    assert (config.num_kv_heads, config.intermediate_size, config.qk_norm) == (2, 128, True)


def test_taps_reversed_are_far_off(files, prompts) -> None:
    hf, path = files["f32"]
    model = load_model(path).model
    with torch.no_grad():
        for layer in model.layers:
            if layer.recurrent:
                layer.conv.conv_weight.copy_(layer.conv.conv_weight.flip(-1))
    assert _far(OneSequence(model), hf, prompts) > 100 * LOGPROB_TOLERANCE
