"""Mixtures of experts against transformers on tiny random-weight checkpoints: Qwen3 MoE (a
dense layer among the sparse ones, weights renormalized), OLMoE (three of eight experts,
weights as the router gives them, q and k normed over all heads), Mixtral (Llama's names
for everything but its experts), Granite MoE (Granite's multipliers; GGUF files only) and
Qwen2 MoE (q/k/v biases, a shared expert behind a sigmoid gate).

From a Hugging Face folder, and from a GGUF file written as llama.cpp's converter writes one
(the experts of a layer stacked in one tensor per projection; for Mixtral also each
expert's own tensors, as older files have them), each compared with transformers on the
source model: prompt log-probabilities within 1e-3 and the same 32 greedy tokens. The models
route each token to different experts (checked), so a wrong expert or weight shows.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.parity.compare import LOGPROB_TOLERANCE, hf_greedy, max_logprob_diff, our_greedy
from tests.parity.tiny_gguf import write_gguf
from tests.parity.tiny_models import save_folder, tiny_hf_model
from textmill.loader import load_model
from textmill.models.moe import SparseMoE, route
from textmill.models.registry import build_model

pytest.importorskip("transformers")

EXPECTED = {  # family -> (registry key, experts, per token, renormalized, dense layers)
    "qwen3moe": ("qwen3", 8, 2, True, (1,)),
    "olmoe": ("llama", 8, 3, False, ()),
    "mixtral": ("llama", 4, 2, True, ()),
    "granitemoe": ("llama", 4, 2, True, ()),
    "qwen2moe": ("qwen2", 8, 2, False, ()),
    "ernie4_5_moe": ("llama", 8, 2, True, (0,)),
}


def _matches(ours, hf, prompts) -> None:
    for name, ids in prompts.items():
        diff = max_logprob_diff(ours, hf, ids)
        assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"
        expected = hf_greedy(hf, ids)
        assert len(set(expected)) > 1, "a degenerate continuation would prove little"
        assert our_greedy(ours, ids) == expected, name


# Each family from a folder and a file; Mixtral's also from a file of its older layout.
CASES = [(f, s) for f in sorted(EXPECTED) for s in ("folder", "gguf")] + [("mixtral", "gguf-per-expert")]


@pytest.mark.parametrize(("family", "source"), CASES)
def test_experts_match_transformers(family, source, tokenizer, prompts, tmp_path: Path) -> None:
    hf = tiny_hf_model(family)
    refused = {"granitemoe": "GraniteMoeForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM"}  # GGUF only
    if source == "folder" and family in refused:
        with pytest.raises(ValueError, match=f"unsupported model architecture '{refused[family]}'"):
            load_model(save_folder(hf, tokenizer, tmp_path / family))
        return
    if source == "folder":
        ours = load_model(save_folder(hf, tokenizer, tmp_path / family))
    else:
        ours = load_model(write_gguf(tmp_path / f"{family}.gguf", family, hf, tokenizer,
                                     legacy_experts=source == "gguf-per-expert"))
    c = ours.config
    key, experts, per_token, normalized, dense = EXPECTED[family]
    assert (c.architecture, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob) == (
        key, experts, per_token, normalized)
    assert c.dense_layers == dense  # in a file: the layers without a router
    assert c.qk_norm == (family in ("qwen3moe", "olmoe")) and c.qk_norm_whole == (family == "olmoe")
    shared = {"qwen2moe": (48, True), "ernie4_5_moe": (64, False)}.get(family, (None, False))  # ERNIE: 2 of 32
    assert (c.shared_expert_intermediate_size, c.shared_expert_gate) == shared
    assert c.router_selection_bias == (family == "ernie4_5_moe")
    if family == "granitemoe":  # Granite's multipliers, read as the dense Granite's
        assert (c.embedding_multiplier, c.residual_multiplier, c.logit_scale) == pytest.approx((2.5, 0.5, 0.7))
    _matches(ours.model, hf, prompts)


def test_gguf_qwen3moe_all_sparse_matches(tokenizer, prompts, tmp_path: Path) -> None:
    """llama.cpp's Qwen3 MoE files have a router in every layer: a source model so made matches."""
    hf = tiny_hf_model("qwen3moe", mlp_only_layers=[])
    ours = load_model(write_gguf(tmp_path / "q.gguf", "qwen3moe", hf, tokenizer))
    assert all(isinstance(layer.mlp, SparseMoE) for layer in ours.model.layers)
    _matches(ours.model, hf, prompts)


def test_the_shared_expert_and_its_gate_matter(tokenizer, prompts, tmp_path: Path) -> None:
    """Qwen2 MoE without its shared expert's gate (or without the shared expert) is far off."""
    hf = tiny_hf_model("qwen2moe")
    ours = load_model(save_folder(hf, tokenizer, tmp_path / "q2"))
    no_gate = dict(shared_expert_gate=False)
    for change in (no_gate, no_gate | dict(shared_expert_intermediate_size=None)):
        with torch.device("meta"):
            other = build_model(dataclasses.replace(ours.config, **change))
        state = {n: t for n, t in ours.model.state_dict().items() if n in other.state_dict()}
        other.load_state_dict(state, assign=True)
        assert max_logprob_diff(other, hf, prompts["prose"]) > 100 * LOGPROB_TOLERANCE


def test_ernies_selection_bias_matters(tokenizer, prompts, tmp_path: Path) -> None:
    """ERNIE 4.5 MoE chooses by its probabilities plus a per-expert bias: without the bias (or
    with it in the weights too) the model is far off."""
    hf = tiny_hf_model("ernie4_5_moe")
    ours = load_model(write_gguf(tmp_path / "ernie.gguf", "ernie4_5_moe", hf, tokenizer))
    state = ours.model.state_dict()
    moe = next(layer.mlp for layer in ours.model.layers if isinstance(layer.mlp, SparseMoE))
    assert moe.selection_bias.abs().max() > 0.1
    without = {n: torch.zeros_like(t) if n.endswith("selection_bias") else t for n, t in state.items()}
    with torch.device("meta"):
        other = build_model(ours.config)
    other.load_state_dict(without, assign=True)
    assert max_logprob_diff(other, hf, prompts["prose"]) > 100 * LOGPROB_TOLERANCE


@pytest.mark.parametrize("family", ["olmoe", "qwen3moe"])
def test_routing_matters(family, tokenizer, prompts, tmp_path: Path) -> None:
    """Tokens go to different experts, and the other normalization of the weights is far off:
    the matches above rest on both."""
    hf = tiny_hf_model(family)
    ours = load_model(save_folder(hf, tokenizer, tmp_path / family))
    moe = next(layer.mlp for layer in ours.model.layers if isinstance(layer.mlp, SparseMoE))
    x = torch.randn(32, ours.config.hidden_size)
    _, ids = route(moe.gate(x), moe.top_k, moe.normalize)
    assert len(ids.unique()) == ours.config.num_experts
    flipped = dataclasses.replace(ours.config, norm_topk_prob=not ours.config.norm_topk_prob)
    with torch.device("meta"):
        other = build_model(flipped)
    other.load_state_dict(ours.model.state_dict(), assign=True)
    assert max_logprob_diff(other, hf, prompts["prose"]) > 100 * LOGPROB_TOLERANCE
