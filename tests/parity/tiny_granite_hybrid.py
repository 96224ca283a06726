"""A tiny random-weight Granite 4.0-H and its GGUF file as llama.cpp's converter writes one
(conversion/granite.py GraniteHybridModel on Mamba2Model and GraniteMoeModel).

Six layers, attention in the third and sixth, Mamba-2 mixers (8 heads of 16 in 2 groups, a state of
16) in the rest. What the converter does: `num_key_value_heads` becomes one entry a layer, 0 for a
Mamba-2 layer; the conv weight (C, 1, taps) is squeezed to (C, taps), A_log becomes A = -exp(A_log),
A and D are reshaped to (heads, 1) and the gated norm's weight to (groups, width / groups); q and k
rows are permuted as Llama's; the shared MLP's input_linear is split into gate and up, named as the
dense MLP where the model has no experts (`ffn_gate`), else as the shared expert (`ffn_gate_shexp`);
the experts' stacks one tensor per projection; RoPE is off (`rope.scaling.finetuned` false) unless the
model is Bamba's kind (`rope`).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as T
from tokenizers import Tokenizer

from tests.parity.tiny_gguf import _stacked_experts, _write_vocab, finish_file, llama_cpp_permute
from tests.parity.tiny_models import MAX_POSITIONS, VOCAB_SIZE, random_model

HIDDEN, HEADS, KV_HEADS, SHARED_FFN = 64, 4, 2, 96
MAMBA_HEADS, MAMBA_HEAD_DIM, STATE, GROUPS, TAPS = 8, 16, 16, 2, 4
LAYER_TYPES = ("mamba", "mamba", "attention", "mamba", "mamba", "attention")
EXPERTS, PER_TOKEN, EXPERT_FFN = 8, 2, 32
MULTIPLIERS = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.0625,
                   logits_scaling=6.0)


def granite_hybrid_config(moe: bool = False, rope: bool = False):
    import transformers as tf

    return tf.GraniteMoeHybridConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=EXPERT_FFN, shared_intermediate_size=SHARED_FFN,
        num_local_experts=EXPERTS if moe else 0, num_experts_per_tok=PER_TOKEN, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, layer_types=list(LAYER_TYPES),
        mamba_n_heads=MAMBA_HEADS, mamba_d_head=MAMBA_HEAD_DIM, mamba_d_state=STATE, mamba_n_groups=GROUPS,
        mamba_d_conv=TAPS, mamba_expand=2, mamba_conv_bias=True, mamba_proj_bias=False,
        position_embedding_type="rope" if rope else None, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True, eos_token_id=0,
        bos_token_id=None, pad_token_id=None, **MULTIPLIERS)


def tiny_granite_hybrid_hf(seed: int = 0, moe: bool = False, rope: bool = False):
    """A random GraniteMoeHybridForCausalLM (tiny_models.random_model: A_log's log(1..8), D's and
    dt_bias's ones moved too)."""
    return random_model(granite_hybrid_config(moe, rope), seed)


_MAMBA = {"in_proj.weight": "ssm_in.weight", "conv1d.weight": "ssm_conv1d.weight", "conv1d.bias": "ssm_conv1d.bias",
          "dt_bias": "ssm_dt.bias", "A_log": "ssm_a", "D": "ssm_d", "norm.weight": "ssm_norm.weight",
          "out_proj.weight": "ssm_out.weight"}
_REST = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "block_sparse_moe.router.weight": "ffn_gate_inp.weight"}


def mamba2_tensor(part: str, w: np.ndarray, groups: int) -> tuple[str, np.ndarray]:
    """A Mamba-2 mixer's tensor (its name inside the mixer) as Mamba2Model.modify_tensors writes it."""
    if part == "conv1d.weight":
        w = w.squeeze(1)
    elif part == "A_log":
        w = -np.exp(w)
    if part in ("A_log", "D"):
        w = w.reshape(-1, 1)
    elif part == "norm.weight":
        w = w.reshape(groups, -1)
    return _MAMBA[part], w


def gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    moe = hf_model.config.num_local_experts > 0
    state, out = _stacked_experts(hf_model.state_dict(), legacy=False)
    for name, tensor in state.items():
        w = tensor.float().numpy()
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            out["token_embd.weight" if "embed" in name else "output_norm.weight"] = w
            continue
        if name == "lm_head.weight":
            continue  # tied
        layer, part = name.removeprefix("model.layers.").split(".", 1)
        blk = f"blk.{layer}."
        if part.startswith("mamba."):
            gguf_name, w = mamba2_tensor(part.removeprefix("mamba."), w, GROUPS)
            out[blk + gguf_name] = w
        elif part == "shared_mlp.input_linear.weight":
            gate, up = np.split(w, 2)
            suffix = "_shexp" if moe else ""
            out[f"{blk}ffn_gate{suffix}.weight"], out[f"{blk}ffn_up{suffix}.weight"] = gate, up
        elif part == "shared_mlp.output_linear.weight":
            out[f"{blk}ffn_down{'_shexp' if moe else ''}.weight"] = w
        else:
            if part == "self_attn.q_proj.weight":
                w = llama_cpp_permute(w, HEADS)
            elif part == "self_attn.k_proj.weight":
                w = llama_cpp_permute(w, KV_HEADS)
            out[blk + _REST[part]] = w
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _file_type(gguf_name: str, values: np.ndarray, q8_0: bool) -> T:
    """--outtype q8_0: 2- and 3-D weights Q8_0; norms, 1-D, the conv kernel (4 taps a row), A, D and the
    router F32."""
    if (not q8_0 or values.ndim <= 1 or "norm" in gguf_name or values.shape[-1] % 32 or "gate_inp" in gguf_name
            or "ssm_conv1d" in gguf_name):
        return T.F32
    return T.Q8_0


def round_to_file(hf_model) -> None:
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.dim() >= 2 and "norm" not in name and "router" not in name and "conv1d" not in name \
                    and p.shape[-1] % 32 == 0:
                rows = p.data.numpy()
                back = quants.dequantize(quants.quantize(rows, T.Q8_0), T.Q8_0).reshape(rows.shape)
                p.data.copy_(torch.from_numpy(back.astype(np.float32)))


def write_granite_hybrid_gguf(path: Path, hf_model, tokenizer: Tokenizer, *, q8_0: bool = False) -> Path:
    c = hf_model.config
    moe = c.num_local_experts > 0
    w = GGUFWriter(path, "granitehybrid")
    w.add_type("model")
    w.add_name("tiny-granite-hybrid")
    w.add_block_count(len(LAYER_TYPES))
    rope = c.position_embedding_type == "rope"
    w.add_context_length(c.max_position_embeddings if rope else 2**20)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(EXPERT_FFN)  # the config's intermediate_size: the experts', in a dense model too
    w.add_head_count(HEADS)
    w.add_head_count_kv([KV_HEADS if t == "attention" else 0 for t in LAYER_TYPES])
    w.add_rope_freq_base(10000.0)
    w.add_rope_scaling_finetuned(rope)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(c.vocab_size)
    w.add_attention_scale(c.attention_multiplier)
    w.add_embedding_scale(c.embedding_multiplier)
    w.add_residual_scale(c.residual_multiplier)
    w.add_logit_scale(c.logits_scaling)
    if moe:
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(PER_TOKEN)
        w.add_expert_shared_feed_forward_length(SHARED_FFN)
    return finish_mamba2_file(w, gguf_tensors(hf_model), tokenizer, q8_0, path)


def finish_mamba2_file(w: GGUFWriter, tensors: dict[str, np.ndarray], tokenizer: Tokenizer, q8_0: bool,
                       path: Path) -> Path:
    """The Mamba-2 mixers' keys (the tiny families all have 8 heads of 16 in 2 groups, a state of 16,
    4 taps), the vocabulary, then the tensors."""
    w.add_ssm_conv_kernel(TAPS)
    w.add_ssm_state_size(STATE)
    w.add_ssm_group_count(GROUPS)
    w.add_ssm_inner_size(MAMBA_HEADS * MAMBA_HEAD_DIM)
    w.add_ssm_time_step_rank(MAMBA_HEADS)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(w, tokenizer)
    finish_file(w, tensors, lambda target, values: _file_type(target, values, q8_0))
    return path
