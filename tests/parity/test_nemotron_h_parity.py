"""Nemotron-H against transformers on a tiny random-weight model written as llama.cpp's converter
writes its GGUF files (tiny_nemotron_h.py): one sublayer a layer, Mamba-2 mixers, NoPE attention and
ReLU^2 MLPs, the mixers' states carried across forwards. Float32 and Q8_0 (the source rounded to the
file first): prompt log-probabilities within 1e-3 and the same 32 greedy tokens, ours one token a
forward as a server decodes. The MLP layers keep no KV cache. Nemotron 3 Nano's kind (float32): ReLU^2
experts chosen by a biased sigmoid, weights times 2.5, beside a shared expert.
"""
from __future__ import annotations

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, assert_matches, farthest_logprob_diff
from tests.parity.one_sequence import OneSequence
from tests.parity.tiny_granite_hybrid import round_to_file
from tests.parity.tiny_nemotron_h import tiny_nemotron_h_hf, write_nemotron_h_gguf
from textmill.loader import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory):
    out = {}
    for name in ("f32", "q8_0", "moe-f32"):
        hf = tiny_nemotron_h_hf(moe=name.startswith("moe"))
        if name == "q8_0":
            round_to_file(hf)
        path = tmp_path_factory.mktemp(f"nemotron-{name}") / f"tiny-nemotron-h-{name}.gguf"
        out[name] = hf, write_nemotron_h_gguf(path, hf, tokenizer, q8_0=name == "q8_0")
    return out


@pytest.mark.parametrize("variant", ["f32", "q8_0", "moe-f32"])
def test_prompt_logprobs_and_greedy_tokens_match_transformers(variant, files, prompts) -> None:
    hf, path = files[variant]
    assert_matches(OneSequence(load_model(path).model), hf, prompts)


def test_config_read_from_the_file(files) -> None:
    c = load_model(files["f32"][1]).config
    assert (c.architecture, c.recurrent_layers, c.mlp_only_layers, c.hidden_act) == (
        "nemotron_h", (0, 2, 5), (1, 4), "relu2")
    assert (c.num_kv_heads, c.head_dim, c.intermediate_size, c.no_rope_layers) == (2, 16, 96, tuple(range(6)))
    assert [c.has_kv(i) for i in range(6)] == [False, False, False, True, False, False]
    s = c.linear_attention
    assert (s.key_heads, s.value_heads, s.key_dim, s.value_dim, s.tiled_heads) == (2, 8, 16, 16, False)
    moe = load_model(files["moe-f32"][1]).config
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.router_scale) == (8, 2, 32, 2.5)
    assert (moe.router_sigmoid, moe.router_selection_bias, moe.shared_expert_intermediate_size) == (True, True, 64)
    assert not moe.shared_expert_gate and moe.norm_topk_prob


def test_the_mlp_is_relu_squared(files, prompts) -> None:
    """SwiGLU's SiLU in its place (or ReLU without the square) is far off."""
    hf, path = files["f32"]
    model = load_model(path).model
    for layer in model.layers:
        if layer.mlp_only:
            layer.mlp.forward = lambda x, m=layer.mlp: m.down_proj(torch.relu(m.up_proj(x)))
    assert farthest_logprob_diff(OneSequence(model), hf, prompts) > 20 * LOGPROB_TOLERANCE
