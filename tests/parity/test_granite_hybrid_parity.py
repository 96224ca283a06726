"""Granite 4.0-H against transformers on a tiny random-weight model written as llama.cpp's converter
writes its GGUF files (tiny_granite_hybrid.py): Mamba-2 mixers (two groups of B and C, a convolution
with a bias, the grouped gated norm) carried across forwards beside NoPE attention, Granite's four
multipliers. Float32 and Q8_0 (the source rounded to the file first), dense and with experts (a shared
one beside them), and with RoPE (Bamba's kind of file, q and k permuted): prompt log-probabilities
within 1e-3 and the same 32 greedy tokens, ours one token a forward through the states as a server
decodes. A scan that reads the other group's B and C, or forgets D, is far off.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, assert_matches, farthest_logprob_diff
from tests.parity.one_sequence import OneSequence
from tests.parity.tiny_granite_hybrid import round_to_file, tiny_granite_hybrid_hf, write_granite_hybrid_gguf
from textmill.loader import load_model

transformers = pytest.importorskip("transformers")

VARIANTS = ("f32", "q8_0", "moe-f32", "moe-q8_0", "rope-f32")


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for name in VARIANTS:
        hf = tiny_granite_hybrid_hf(moe=name.startswith("moe"), rope=name.startswith("rope"))
        if name.endswith("q8_0"):
            round_to_file(hf)
        path = tmp_path_factory.mktemp(f"granite-{name}") / f"tiny-granite-hybrid-{name}.gguf"
        out[name] = hf, write_granite_hybrid_gguf(path, hf, tokenizer, q8_0=name.endswith("q8_0"))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_logprobs_and_greedy_tokens_match_transformers(variant, files, prompts) -> None:
    hf, path = files[variant]
    assert_matches(OneSequence(load_model(path).model), hf, prompts)


def test_config_read_from_the_file(files) -> None:
    c = load_model(files["f32"][1]).config
    assert (c.architecture, c.recurrent_layers, c.num_kv_heads, c.intermediate_size) == (
        "granitehybrid", (0, 1, 3, 4), 2, 96)
    s = c.linear_attention
    assert (s.key_heads, s.value_heads, s.key_dim, s.value_dim, s.conv_kernel, s.tiled_heads) == (2, 8, 16, 16, 4,
                                                                                                  False)
    multipliers = (c.embedding_multiplier, c.residual_multiplier, c.attention_scale, c.logit_scale)
    assert multipliers == pytest.approx((2.0, 0.5, 0.0625, 6.0))  # the file's float32
    assert c.no_rope_layers == tuple(range(6)) and c.num_experts == 0
    moe = load_model(files["moe-f32"][1]).config
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (8, 2, 32)
    assert (moe.shared_expert_intermediate_size, moe.shared_expert_gate, moe.norm_topk_prob) == (96, False, True)
    assert load_model(files["rope-f32"][1]).config.no_rope_layers == ()


@pytest.mark.parametrize("change", ["groups swapped", "no D"])
def test_a_wrong_scan_is_far_off(change, files, prompts) -> None:
    hf, path = files["f32"]
    model = load_model(path).model
    with torch.no_grad():
        for layer in model.layers:
            if not layer.recurrent:
                continue
            mamba = layer.mamba
            if change == "no D":
                mamba.D.zero_()
            else:  # B's and C's rows of the two groups (and their conv taps) trade places
                inner, n = mamba.inner, mamba.shape.key_dim
                for conv_start in (inner, inner + 2 * n):  # B's, then C's; in in_proj after z's rows
                    for t, start in ((mamba.conv1d.weight, conv_start), (mamba.conv1d.bias, conv_start),
                                     (mamba.in_proj.weight, inner + conv_start)):
                        t[start:start + 2 * n] = torch.cat([t[start + n:start + 2 * n], t[start:start + n]])
    assert farthest_logprob_diff(OneSequence(model), hf, prompts) > 20 * LOGPROB_TOLERANCE  # logits / 6
