"""HF config.json reading (4.x and 5.x spellings), GGUF name tables, the lean GGUF reader
against gguf-py's, and the registry's error for unknown architectures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from textmill.loader import load_model
from textmill.loader.bundled import bundled_model_path
from textmill.loader.gguf import read_config
from textmill.loader.gguf_file import GGUFFile, StringArray
from textmill.loader.hf_config import config_from_dict, pattern_of_layers, read_hf_config
from textmill.loader.names import gguf_param_name, hf_param_name, hf_to_model_layout
from textmill.models.registry import MODEL_CLASSES, build_model, resolve_architecture

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
# Gemma 3 1B's config.json as the Hub serves it (transformers 4.x spelling).
GEMMA3_HUB = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
              "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
              "rope_local_base_freq": 10000, "rope_scaling": None, "sliding_window": 512,
              "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
              "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
              "attn_logit_softcapping": None}


def test_llama_legacy_keys_and_linear_scaling() -> None:
    c = config_from_dict(LLAMA | {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0},
                                  "tie_word_embeddings": True}, name="x")
    assert (c.architecture, c.head_dim, c.rope_theta, c.rope_scaling_factor) == ("llama", 16, 500000.0, 4.0)
    assert c.tie_word_embeddings and c.name == "x" and c.sliding_window is None and c.hidden_act == "silu"


def test_rope_parameters_of_transformers_5() -> None:
    c = config_from_dict(LLAMA | {"rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert (c.rope_theta, c.rope_scaling_factor) == (1234.0, None)


@pytest.mark.parametrize("scaling", [{"rope_type": "dynamic", "factor": 2.0}, {"type": "ntk", "factor": 4.0}])
def test_unsupported_rope_scaling_is_refused(scaling) -> None:
    with pytest.raises(ValueError, match="RoPE scaling .* is not supported"):
        config_from_dict(LLAMA | {"rope_scaling": scaling})


YARN_SETTINGS = {
    "qwen3-128k": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "ministral3": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                   "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
    "explicit": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
                 "attention_factor": 1.3},
    "mscales": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.707,
                "mscale_all_dim": 0.707 * 1.5},
}


@pytest.mark.parametrize("name", sorted(YARN_SETTINGS))
def test_yarn_rope_matches_transformers(name: str) -> None:
    """YaRN's divisors give transformers' own inverse frequencies, and its cos/sin factor
    transformers' attention factor; Ministral 3's window stops at its original context."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = YARN_SETTINGS[name] | {"rope_theta": 1000000.0}
    raw = LLAMA | {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "max_position_embeddings": 131072, "rope_parameters": scaling}
    c = config_from_dict(raw)
    reference = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"} | {
        "rope_parameters": {k: v for k, v in scaling.items() if k != "llama_4_scaling_beta"} | {"rope_type": "yarn"}})
    expected, attention = ROPE_INIT_FUNCTIONS["yarn"](reference, "cpu")
    base = 1.0 / c.rope_theta ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    got = base / torch.tensor(c.rope_freq_factors, dtype=torch.float64)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=0)
    assert c.rope_attention_factor == pytest.approx(attention, rel=1e-6)
    assert 1.0 in c.rope_freq_factors and scaling["factor"] in c.rope_freq_factors  # both ends of the ramp
    assert c.max_position_embeddings == (16384 if name == "ministral3" else 131072)


def test_llama3_rope_factors_match_transformers() -> None:
    """Llama 3.2 1B's rope_scaling: our divisors give transformers' own inverse frequencies."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    raw = LLAMA | {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "rope_theta": 500000.0, "rope_scaling": scaling, "max_position_embeddings": 131072}
    c = config_from_dict(raw)
    reference = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](reference, "cpu")
    base = 1.0 / c.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    got = base / torch.tensor(c.rope_freq_factors, dtype=torch.float64)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=0)
    assert c.rope_scaling_factor is None and len(c.rope_freq_factors) == 32


def test_tied_head_follows_the_checkpoint_when_config_is_silent() -> None:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    assert config_from_dict(LLAMA, names).tie_word_embeddings
    assert not config_from_dict(LLAMA, names + ["lm_head.weight"]).tie_word_embeddings


def test_mistral_window_and_qwen2_bias() -> None:
    m = config_from_dict(LLAMA | {"architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    assert (m.architecture, m.sliding_window) == ("llama", 4096)
    q = config_from_dict(LLAMA | {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
                                  "use_sliding_window": False, "max_window_layers": 21})
    assert (q.architecture, q.attention_bias, q.sliding_window) == ("qwen2", True, None)
    with pytest.raises(ValueError, match="some layers only"):
        config_from_dict(LLAMA | {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64,
                                  "use_sliding_window": True, "max_window_layers": 1})


def test_gemma3_hub_config() -> None:
    c = config_from_dict(GEMMA3_HUB)
    assert c.architecture == "gemma3" and c.hidden_act == "gelu_tanh"
    assert (c.rope_theta, c.rope_local_theta, c.sliding_window, c.sliding_window_pattern) == (1e6, 1e4, 512, 6)
    assert (c.query_pre_attn_scalar, c.final_logit_softcap, c.tie_word_embeddings) == (256.0, None, True)


def test_gemma3_layer_types_give_the_pattern() -> None:
    types = ["sliding_attention"] * 5 + ["full_attention"]
    c = config_from_dict(GEMMA3_HUB | {"num_hidden_layers": 12, "layer_types": types * 2})
    assert c.sliding_window_pattern == 6
    assert pattern_of_layers([False, False]) == 1  # all global
    assert pattern_of_layers([True, True, True]) == 4  # all sliding
    with pytest.raises(ValueError, match="layout"):
        pattern_of_layers([True, False, False])


def test_gpt2_config() -> None:
    c = config_from_dict({"architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": 768,
                          "n_layer": 12, "n_head": 12, "n_positions": 1024, "n_inner": None,
                          "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5})
    assert (c.architecture, c.intermediate_size, c.head_dim, c.num_kv_heads, c.hidden_act) == (
        "gpt2", 3072, 64, 12, "gelu_tanh")
    assert c.tie_word_embeddings and c.max_position_embeddings == 1024


def test_refusals() -> None:
    with pytest.raises(ValueError, match="quantized .*gptq"):
        config_from_dict(LLAMA | {"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="unsupported model architecture 'Gemma3ForConditionalGeneration'"):
        config_from_dict(LLAMA | {"architectures": ["Gemma3ForConditionalGeneration"]})
    with pytest.raises(ValueError, match="activation 'relu'"):
        config_from_dict(LLAMA | {"hidden_act": "relu"})


def test_partial_rotary_in_either_spelling() -> None:
    """Phi-4-mini rotates 3/4 of each head: transformers 4.x keeps the factor at the top level,
    5.x inside rope_parameters."""
    phi3 = LLAMA | {"architectures": ["Phi3ForCausalLM"]}  # head_dim 16
    assert config_from_dict(phi3).rotary_dim is None
    assert config_from_dict(phi3 | {"partial_rotary_factor": 0.75}).rotary_dim == 12
    assert config_from_dict(phi3 | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.75}}).rotary_dim == 12
    # Only Phi-3's network takes it (transformers' Llama and Qwen do not), and only to an even width.
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5 .* not supported for llama"):
        config_from_dict(LLAMA | {"partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="RoPE over 3 of 16"):
        config_from_dict(phi3 | {"partial_rotary_factor": 0.1875})


def test_longrope_config_of_the_hub() -> None:
    """Phi-3.5-mini's config.json (4.x spelling, factors cut to 2): the short factors for a
    window up to the original 4096 tokens, the long ones past it; attention factor
    sqrt(1 + ln 32 / ln 4096)."""
    phi35 = LLAMA | {"architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 131072,
                     "original_max_position_embeddings": 4096, "hidden_size": 16, "num_attention_heads": 4,
                     "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 9.0]}}
    full = config_from_dict(phi35)
    assert full.rope_freq_factors == (2.0, 9.0) and full.max_position_embeddings == 131072
    assert full.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    short = config_from_dict(phi35, context_window=4096)
    assert short.rope_freq_factors == (1.0, 1.5) and short.rope_attention_factor == full.rope_attention_factor
    # transformers 5.x writes rope_parameters beside a 4.x rope_scaling that still holds LongRoPE
    both = config_from_dict(phi35 | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert both.rope_freq_factors == (2.0, 9.0)
    with pytest.raises(ValueError, match="LongRoPE needs long_factor and short_factor of 2 values"):
        config_from_dict(phi35 | {"rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                   "long_factor": [2.0, 9.0]}})


def _header_only_gguf(path: Path, arch: str, **uint32s: int) -> Path:
    """A GGUF with a 64-wide, 4-head config (uint32s add or replace keys), RoPE base 1e4 and an
    embedding alone: enough for read_config."""
    from gguf import GGUFWriter

    keys = {"embedding_length": 64, "block_count": 1, "feed_forward_length": 128, "attention.head_count": 4,
            "context_length": 256} | uint32s
    w = GGUFWriter(str(path), arch)
    for key, value in keys.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gemma2_defaults_where_the_checkpoint_is_silent(tmp_path: Path) -> None:
    """llama.cpp and transformers both take Gemma 2's window (4096) and soft-caps (50, 30)
    when a file or config.json does not name them; an explicit null turns a cap off."""
    gemma2 = LLAMA | {"architectures": ["Gemma2ForCausalLM"], "hidden_activation": "gelu_pytorch_tanh"}
    c = config_from_dict(gemma2)
    assert (c.sliding_window, c.attn_logit_softcap, c.final_logit_softcap) == (4096, 50.0, 30.0)
    assert (c.sliding_window_pattern, c.qk_norm, c.rope_local_theta) == (2, False, c.rope_theta)
    assert config_from_dict(gemma2 | {"final_logit_softcapping": None}).final_logit_softcap is None
    path = _header_only_gguf(tmp_path / "gemma2.gguf", "gemma2", block_count=2, context_length=8192,
                             **{"attention.head_count_kv": 2})
    c = read_config(GGUFFile(path))
    assert (c.architecture, c.sliding_window, c.attn_logit_softcap, c.final_logit_softcap) == (
        "gemma2", 4096, 50.0, 30.0)
    assert (c.sliding_window_pattern, c.rope_local_theta, c.query_pre_attn_scalar, c.qk_norm) == (
        2, 10000.0, 16.0, False)


@pytest.mark.parametrize("arch, rope_dims, match", [("llama", 8, "RoPE over 8 of a head's 16 values"),
                                                     ("phi3", 7, "RoPE over 7 of a head's 16 values")])
def test_gguf_partial_rotary_only_where_llama_cpp_turns_the_same_pairs(tmp_path: Path, arch, rope_dims,
                                                                        match) -> None:
    """llama.cpp's interleaved RoPE (Llama's permuted rows) over part of a head turns other
    pairs than rotate-half would: only Phi-3's NEOX files take a partial rotary width."""
    path = _header_only_gguf(tmp_path / f"{arch}.gguf", arch, **{"rope.dimension_count": rope_dims})
    with pytest.raises(ValueError, match=match):
        read_config(GGUFFile(path))


def test_unknown_architecture_lists_every_supported_name() -> None:
    with pytest.raises(ValueError) as err:
        resolve_architecture("falcon")
    for name in ("LlamaForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM", "GPT2LMHeadModel", "MistralForCausalLM", "phi3", "gemma2", "gemma3", "gpt2",
                 "qwen2", "qwen3", "llama", "smollm3", "SmolLM3ForCausalLM", "granite", "GraniteForCausalLM",
                 "ernie4_5", "gemma", "GemmaForCausalLM", "mistral3", "Ministral3ForCausalLM", "qwen2vl", "qwen3vl",
                 "olmo2", "Olmo2ForCausalLM", "gemma4", "qwen35", "lfm2", "qwen35moe", "qwen3next", "lfm2moe", "glm4",
                 "granitehybrid", "nemotron_h", "falcon-h1"):
        assert name in str(err.value)
    assert set(MODEL_CLASSES) == {"llama", "phi3", "qwen2", "qwen3", "olmo2", "gemma", "gemma2", "gemma3", "gemma4",
                                  "qwen35", "lfm2", "glm4", "granitehybrid", "nemotron_h", "falcon_h1", "gpt2"}


def test_gguf_names_per_family() -> None:
    # Granite 4.0-H's Mamba-2 tensors: the convolution's weight and bias, A and D without a suffix
    assert gguf_param_name("granitehybrid", "blk.0.ssm_conv1d.bias") == "layers.0.mamba.conv1d.bias"
    assert gguf_param_name("granitehybrid", "blk.0.ssm_d") == "layers.0.mamba.D"
    assert gguf_param_name("granitehybrid", "blk.0.ssm_dt.bias") == "layers.0.mamba.dt_bias"
    assert gguf_param_name("falcon-h1", "blk.2.ffn_norm") == "layers.2.pre_ff_layernorm.weight"  # no .weight
    assert gguf_param_name("qwen2", "blk.1.attn_k.bias") == "layers.1.self_attn.k_proj.bias"
    assert gguf_param_name("qwen3", "blk.2.attn_q_norm.weight") == "layers.2.self_attn.q_norm.weight"
    assert gguf_param_name("gemma3", "blk.0.ffn_norm.weight") == "layers.0.pre_feedforward_layernorm.weight"
    assert gguf_param_name("gemma3", "blk.0.post_attention_norm.weight") == "layers.0.post_attention_layernorm.weight"
    assert gguf_param_name("gemma3", "blk.0.post_ffw_norm.weight") == "layers.0.post_feedforward_layernorm.weight"
    assert gguf_param_name("gemma3", "blk.2.attn_q_norm.weight") == "layers.2.self_attn.q_norm.weight"
    assert gguf_param_name("gpt2", "blk.3.attn_qkv.bias") == "h.3.attn.c_attn.bias"
    assert gguf_param_name("gpt2", "position_embd.weight") == "wpe.weight"
    with pytest.raises(ValueError, match="unexpected tensor 'blk.0.ffn_gate.weight'"):
        gguf_param_name("gpt2", "blk.0.ffn_gate.weight")


def test_hf_names_and_conv1d() -> None:
    assert hf_param_name("llama", "model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert hf_param_name("llama", "lm_head.weight") == "lm_head.weight"
    assert hf_param_name("llama", "model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert hf_param_name("gpt2", "h.0.attn.bias") is None  # the causal-mask buffer of old files
    assert hf_param_name("gpt2", "transformer.h.0.mlp.c_fc.weight") == "h.0.mlp.c_fc.weight"
    w = torch.arange(6.0).view(2, 3)  # Conv1D (in=2, out=3)
    assert hf_to_model_layout("gpt2", "h.0.mlp.c_fc.weight", w).shape == (3, 2)
    assert hf_to_model_layout("gpt2", "wte.weight", w).shape == (2, 3)


def test_every_family_builds_on_meta() -> None:
    for raw in (LLAMA, GEMMA3_HUB | {"num_hidden_layers": 2}):
        with torch.device("meta"):
            model = build_model(config_from_dict(raw))
        assert all(p.is_meta for p in model.parameters())


# --- the lean GGUF reader against gguf-py's -------------------------------------------------


def test_gguf_file_agrees_with_gguf_reader() -> None:
    path = bundled_model_path()
    ours, theirs = GGUFFile(path), GGUFReader(path, "r")
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        if isinstance(value, StringArray):
            assert len(value) == len(field.data), key
        else:
            expected = field.contents()
            assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected, key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.qtype, a.shape) == (b.name, b.tensor_type, tuple(int(n) for n in reversed(b.shape)))
        np.testing.assert_array_equal(a.data, np.asarray(b.data).reshape(-1).view(np.uint8))


def test_truncated_gguf_is_a_clear_error(tmp_path: Path) -> None:
    data = bundled_model_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="past the end of the file"):
        load_model(cut)


def test_read_hf_config_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert read_hf_config(tmp_path).name == tmp_path.name


def test_glm4_m_rope_files_are_refused(tmp_path) -> None:
    """GLM-4's M-RoPE files (its vision models' text) come with q/k rows the converter already
    reordered: read as GLM-4's own, their RoPE would turn the wrong pairs."""
    from tests.parity.tiny_gguf import write_gguf
    from tests.parity.tiny_models import tiny_hf_model, train_tokenizer
    from textmill.loader import load_model

    hf = tiny_hf_model("glm4")
    hf.config.rope_parameters = {**hf.config.rope_parameters, "mrope_section": [2, 2, 2]}
    path = write_gguf(tmp_path / "glm4v.gguf", "glm4", hf, train_tokenizer())
    with pytest.raises(ValueError, match="RoPE over 12 of a head's 24 values is not supported"):
        load_model(path)
