"""Every family against transformers on tiny random-weight checkpoints made by transformers.

From a Hugging Face folder (config.json + safetensors, one family sharded) and, for the
families llama.cpp converts, from a GGUF file written the way its converter writes one
(transformers reads that file with its own name tables). Float32 on both sides: prompt
log-probabilities within 1e-3 and the same 32 greedy tokens.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from tests.parity.compare import GREEDY_TOKENS, LOGPROB_TOLERANCE, hf_greedy, max_logprob_diff, our_greedy
from tests.parity.tiny_gguf import llama_cpp_permute, write_gguf
from tests.parity.tiny_models import (FAMILIES, GEMMA2_SOFTCAPS, SLIDING_WINDOW, phi3_longrope_model,
                                     save_folder, tiny_hf_model, tiny_vl_model, train_tokenizer)
from textmill.loader import LoadedModel, load_model
from textmill.loader.names import unpermute_rope_rows
from textmill.models.registry import build_model

transformers = pytest.importorskip("transformers")

# Config fields that transformers' GGUF reader does not take from the file (it falls back to
# the family's defaults, which llama.cpp does not use); given to from_pretrained instead.
HF_GGUF_OVERRIDES = {
    "llama": lambda c: {"head_dim": c.head_dim},
    "qwen2": lambda c: {},
    # llama.cpp ignores Phi-3's window, and transformers' reader does not set one; its default
    # pad id (32000) is past the tiny vocabulary.
    "phi3": lambda c: {"pad_token_id": None},
    "qwen3": lambda c: {"head_dim": c.head_dim},  # its reader skips attention.key_length
    # transformers' Gemma 2 reader takes neither soft-cap from the file: its defaults are 50/30.
    "gemma2": lambda c: {"query_pre_attn_scalar": c.head_dim, "attn_logit_softcapping": c.attn_logit_softcapping,
                         "final_logit_softcapping": c.final_logit_softcapping},
    "gemma3": lambda c: {"query_pre_attn_scalar": c.head_dim},  # llama.cpp's rule below 27B
    "gpt2": lambda c: {"n_positions": c.n_positions},
}


@pytest.fixture(scope="module", params=FAMILIES)
def from_folder(request, tokenizer, tmp_path_factory) -> tuple[str, torch.nn.Module, LoadedModel]:
    family = request.param
    hf = tiny_hf_model(family)
    # Qwen2 in several shards: exercises model.safetensors.index.json.
    shard = "40KB" if family == "qwen2" else None
    folder = save_folder(hf, tokenizer, tmp_path_factory.mktemp(family), max_shard_size=shard)
    return family, hf, load_model(folder)


@pytest.fixture(scope="module", params=tuple(HF_GGUF_OVERRIDES))
def from_gguf(request, tokenizer, tmp_path_factory) -> tuple[str, torch.nn.Module, LoadedModel]:
    family = request.param
    # transformers' Gemma 2 reader never reads output.weight (real Gemma 2 files tie the head).
    source = tiny_hf_model(family, seed=1, **({"tie_word_embeddings": True} if family == "gemma2" else {}))
    folder = tmp_path_factory.mktemp(f"{family}-gguf")
    path = write_gguf(folder / "tiny.gguf", family, source, tokenizer, quantize_mlp=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
        **HF_GGUF_OVERRIDES[family](source.config))
    return family, hf.eval().requires_grad_(False), load_model(path)


def test_folder_config(from_folder) -> None:
    family, hf, ours = from_folder
    c, h = ours.config, hf.config
    assert ours.format == "hf"
    as_llama = ("mistral", "llama3", "smollm3", "granite", "ministral3")
    assert c.architecture == ("llama" if family in as_llama else {"qwen3_yarn": "qwen3", "exaone4": "olmo2",
                                                                  "olmo3": "olmo2"}.get(family, family))
    assert (c.qk_norm, c.qk_norm_whole) == (family in ("qwen3", "qwen3_yarn", "gemma3", "olmo2", "exaone4", "olmo3"),
                                            family in ("olmo2", "olmo3"))
    assert c.post_norms == (family != "gemma")
    assert (c.vocab_size, c.hidden_size, c.num_layers) == (h.vocab_size, h.hidden_size, h.num_hidden_layers)
    assert (c.num_heads, c.num_kv_heads) == (h.num_attention_heads, getattr(h, "num_key_value_heads", h.num_attention_heads))
    assert c.tie_word_embeddings == h.tie_word_embeddings
    assert (ours.model.lm_head is None) == c.tie_word_embeddings
    if family in ("mistral", "phi3", "gemma2", "gemma3", "olmo3"):
        assert c.sliding_window == SLIDING_WINDOW
    if family == "llama3":
        assert c.rope_freq_factors[0] == 1.0 and c.rope_freq_factors[-1] == 8.0
        assert any(1.0 < f < 8.0 for f in c.rope_freq_factors)  # the smooth band
    if family == "gemma3":
        assert (c.sliding_window_pattern, c.query_pre_attn_scalar, c.final_logit_softcap) == (2, 24.0, 30.0)
        assert (c.rope_theta, c.rope_local_theta, c.rope_scaling_factor) == (100000.0, 10000.0, 2.0)
        assert c.qk_norm
    assert c.no_rope_layers == ((3,) if family == "smollm3" else ())
    if family == "olmo3":  # layer 0 local (plain RoPE), layer 1 global (YaRN)
        assert (c.sliding_window_pattern, c.rope_local_theta) == (2, 10000.0)
    if family in ("ministral3", "qwen3_yarn", "olmo3"):  # YaRN; Ministral 3 served within its original context
        assert c.rope_freq_factors[0] == 1.0 and c.rope_freq_factors[-1] == 4.0
        assert c.max_position_embeddings == (128 if family == "ministral3" else h.max_position_embeddings)
    if family == "gemma2":  # every other layer local, one RoPE base, both soft-caps, no QK norm
        assert (c.sliding_window_pattern, c.query_pre_attn_scalar, c.rope_theta, c.rope_local_theta) == (
            2, 24.0, 10000.0, 10000.0)
        assert (c.attn_logit_softcap, c.final_logit_softcap) == GEMMA2_SOFTCAPS and not c.qk_norm


def test_folder_weights_are_transformers_weights(from_folder) -> None:
    """Every parameter was loaded (none left at meta/init) and equals transformers' own."""
    family, hf, ours = from_folder
    theirs = {k.removeprefix("model.").removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    if family == "phi3":  # our model holds Phi-3's fused tensors as Llama's parts
        c = hf.config
        d = c.hidden_size // c.num_attention_heads
        q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
        for name in [n for n in theirs if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))]:
            whole, base = theirs.pop(name), name.rsplit(".", 2)[0]
            if "qkv" in name:
                theirs |= {f"{base}.q_proj.weight": whole[:q], f"{base}.k_proj.weight": whole[q:q + kv],
                           f"{base}.v_proj.weight": whole[q + kv:]}
            else:
                theirs |= {f"{base}.gate_proj.weight": whole[:c.intermediate_size],
                           f"{base}.up_proj.weight": whole[c.intermediate_size:]}
    if family == "gemma":  # Gemma 1's pre-MLP norm has Gemma 2's post-attention name
        theirs = {k.replace("post_attention_layernorm", "pre_feedforward_layernorm"): v for k, v in theirs.items()}
    for name, value in ours.model.state_dict().items():
        expected = theirs[name]
        if family == "gpt2" and value.dim() == 2 and not name.startswith(("wte", "wpe", "lm_head")):
            expected = expected.t()  # Conv1D
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)


def test_folder_prompt_logprobs_match(from_folder, prompts) -> None:
    family, hf, ours = from_folder
    for name, ids in prompts.items():
        diff = max_logprob_diff(ours.model, hf, ids)
        assert diff < LOGPROB_TOLERANCE, f"{family}/{name}: max |logprob diff| = {diff:.2e}"


def test_folder_greedy_matches(from_folder, prompts) -> None:
    family, hf, ours = from_folder
    for name, ids in prompts.items():
        expected = hf_greedy(hf, ids)
        assert len(set(expected)) > 1, "a degenerate continuation would prove little"
        assert our_greedy(ours.model, ids) == expected, f"{family}/{name}"
        assert len(expected) == GREEDY_TOKENS


def test_gguf_prompt_logprobs_match(from_gguf, prompts) -> None:
    family, hf, ours = from_gguf
    assert ours.format == "gguf" and ours.config.architecture == family
    for name, ids in prompts.items():
        diff = max_logprob_diff(ours.model, hf, ids)
        assert diff < LOGPROB_TOLERANCE, f"{family}/{name}: max |logprob diff| = {diff:.2e}"


def test_gguf_greedy_matches(from_gguf, prompts) -> None:
    family, hf, ours = from_gguf
    for name, ids in prompts.items():
        assert our_greedy(ours.model, ids) == hf_greedy(hf, ids), f"{family}/{name}"


def test_bfloat16_folder_stays_close(from_folder, prompts, tmp_path: Path) -> None:
    """bf16 weights compute in bf16 and return float32 logits near the float32 ones."""
    family, hf, ours = from_folder
    folder = save_folder(hf, train_tokenizer(), tmp_path / family)
    low = load_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.model.parameters())
    ids = prompts["prose"]
    with torch.no_grad():
        hi = ours.model.logits(ours.model(ids, torch.arange(len(ids)), _dense()))
        lo = low.model.logits(low.model(ids, torch.arange(len(ids)), _dense()))
    assert lo.dtype == torch.float32
    p_hi, p_lo = hi.log_softmax(-1), lo.log_softmax(-1)
    kl = (p_hi.exp() * (p_hi - p_lo)).sum(-1)
    assert kl.max() < 0.05, f"{family}: KL(f32 || bf16) up to {kl.max():.3f}"


def _dense():
    from tests.parity.dense_attention import DenseAttention

    return DenseAttention()


def test_llama3_gguf_rope_freqs_match_the_folder(tokenizer, prompts, tmp_path: Path) -> None:
    """llama.cpp keeps Llama 3.1+ RoPE scaling in a rope_freqs tensor, which transformers'
    GGUF reader ignores; so this GGUF is compared with transformers on the source model."""
    hf = tiny_hf_model("llama3")
    path = write_gguf(tmp_path / "llama3.gguf", "llama3", hf, tokenizer)
    ours = load_model(path)
    assert ours.config.rope_freq_factors == pytest.approx(
        load_model(save_folder(hf, tokenizer, tmp_path / "folder")).config.rope_freq_factors, rel=1e-6)
    for name, ids in prompts.items():
        diff = max_logprob_diff(ours.model, hf, ids)
        assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"
        assert our_greedy(ours.model, ids) == hf_greedy(hf, ids), name


def test_phi3_longrope_folder_and_gguf_match_transformers(tokenizer, prompts, tmp_path: Path) -> None:
    """Past the original context transformers takes the long factors, up to it the short ones;
    textmill takes one set for the window it serves (llama.cpp's rule for its context size):
    the long set for the model's whole window, the short set for a window within the original."""
    hf = phi3_longrope_model(original=8)
    folder = save_folder(hf, tokenizer, tmp_path / "folder")
    path = write_gguf(tmp_path / "phi3.gguf", "phi3", hf, tokenizer)
    for ours in (load_model(folder), load_model(path)):
        assert ours.config.rope_attention_factor == pytest.approx((1 + math.log(256 / 8) / math.log(8)) ** 0.5)
        for name, ids in prompts.items():  # every prompt is longer than 8 tokens: the long factors
            assert len(ids) > 8
            diff = max_logprob_diff(ours.model, hf, ids)
            assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"
            assert our_greedy(ours.model, ids) == hf_greedy(hf, ids), name
    short_ids = prompts["prose"][:8]
    for ours in (load_model(folder, context_window=8), load_model(path, context_window=8)):
        assert max_logprob_diff(ours.model, hf, short_ids) < LOGPROB_TOLERANCE
    # ... and the two sets differ enough that taking the wrong one shows.
    assert max_logprob_diff(load_model(folder).model, hf, short_ids) > 100 * LOGPROB_TOLERANCE


def test_phi4_mini_partial_rotary_matches_transformers(tokenizer, prompts, tmp_path: Path) -> None:
    """Phi-4-mini rotates the first 3/4 of each head (here 1/2) and passes the rest: from a
    folder and from a GGUF (rope.dimension_count below head_dim), with LongRoPE."""
    hf = phi3_longrope_model(original=8, partial_rotary_factor=0.5)
    folder = save_folder(hf, tokenizer, tmp_path / "folder")
    path = write_gguf(tmp_path / "phi4.gguf", "phi3", hf, tokenizer)
    for ours in (load_model(folder), load_model(path)):
        head_dim = ours.config.head_dim
        assert ours.config.rotary_dim == head_dim // 2
        for name, ids in prompts.items():
            diff = max_logprob_diff(ours.model, hf, ids)
            assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"
            assert our_greedy(ours.model, ids) == hf_greedy(hf, ids), name


def _rows_as_llamas(c, state):
    """q and k rows reordered as the loader puts back llama.cpp's permuted Llama rows."""
    return state | {n: unpermute_rope_rows(t, c.num_heads if ".q_proj." in n else c.num_kv_heads)
                    for n, t in state.items() if n.endswith(("q_proj.weight", "k_proj.weight"))}


def _permuted(t, heads):
    """Rows in llama.cpp's permuted order (what the loader undoes)."""
    return torch.from_numpy(llama_cpp_permute(t.numpy(), heads))


def _plain_rope(c):
    return dataclasses.replace(c, rope_freq_factors=None, rope_attention_factor=1.0)


# Families whose GGUF files transformers does not read, each with its model stripped of the
# setting the match rests on (config and state dict in, the same out): far off, each.
NOT_READ_BY_TRANSFORMERS = {
    "smollm3": lambda c, state, hf: (dataclasses.replace(c, no_rope_layers=()), state),  # RoPE in the NoPE layer
    "granite": lambda c, state, hf: (dataclasses.replace(c, residual_multiplier=None), state),  # one multiplier
    # q and k rows in the checkpoint's order (RoPE pairs (2i, 2i + 1)), not reordered for rotate-half
    # the file's norm weights (1 + w) taken as they are, the +1 not undone
    "gemma": lambda c, state, hf: (c, {n: t + 1 if n.endswith("norm.weight") else t for n, t in state.items()}),
    "ernie4_5": lambda c, state, hf: (c, state | {n: hf.state_dict()["model." + n] for n in state
                                                  if n.endswith(("q_proj.weight", "k_proj.weight"))}),
    # GLM-4: the q/k rows (weights and biases) as the file holds them, their RoPE pairs not reordered
    "glm4": lambda c, state, hf: (c, state | {n: hf.state_dict()["model." + n] for n in state
                                              if n.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                             "k_proj.bias"))}),
    # plain RoPE instead of YaRN (transformers reads Qwen3 files, but not their YaRN keys)
    "ministral3": lambda c, state, hf: (_plain_rope(c), state),
    "qwen3_yarn": lambda c, state, hf: (_plain_rope(c), state),
    # EXAONE 3.x, OLMo 2, EXAONE 4.0: q and k rows taken as llama.cpp's permuted Llama rows
    "exaone": lambda c, state, hf: (c, _rows_as_llamas(c, state)),
    # InternLM2: its q and k rows left in the file's (permuted) order
    "internlm2": lambda c, state, hf: (c, {n: _permuted(t, c.num_heads if ".q_proj." in n else c.num_kv_heads)
                                           if n.endswith(("q_proj.weight", "k_proj.weight")) else t
                                           for n, t in state.items()}),
    "exaone4": lambda c, state, hf: (c, _rows_as_llamas(c, state)),
    "olmo2": lambda c, state, hf: (c, _rows_as_llamas(c, state)),
    # OLMo 3: the window in every layer, as a Llama's (Mistral's) is
    "olmo3": lambda c, state, hf: (dataclasses.replace(c, sliding_window_pattern=None), state),
}


@pytest.mark.parametrize("family", sorted(NOT_READ_BY_TRANSFORMERS))
def test_gguf_transformers_cannot_read_matches_the_source_model(family, tokenizer, prompts, tmp_path: Path) -> None:
    """SmolLM3 files carry no key for their NoPE layers: llama.cpp leaves RoPE out of every 4th
    layer by rule, as SmolLM3's config does. Granite files carry its multipliers as llama.cpp's
    _scale keys. ERNIE 4.5's RoPE pairs (2i, 2i + 1), so its q/k rows are reordered at load.
    YaRN (Ministral 3's "mistral3" files, Qwen3's long-context ones) is a handful of rope.scaling
    keys. EXAONE 3.x, EXAONE 4.0 and OLMo 2 files keep their q/k rows as the checkpoint has
    them (not permuted as Llama's). transformers reads none of these files (Qwen3's without YaRN), so each is compared
    with transformers on the source model; and the model without its own setting is far off,
    so the match rests on it."""
    hf = tiny_hf_model(family)
    path = write_gguf(tmp_path / f"{family}.gguf", family, hf, tokenizer)
    ours = load_model(path)
    own = {"gemma": "gemma", "qwen3_yarn": "qwen3", "olmo2": "olmo2", "exaone4": "olmo2", "olmo3": "olmo2",
           "glm4": "glm4"}
    assert ours.format == "gguf" and ours.config.architecture == own.get(family, "llama")
    if family == "smollm3":
        assert ours.config.no_rope_layers == (3,)
    elif family in ("ministral3", "qwen3_yarn"):  # the folder's numbers, from the file's keys
        folder = load_model(save_folder(hf, tokenizer, tmp_path / "folder")).config
        assert ours.config.rope_freq_factors == pytest.approx(folder.rope_freq_factors, rel=1e-6)
        assert ours.config.rope_attention_factor == pytest.approx(folder.rope_attention_factor, rel=1e-6)
        assert ours.config.max_position_embeddings == folder.max_position_embeddings
    elif family == "granite":  # the file's float32 keys
        c, h = ours.config, hf.config
        assert (c.embedding_multiplier, c.residual_multiplier, c.attention_scale, c.logit_scale) == pytest.approx(
            (h.embedding_multiplier, h.residual_multiplier, h.attention_multiplier, h.logits_scaling))
    for name, ids in prompts.items():
        diff = max_logprob_diff(ours.model, hf, ids)
        assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"
        assert our_greedy(ours.model, ids) == hf_greedy(hf, ids), name
    config, state = NOT_READ_BY_TRANSFORMERS[family](ours.config, ours.model.state_dict(), hf)
    with torch.device("meta"):
        without = build_model(config)
    without.load_state_dict(state, assign=True)
    assert max_logprob_diff(without, hf, prompts["prose"]) > 100 * LOGPROB_TOLERANCE


def test_an_ernie_folder_is_refused_not_misread(tokenizer, tmp_path: Path) -> None:
    """Loaded as Llama, an ERNIE 4.5 folder would turn the wrong RoPE pairs; it is refused."""
    folder = save_folder(tiny_hf_model("ernie4_5"), tokenizer, tmp_path / "ernie")
    with pytest.raises(ValueError, match="ERNIE 4.5 is supported from GGUF files only"):
        load_model(folder)


@pytest.mark.parametrize("family", ["qwen2vl", "qwen3vl"])
def test_vision_language_gguf_text_matches_transformers(family, tokenizer, prompts, tmp_path: Path) -> None:
    """The main GGUF of Qwen2.5-VL and Qwen3-VL holds their text model ("qwen2vl" and "qwen3vl":
    Qwen2 and Qwen3 with M-RoPE). On text, M-RoPE turns every section by the same position
    (llama.cpp broadcasts a text token's position; transformers' position ids for text agree)
    and Qwen3-VL's deepstack adds nothing: plain RoPE. Against transformers' whole
    vision-language model, given text only."""
    hf = tiny_vl_model(family)
    ours = load_model(write_gguf(tmp_path / f"{family}.gguf", family, hf, tokenizer))
    assert ours.config.architecture == family.removesuffix("vl")
    assert ours.config.qk_norm == (family == "qwen3vl") and ours.config.attention_bias == (family == "qwen2vl")
    for name, ids in prompts.items():
        diff = max_logprob_diff(ours.model, hf, ids)
        assert diff < LOGPROB_TOLERANCE, f"{name}: max |logprob diff| = {diff:.2e}"
        assert our_greedy(ours.model, ids) == hf_greedy(hf, ids), name
