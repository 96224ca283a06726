"""LFM2 against transformers on a tiny random-weight model written as llama.cpp's converter writes
its GGUF files (tiny_lfm2.py): short convolutions of 3 taps carried across forwards beside Llama's
attention with per-head q/k norms. Float32 and Q8_0 (the source rounded to the file first): prompt
log-probabilities within 1e-3 and the same 32 greedy tokens, ours one token a forward through the
convolutions' states as a server decodes. A convolution read the other way round (taps reversed)
is far off. LFM2 MoE ("lfm2moe") the same, with eight experts (two a token) after two dense layers,
chosen by a biased sigmoid.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, hf_greedy, max_logprob_diff, our_greedy
from tests.parity.one_sequence import OneSequence
from tests.parity.tiny_lfm2 import round_to_file, tiny_lfm2_hf, write_lfm2_gguf
from textmill.loader import load_model
from textmill.models.moe import route

transformers = pytest.importorskip("transformers")

VARIANTS = ("f32", "q8_0", "moe-f32", "moe-q8_0")


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for name in VARIANTS:
        hf = tiny_lfm2_hf(moe=name.startswith("moe"))
        if name.endswith("q8_0"):
            round_to_file(hf)
        path = tmp_path_factory.mktemp(f"lfm2-{name}") / f"tiny-lfm2-{name}.gguf"
        out[name] = hf, write_lfm2_gguf(path, hf, tokenizer, q8_0=name.endswith("q8_0"))
    return out


def _far(model, hf, prompts) -> float:
    return max(max_logprob_diff(model, hf, ids) for ids in prompts.values())


@pytest.mark.parametrize("variant", VARIANTS)
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


def test_moe_config_read_from_the_file(files, prompts) -> None:
    """Two dense layers, then experts chosen by the biased sigmoid; tokens choose different experts,
    and the bias changes some choices."""
    loaded = load_model(files["moe-f32"][1])
    c = loaded.config
    assert (c.architecture, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == ("lfm2", 8, 2, 32)
    assert (c.dense_layers, c.router_sigmoid, c.router_selection_bias, c.norm_topk_prob) == ((0, 1), True, True, True)
    assert c.intermediate_size == 192 and c.shared_expert_intermediate_size is None
    moe = loaded.model.layers[2].mlp
    logits = moe.gate(loaded.model.embed_tokens(prompts[next(iter(prompts))]))
    chosen = route(logits, 2, True, moe.selection_bias, sigmoid=True)[1]
    assert len(chosen.unique()) > 4 and not torch.equal(chosen, route(logits, 2, True, sigmoid=True)[1])


def test_taps_reversed_are_far_off(files, prompts) -> None:
    hf, path = files["f32"]
    model = load_model(path).model
    with torch.no_grad():
        for layer in model.layers:
            if layer.recurrent:
                layer.conv.conv_weight.copy_(layer.conv.conv_weight.flip(-1))
    assert _far(OneSequence(model), hf, prompts) > 100 * LOGPROB_TOLERANCE
