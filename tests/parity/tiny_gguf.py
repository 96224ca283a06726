"""Write a tiny transformers model as a GGUF file, the way llama.cpp's converter does.

This restates convert_hf_to_gguf.py for the families we test (names from gguf-py's tensor
map, q/k row permutation for Llama, SmolLM3, Granite and Ministral 3, +1 on Gemma norms,
GPT-2's Conv1D weights transposed to (out, in)), independently of textmill.loader.names, so
that a wrong entry in either shows up as a parity failure: transformers reads the same file
with its own name tables.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import gguf
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as T
from tokenizers import Tokenizer

# HF module path (after "model." / "transformer.") -> GGUF name, per family.
_DECODER = {
    "embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
}
NAMES = {
    "llama": _DECODER | {"post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp"},
    "smollm3": _DECODER | {"post_attention_layernorm": "ffn_norm"},
    "mistral3": _DECODER | {"post_attention_layernorm": "ffn_norm"},
    "exaone": _DECODER | {"post_attention_layernorm": "ffn_norm"},  # conversion/exaone.py: rows as they are
    "internlm2": _DECODER | {"post_attention_layernorm": "ffn_norm"},  # conversion/internlm.py: wqkv split
    "granite": _DECODER | {"post_attention_layernorm": "ffn_norm"},
    "gemma": _DECODER | {"post_attention_layernorm": "ffn_norm"},  # Gemma 1's pre-MLP norm
    "ernie4_5": _DECODER | {"post_attention_layernorm": "ffn_norm"},  # rows as they are (conversion/ernie.py)
    "qwen2": _DECODER | {"post_attention_layernorm": "ffn_norm"},
    "phi3": _DECODER | {"post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attn_qkv",
                        "mlp.gate_up_proj": "ffn_up"},
    # conversion/glm.py: rows as they are (ggml's RoPE pairs 2i, 2i + 1 as GLM's), gate and up in one ffn_up
    "glm4": _DECODER | {"post_self_attn_layernorm": "post_attention_norm", "post_attention_layernorm": "ffn_norm",
                        "post_mlp_layernorm": "post_ffw_norm", "mlp.gate_up_proj": "ffn_up"},
    "olmo2": {k: v for k, v in _DECODER.items() if k != "input_layernorm"} | {
        "post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},  # rows as they are (conversion/olmo.py)
    "exaone4": {k: v for k, v in _DECODER.items() if k != "input_layernorm"} | {
        "post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},  # conversion/exaone.py: rows as they are
    "qwen3": _DECODER | {"post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
                         "self_attn.k_norm": "attn_k_norm"},
    # the text models of Qwen2.5-VL and Qwen3-VL (conversion/qwen_vl.py: the vision tower goes to an mmproj file)
    "qwen2vl": _DECODER | {"post_attention_layernorm": "ffn_norm"},
    "qwen3vl": _DECODER | {"post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
                           "self_attn.k_norm": "attn_k_norm"},
    # experts stacked per layer (_stacked_experts); the router is ffn_gate_inp
    "qwen3moe": _DECODER | {"post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
                            "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"},
    "qwen2moe": _DECODER | {"post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
                            "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
                            "mlp.shared_expert.up_proj": "ffn_up_shexp",
                            "mlp.shared_expert.down_proj": "ffn_down_shexp",
                            "mlp.shared_expert_gate": "ffn_gate_inp_shexp"},
    "granitemoe": _DECODER | {"post_attention_layernorm": "ffn_norm", "block_sparse_moe.router": "ffn_gate_inp"},
    # rows as they are (conversion/ernie.py); the router's e_score_correction_bias: write_gguf
    "ernie4_5-moe": _DECODER | {"post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
                                "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
                                "mlp.shared_experts.up_proj": "ffn_up_shexp",
                                "mlp.shared_experts.down_proj": "ffn_down_shexp"},
    "olmoe": _DECODER | {"post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
                         "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"},
    "gemma3": _DECODER | {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    "gemma2": _DECODER | {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"},
    "gpt2": {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm",
             "lm_head": "output", "ln_1": "attn_norm", "attn.c_attn": "attn_qkv",
             "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up",
             "mlp.c_proj": "ffn_down"},
}
_NAME_RE = re.compile(r"(?:model\.|transformer\.)?(?:(?:layers|h)\.(\d+)\.)?(.+)\.(weight|bias)")


def gguf_name(family: str, hf_name: str) -> str:
    layer, module, kind = _NAME_RE.fullmatch(hf_name).groups()
    name = NAMES[family][module]
    return f"blk.{layer}.{name}.{kind}" if layer is not None else f"{name}.{kind}"


_EXPERTS_RE = re.compile(
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.experts\.(gate_up_proj|down_proj)")


def _stacked_experts(state: dict, legacy: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """The state without its experts, and the experts as the converters write them. transformers
    holds a layer's experts as (E, 2F, C) gate-and-up and (E, C, F) down stacks (it saves them
    per expert); the converter splits gate from up (conversion/qwen.py), one (E, rows, K)
    tensor per projection (`blk.0.ffn_gate_exps`), or with `legacy` each expert's own
    (`blk.0.ffn_gate.3`, older Mixtral files)."""
    rest, out = {}, {}
    for name, tensor in state.items():
        m = _EXPERTS_RE.fullmatch(name)
        if m is None:
            rest[name] = tensor
            continue
        layer, kind = m.groups()
        w = tensor.float().numpy()
        half = w.shape[1] // 2
        stacks = {"gate": w[:, :half], "up": w[:, half:]} if kind == "gate_up_proj" else {"down": w}
        for proj, stack in stacks.items():
            if legacy:
                out |= {f"blk.{layer}.ffn_{proj}.{e}.weight": np.ascontiguousarray(x) for e, x in enumerate(stack)}
            else:
                out[f"blk.{layer}.ffn_{proj}_exps.weight"] = np.ascontiguousarray(stack)
    return rest, out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def converted(family: str, hf_name: str, w: np.ndarray, config) -> np.ndarray:
    permuted = ("llama", "smollm3", "granite", "granitemoe", "mistral3", "internlm2")  # (LlamaModel.permute)
    if family in permuted and hf_name.endswith("q_proj.weight"):
        return llama_cpp_permute(w, config.num_attention_heads)
    if family in permuted and hf_name.endswith("k_proj.weight"):
        return llama_cpp_permute(w, config.num_key_value_heads)
    if family in ("gemma", "gemma2", "gemma3") and hf_name.endswith("norm.weight"):
        return w + 1.0
    if family == "gpt2" and re.search(r"(c_attn|c_proj|c_fc)\.weight$", hf_name):
        return np.ascontiguousarray(w.T)  # Conv1D (in, out) -> (out, in)
    return w


def llama3_rope_factors(config) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for rope_type "llama3", restated."""
    p = config.rope_parameters
    base, dim = p["rope_theta"], config.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_metadata(w: GGUFWriter, family: str, config) -> None:
    if family == "gpt2":
        w.add_block_count(config.n_layer)
        w.add_context_length(config.n_positions)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(4 * config.n_embd)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    params = config.rope_parameters
    w.add_rope_freq_base(params.get("full_attention", params)["rope_theta"])
    if family in ("llama", "llama3", "qwen3", "qwen3_yarn", "qwen3vl", "qwen3moe", "ministral3", "exaone4", "gemma",
                  "gemma2", "gemma3", "ernie4_5", "ernie4_5_moe", "gpt_oss", "glm4"):
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    if family == "phi3" and partial != 1.0:  # conversion/phi.py: int(rot_pct * n_embd) // n_head
        w.add_rope_dimension_count(int(partial * config.hidden_size) // config.num_attention_heads)
    if family == "glm4":  # conversion/glm.py: head_dim * partial_rotary_factor
        w.add_rope_dimension_count(int(config.head_dim * partial))
    rope = params.get("full_attention", params)
    if "mrope_section" in rope:  # M-RoPE's sections, padded to four, as the converter writes them
        w.add_rope_dimension_sections(list(rope["mrope_section"]) + [0] * (4 - len(rope["mrope_section"])))
    if family == "qwen3vl":
        w.add_uint32("qwen3vl.n_deepstack_layers", 1)
    if rope.get("rope_type") == "yarn":  # conversion/base.py, and mistral3.py's two keys
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if "attention_factor" in rope:
            w.add_rope_scaling_yarn_attn_factor(rope["attention_factor"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        if family == "ministral3":
            w.add_rope_scaling_yarn_log_mul(rope["mscale_all_dim"])
            w.add_attn_temperature_scale(rope["llama_4_scaling_beta"])
    if family in ("granite", "granitemoe"):  # conversion/granite.py: the _multiplier params as _scale keys
        w.add_attention_scale(config.attention_multiplier)
        w.add_embedding_scale(config.embedding_multiplier)
        w.add_residual_scale(config.residual_multiplier)
        w.add_logit_scale(config.logits_scaling)
    if family == "gemma2":  # as convert_hf_to_gguf.py writes them
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    if getattr(config, "sliding_window", None):
        w.add_sliding_window(config.sliding_window)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:  # conversion/base.py; the experts' width from qwen.py only (the others' is feed_forward_length)
        w.add_expert_count(experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        if family in ("qwen3moe", "qwen2moe", "ernie4_5_moe"):
            w.add_expert_feed_forward_length(config.moe_intermediate_size)
        if family == "ernie4_5_moe":  # conversion/ernie.py
            w.add_expert_shared_count(config.moe_num_shared_experts)
            # (the converter's own rule: intermediate_size over the kv heads)
            w.add_expert_shared_feed_forward_length(config.intermediate_size // config.num_key_value_heads)
            w.add_leading_dense_block_count(config.moe_layer_start_index)
            w.add_interleave_moe_layer_step(config.moe_layer_interval)
        if family == "gpt_oss":  # conversion/gpt_oss.py
            w.add_expert_feed_forward_length(config.intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if family == "olmo3":  # conversion/olmo.py: one flag per layer
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])


def _write_vocab(w: GGUFWriter, tokenizer: Tokenizer) -> None:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    model = tokenizer.to_str()
    import json

    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(model)["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)


def finish_file(w: GGUFWriter, tensors: dict[str, np.ndarray], qtype_of) -> None:
    """The tensors after the metadata `w` holds, each in the type qtype_of(name, values) gives it
    (F32 as they are, others quantized by gguf-py), then the file written and closed."""
    for target, values in tensors.items():
        qtype = qtype_of(target, values)
        if qtype == T.F32:
            w.add_tensor(target, values)
        else:
            w.add_tensor(target, quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(path: Path, family: str, hf_model, tokenizer: Tokenizer, *, name: str = "tiny",
               quantize_mlp: bool = False, legacy_experts: bool = False) -> Path:
    """The model's float32 weights (MLP weights, experts included, Q8_0 if asked) in a GGUF of its
    family; of a vision-language model, its text model's."""
    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    state = {n.replace("model.language_model.", "model."): t for n, t in hf_model.state_dict().items()
             if not n.startswith("model.visual.")}
    arch = {"mistral": "llama", "llama3": "llama", "qwen3_yarn": "qwen3", "ministral3": "mistral3",
            "olmo3": "olmo2", "mixtral": "llama", "ernie4_5_moe": "ernie4_5-moe"}.get(family, family)
    state, experts = _stacked_experts(state, legacy_experts)
    w = GGUFWriter(path, arch)
    w.add_name(name)
    _write_metadata(w, family, config)
    _write_vocab(w, tokenizer)
    tied = config.tie_word_embeddings
    if (getattr(config, "rope_parameters", None) or {}).get("rope_type") == "llama3":  # as the converters write it
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    rope = getattr(config, "rope_parameters", None) or {}
    if family == "phi3" and rope.get("rope_type") == "longrope":  # as conversion/phi.py writes LongRoPE
        original = rope["original_max_position_embeddings"]
        scale = config.max_position_embeddings / original
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("moe_statics.e_score_correction_bias"):  # (1, E) -> exp_probs_b, as gguf-py maps it
            layer = hf_name.split(".")[2]
            w.add_tensor(f"blk.{layer}.exp_probs_b.bias", tensor.float().numpy().reshape(-1))
            continue
        values = converted(arch, hf_name, tensor.float().numpy(), config)
        target = gguf_name(arch, hf_name)
        if quantize_mlp and values.ndim == 2 and "ffn_" in target:
            w.add_tensor(target, quants.quantize(values, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(target, values)
    for target, values in experts.items():
        if quantize_mlp:
            w.add_tensor(target, quants.quantize(values, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(target, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
