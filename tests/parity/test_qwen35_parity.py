"""Qwen3.5 (dense text) against transformers on a tiny random-weight model written as llama.cpp's
converter writes its GGUF files (tiny_qwen35.py): gated delta nets with twice as many value heads
as key heads (the file's tiled order), a causal convolution carried across forwards, full
attention with a gate per head and a quarter of each head turned. Float32 and Q8_0 (the source
rounded to the file first): prompt log-probabilities within 1e-3 and the same 32 greedy tokens,
ours one token a forward through the recurrent states as a server decodes.

Qwen3.5 MoE ("qwen35moe") the same, its MLPs a mixture of eight experts (two a token) and a
gated shared expert; Qwen3-Next ("qwen3next") that mixture with its own delta nets' layout (value
heads grouped, beta's and alpha's rows in one tensor).

The tests that change one thing show that each of the converter's transformations is read: the
model with that piece done the other way is far off.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, hf_greedy, max_logprob_diff, our_greedy
from tests.parity.one_sequence import OneSequence
from tests.parity.tiny_qwen35 import round_to_file, tiny_qwen35_hf, write_qwen35_gguf
from textmill.loader import load_model
from textmill.models.moe import route
from textmill.models.qwen35 import Qwen35ForCausalLM

transformers = pytest.importorskip("transformers")

FAR = 100 * LOGPROB_TOLERANCE
VARIANTS = ("f32", "q8_0", "moe-f32", "moe-q8_0", "next-f32", "next-q8_0")


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for name in VARIANTS:
        hf = tiny_qwen35_hf(moe=name.startswith("moe"), next=name.startswith("next"))
        if name.endswith("q8_0"):
            round_to_file(hf)
        path = tmp_path_factory.mktemp(f"qwen35-{name}") / f"tiny-qwen35-{name}.gguf"
        out[name] = hf, write_qwen35_gguf(path, hf, tokenizer, q8_0=name.endswith("q8_0"))
    return out


def _ours(path: Path, **replace) -> OneSequence:
    loaded = load_model(path)
    model = loaded.model
    if replace:  # the same weights under another config
        model = _rebuilt(model, dataclasses.replace(loaded.config, **replace))
    return OneSequence(model)


def _rebuilt(model: Qwen35ForCausalLM, config) -> Qwen35ForCausalLM:
    other = Qwen35ForCausalLM(config)
    other.load_state_dict(model.state_dict())
    return other.eval()


def _far(model, hf, prompts) -> float:
    return max(max_logprob_diff(model, hf, ids) for ids in prompts.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_logprobs_match_transformers(variant, files, prompts) -> None:
    hf, path = files[variant]
    assert _far(_ours(path), hf, prompts) < LOGPROB_TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_decoding_matches_transformers(variant, files, prompts) -> None:
    hf, path = files[variant]
    ours = _ours(path)
    for ids in prompts.values():
        assert our_greedy(ours, ids) == hf_greedy(hf, ids)


def test_config_read_from_the_file(files) -> None:
    config = load_model(files["f32"][1]).config
    assert config.architecture == "qwen35"
    assert config.recurrent_layers == (0, 1, 2, 4, 5, 6)
    assert config.rotary_dim == 4 and config.head_dim == 16
    s = config.linear_attention
    assert (s.key_heads, s.value_heads, s.key_dim, s.value_dim, s.conv_kernel, s.tiled_heads) == (2, 4, 16, 16, 4, True)


def test_moe_config_read_from_the_file(files, prompts) -> None:
    """Every layer sparse, renormalized, with a gated shared expert; tokens choose different experts."""
    loaded = load_model(files["moe-f32"][1])
    c = loaded.config
    assert (c.architecture, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == ("qwen35", 8, 2, 32)
    assert (c.norm_topk_prob, c.dense_layers, c.shared_expert_intermediate_size, c.shared_expert_gate) == (
        True, (), 64, True)
    assert c.intermediate_size == 32 and not c.router_sigmoid  # the file gives no dense width
    moe = loaded.model.layers[0].mlp
    chosen = route(moe.gate(loaded.model.embed_tokens(prompts[next(iter(prompts))])), 2, True)[1]
    assert len(chosen.unique()) > 4


def test_qwen3next_config_read_from_the_file(files, prompts) -> None:
    """Qwen3-Next's value heads are grouped by key head: read as tiled (Qwen3.5's files) it is far off."""
    hf, path = files["next-f32"]
    c = load_model(path).config
    assert (c.architecture, c.num_experts, c.shared_expert_gate, c.rotary_dim) == ("qwen35", 8, True, 4)
    assert (c.linear_attention.tiled_heads, c.linear_attention.fused_ba) == (False, True)
    tiled = dataclasses.replace(c.linear_attention, tiled_heads=True)
    assert _far(_ours(path, linear_attention=tiled), hf, prompts) > FAR


def test_layer_flags_and_mtp_blocks(files, tokenizer, tmp_path, prompts) -> None:
    """A file that lists its delta-net layers and ends with a multi-token-prediction block reads
    as the same model (the block's tensors are left in the file)."""
    hf, _ = files["f32"]
    path = write_qwen35_gguf(tmp_path / "flags.gguf", hf, tokenizer, layer_flags=True, mtp_blocks=1)
    loaded = load_model(path)
    assert loaded.config.num_layers == 8 and loaded.config.recurrent_layers == (0, 1, 2, 4, 5, 6)
    assert _far(OneSequence(loaded.model), hf, prompts) < LOGPROB_TOLERANCE


def test_grouped_value_heads_are_far_off(files, prompts) -> None:
    """Reading the file's tiled value heads as grouped (the checkpoint's order) is far off."""
    hf, path = files["f32"]
    config = load_model(path).config
    grouped = dataclasses.replace(config.linear_attention, tiled_heads=False)
    assert _far(_ours(path, linear_attention=grouped), hf, prompts) > FAR
