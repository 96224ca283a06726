"""Gemma 4 (dense text) against transformers on a tiny random-weight model written as
llama.cpp's converter writes its GGUF files (tiny_gemma4.py): sliding and full layers with
their own head widths, RoPE bases and (with k_eq_v) KV head counts; proportional RoPE on a
quarter of each full head; per-layer embeddings; the last three layers reusing earlier
layers' K/V with a double-wide MLP; layer scalars; V RMS-normed without a weight; unscaled
attention scores; a final soft-cap. Float32, Q8_0 (the source rounded to the file first), and
a 31B-like variant whose full layers take V from k_proj. Prompt log-probabilities within 1e-3
and the same 32 greedy tokens.

The tests that change one feature say which one a mismatch most likely comes from: the model
without it is far from the real one, so a loader that drops it is far too.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import torch
from gguf import GGUFReader

from tests.parity.compare import LOGPROB_TOLERANCE, hf_greedy, max_logprob_diff, our_greedy, prompt_logprobs
from tests.parity.tiny_gemma4 import HIDDEN, LAYER_TYPES, round_to_file, tiny_gemma4_hf, write_gemma4_gguf
from tests.parity.tiny_models import SLIDING_WINDOW
from textmill.loader import LoadedModel, load_model

transformers = pytest.importorskip("transformers")

VARIANTS = {"f32": dict(k_eq_v=False, q8_0=False), "q8_0": dict(k_eq_v=False, q8_0=True),
            "k_eq_v": dict(k_eq_v=True, q8_0=False)}
FAR = 100 * LOGPROB_TOLERANCE


@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each variant's source model (rounded to what its file holds) and file, written once."""
    out = {}
    for name, v in VARIANTS.items():
        hf = tiny_gemma4_hf(k_eq_v=v["k_eq_v"])
        if v["q8_0"]:
            round_to_file(hf)
        path = tmp_path_factory.mktemp(f"gemma4-{name}") / f"tiny-gemma4-{name}.gguf"
        out[name] = hf, write_gemma4_gguf(path, hf, tokenizer, q8_0=v["q8_0"])
    return out


@pytest.fixture(scope="module")
def ours(files) -> dict[str, LoadedModel]:
    return {name: load_model(path) for name, (_, path) in files.items()}


def _far(model, hf, prompts) -> float:
    """Ours against transformers, the largest |log-prob difference| over the prompts."""
    return max(max_logprob_diff(model, hf, ids) for ids in prompts.values())


def _hf_far(a, b, prompts) -> float:
    """The same between two transformers models."""
    with torch.no_grad():
        return max((prompt_logprobs(a(ids[None]).logits[0], ids) - prompt_logprobs(b(ids[None]).logits[0], ids))
                   .abs().max().item() for ids in prompts.values())


def _hf_from_file(path: Path, config) -> torch.nn.Module:
    """transformers' own GGUF reader on our file. It cannot build the config from the file (it
    reads feed_forward_length as one int, takes no key_length_swa, layer pattern, shared layers,
    PLE width or RoPE bases), so the source config is given; its tensor map has no entry for
    layer_output_scale (layer_scalar is a buffer), so those are read here from the file."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                              dtype=torch.float32)
    scalars = {t.name: torch.tensor(t.data.copy()) for t in GGUFReader(path).tensors}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.copy_(scalars[f"blk.{i}.layer_output_scale.weight"])
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("variant", tuple(VARIANTS))
def test_transformers_reads_the_file_back(variant, files, prompts) -> None:
    """The writer alone (no textmill): every weight transformers reads back from the file equals
    the source's, bit for bit, and so do the log-probs."""
    hf, path = files[variant]
    back = _hf_from_file(path, hf.config)
    expected, got = hf.state_dict(), back.state_dict()
    assert expected.keys() == got.keys()
    assert [n for n in expected if not torch.equal(expected[n], got[n])] == []
    with torch.no_grad():
        for ids in prompts.values():
            torch.testing.assert_close(back(ids[None]).logits, hf(ids[None]).logits, rtol=0, atol=0)


@pytest.mark.parametrize("variant", tuple(VARIANTS))
def test_config_is_read(variant, ours) -> None:
    """Only the fields every design will have; the Gemma 4 ones are the loader's business."""
    c = ours[variant].config
    assert (c.architecture, ours[variant].format) == ("gemma4", "gguf")
    assert (c.num_layers, c.hidden_size, c.sliding_window) == (len(LAYER_TYPES), HIDDEN, SLIDING_WINDOW)


@pytest.mark.parametrize("variant", tuple(VARIANTS))
def test_prompt_logprobs_match(variant, files, ours, prompts) -> None:
    hf, _ = files[variant]
    for name, ids in prompts.items():
        diff = max_logprob_diff(ours[variant].model, hf, ids)
        assert diff < LOGPROB_TOLERANCE, f"{variant} {name}: max |logprob diff| = {diff:.2e}"


@pytest.mark.parametrize("variant", tuple(VARIANTS))
def test_greedy_continuation_matches(variant, files, ours, prompts) -> None:
    """32 tokens: past the 8-token window, and through the shared layers' reuse of a cache
    that grows one token at a time."""
    hf, _ = files[variant]
    for name, ids in prompts.items():
        expected = hf_greedy(hf, ids)
        assert len(set(expected)) > 8, "a degenerate continuation would prove little"
        assert our_greedy(ours[variant].model, ids) == expected, f"{variant} {name}"


def _set_store(layer_from: int, layer_to: int) -> Callable:
    """Shared layers read the K/V of the last earlier layer of their type that transformers marks
    "store"; moving the mark makes them read another layer's."""
    def change(hf):
        layers = hf.model.layers
        layers[layer_from].self_attn.store_full_length_kv = False
        layers[layer_to].self_attn.store_full_length_kv = True
    return change


def _rope_whole_head(hf) -> None:
    head_dim = hf.config.per_layer_config[LAYER_TYPES.index("full_attention")].head_dim
    theta = hf.config.rope_parameters["full_attention"]["rope_theta"]
    rotary = hf.model.rotary_emb
    rotary.full_attention_inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)


def _v_unnormed(hf) -> None:
    for layer in hf.model.layers:
        if hasattr(layer.self_attn, "v_norm"):
            layer.self_attn.v_norm = torch.nn.Identity()


def _scores_scaled(hf) -> None:
    for layer in hf.model.layers:
        layer.self_attn.scaling = layer.self_attn.head_dim ** -0.5


def _no_ple_table(hf) -> None:
    hf.model.embed_tokens_per_layer.weight.zero_()


def _no_ple(hf) -> None:
    for layer in hf.model.layers:
        layer.per_layer_projection.weight.zero_()


def _scalars_one(hf) -> None:
    for layer in hf.model.layers:
        layer.layer_scalar.fill_(1.0)


def _no_softcap(hf) -> None:
    hf.config.final_logit_softcapping = None


# What a loader might get wrong -> transformers' model with that mistake made.
MISTAKES = {
    "sliding shared layers reuse layer 3, not 4": _set_store(4, 3),
    "full shared layer reuses layer 2, not 5": _set_store(5, 2),
    "RoPE turns the whole full-attention head": _rope_whole_head,
    "V not RMS-normed": _v_unnormed,
    "scores scaled by head_dim ** -0.5": _scores_scaled,
    "per-layer embedding table left out": _no_ple_table,
    "per-layer embeddings left out": _no_ple,
    "layer scalars left out": _scalars_one,
    "no final soft-cap": _no_softcap,
}


@pytest.mark.parametrize("mistake", tuple(MISTAKES))
def test_each_feature_matters(mistake, files, ours, prompts) -> None:
    """Each feature moves this model's log-probs far past the tolerance (so the match above
    rests on it), and ours is not the model without it."""
    hf, _ = files["f32"]
    wrong = copy.deepcopy(hf)
    with torch.no_grad():
        MISTAKES[mistake](wrong)
    assert _hf_far(wrong, hf, prompts) > FAR, f"{mistake}: too small a change to prove anything"
    diff = _far(ours["f32"].model, wrong, prompts)
    assert diff > FAR / 10, f"textmill computes transformers' Gemma 4 with this mistake: {mistake} ({diff:.1e})"


# Changes a file can carry: textmill must follow the file, not a default.
FILE_CHANGES = {"layer scalars all 1": _scalars_one, "per-layer embedding table zero": _no_ple_table,
                "no final soft-cap": _no_softcap}


@pytest.mark.parametrize("change", tuple(FILE_CHANGES))
def test_file_changes_are_followed(change, files, ours, tokenizer, prompts, tmp_path: Path) -> None:
    hf, _ = files["f32"]
    changed = copy.deepcopy(hf)
    with torch.no_grad():
        FILE_CHANGES[change](changed)
    model = load_model(write_gemma4_gguf(tmp_path / "changed.gguf", changed, tokenizer)).model
    assert _far(model, hf, prompts) > FAR, f"{change}: textmill ignores it"
    for name, ids in prompts.items():
        diff = max_logprob_diff(model, changed, ids)
        assert diff < LOGPROB_TOLERANCE, f"{change}, {name}: max |logprob diff| = {diff:.2e}"
