"""gpt-oss against transformers on a tiny random-weight model written as llama.cpp writes its
GGUF files: biases on q, k, v, o, the router and every expert projection; a sink logit per head
in each attention softmax; a 8-token window in every other layer, YaRN RoPE in all; four experts
of which two a token, their SwiGLU clamped. Experts in float32, and in MXFP4 as the released
files hold them (the source rounded to the same values first). Prompt log-probabilities within
1e-3 and the same 32 greedy tokens.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, hf_greedy, max_logprob_diff, our_greedy
from tests.parity.tiny_gpt_oss import round_experts_to_mxfp4, write_gpt_oss_gguf
from tests.parity.tiny_models import SLIDING_WINDOW, tiny_hf_model
from textmill.loader import load_model
from textmill.models.llama import swiglu_clamped
from textmill.models.registry import build_model

pytest.importorskip("transformers")


def _gguf(tmp_path: Path, tokenizer, *, mxfp4: bool):
    hf = tiny_hf_model("gpt_oss")
    if mxfp4:
        round_experts_to_mxfp4(hf)
    return hf, load_model(write_gpt_oss_gguf(tmp_path / "gpt-oss.gguf", hf, tokenizer, mxfp4=mxfp4))


@pytest.mark.parametrize("mxfp4", [False, True], ids=["f32-experts", "mxfp4-experts"])
def test_gpt_oss_matches_transformers(mxfp4, tokenizer, prompts, tmp_path: Path) -> None:
    hf, ours = _gguf(tmp_path, tokenizer, mxfp4=mxfp4)
    c = ours.config
    assert (c.architecture, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob) == ("llama", 4, 2, True)
    assert (c.attention_bias, c.attention_out_bias, c.attention_sinks, c.moe_bias) == (True, True, True, True)
    assert (c.sliding_window, c.sliding_window_pattern, c.swiglu_limit) == (SLIDING_WINDOW, 2, 7.0)
    assert c.rope_attention_factor > 1.0  # YaRN's magnitude
    for name, ids in prompts.items():
        diff = max_logprob_diff(ours.model, hf, ids)
        assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"
        expected = hf_greedy(hf, ids)
        assert len(set(expected)) > 1, "a degenerate continuation would prove little"
        assert our_greedy(ours.model, ids) == expected, name


def test_sinks_and_biases_matter(tokenizer, prompts, tmp_path: Path) -> None:
    """Without its sinks, or with its experts' SwiGLU unclamped and plain, the model is far off
    (so the match above rests on both); the window and the sinks are per layer."""
    hf, ours = _gguf(tmp_path, tokenizer, mxfp4=False)
    layers = ours.model.layers
    assert [layer.self_attn.sliding_window for layer in layers] == [SLIDING_WINDOW, None]
    state = ours.model.state_dict()
    for name in state:
        if name.endswith("self_attn.sinks"):
            state[name] = torch.full_like(state[name], -1e4)  # no weight left for a sink
    with torch.device("meta"):
        other = build_model(ours.config)
    other.load_state_dict(state, assign=True)
    assert max_logprob_diff(other, hf, prompts["prose"]) > 100 * LOGPROB_TOLERANCE


def test_clamped_swiglu_is_transformers() -> None:
    """gpt-oss's activation where its clamps bite (|values| past 7), as transformers computes it."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = tiny_hf_model("gpt_oss").config
    experts = GptOssExperts(config)
    gate_up = torch.randn(64, 2 * 32) * 6  # interleaved, as transformers holds it
    expected = experts._apply_gate(gate_up)
    got = swiglu_clamped(gate_up[:, ::2], gate_up[:, 1::2], 7.0)
    assert gate_up.abs().max() > 7
    torch.testing.assert_close(got, expected)
