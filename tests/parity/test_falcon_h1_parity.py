"""Falcon-H1 against transformers on a tiny random-weight model written as llama.cpp's converter writes
its GGUF files (tiny_falcon_h1.py): attention with RoPE beside a Mamba-2 mixer in every layer, the muP
multipliers in the weights, the mixers with and without their gated norm. Float32 (a Q8_0 file holds
each weight times its multiplier rounded, which no rounding of the source matches: the runner's and the
server's tests take that file): prompt log-probabilities within 1e-3 and the same 32 greedy tokens, ours
one token a forward through the states and the KV cache as a server decodes.
"""
from __future__ import annotations

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, assert_matches, farthest_logprob_diff
from tests.parity.one_sequence import OneSequence
from tests.parity.tiny_falcon_h1 import tiny_falcon_h1_hf, write_falcon_h1_gguf
from textmill.loader import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory):
    out = {}
    for name in ("plain", "rms-norm"):
        hf = tiny_falcon_h1_hf(rms_norm=name == "rms-norm")
        path = tmp_path_factory.mktemp(f"falcon-{name}") / f"tiny-falcon-h1-{name}.gguf"
        out[name] = hf, write_falcon_h1_gguf(path, hf, tokenizer)
    return out


@pytest.mark.parametrize("variant", ["plain", "rms-norm"])
def test_prompt_logprobs_and_greedy_tokens_match_transformers(variant, files, prompts) -> None:
    hf, path = files[variant]
    assert_matches(OneSequence(load_model(path).model), hf, prompts)


def test_config_read_from_the_file(files) -> None:
    c = load_model(files["plain"][1]).config
    assert (c.architecture, c.recurrent_layers, c.parallel_mixers, c.no_rope_layers) == (
        "falcon_h1", (0, 1, 2), True, ())
    assert all(c.has_kv(i) for i in range(3)) and not c.linear_attention.gated_norm
    assert load_model(files["rms-norm"][1]).config.linear_attention.gated_norm


def test_without_either_mixer_it_is_far_off(files, prompts) -> None:
    """Each layer needs both: the attention's output or the mixer's left out is far off."""
    hf, path = files["plain"]
    for part in ("self_attn", "mamba"):
        model = load_model(path).model
        with torch.no_grad():
            for layer in model.layers:
                (layer.mamba.out_proj if part == "mamba" else layer.self_attn.o_proj).weight.zero_()
        assert farthest_logprob_diff(OneSequence(model), hf, prompts) > 20 * LOGPROB_TOLERANCE
