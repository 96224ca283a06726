"""A tiny random-weight Falcon-H1 and its GGUF file as llama.cpp's converter writes one
(conversion/falcon_h1.py FalconH1Model on Mamba2Model).

Three layers, each attention (4 query heads of 16, 2 KV heads, RoPE) beside a Mamba-2 mixer (8 heads of
16 in 2 groups, a state of 16), then a SwiGLU MLP, with muP multipliers other than 1. What the converter
does: every multiplier into the weights (the embedding's, the head's, q/k/v's with the key's, o's, the
mixer's input and output, each part of its projection [z | x | B | C | dt], the MLP's gate and down);
the Mamba-2 tensors as Granite 4.0-H's (tiny_granite_hybrid.mamba2_tensor); q and k unpermuted (ggml's
NEOX RoPE); the pre-MLP norm named `ffn_norm` without `.weight`. With `rms_norm`, the mixers have the
gated norm (`mamba_rms_norm`, gate before the norm); without, no ssm_norm tensor.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFWriter
from tokenizers import Tokenizer

from tests.parity.tiny_granite_hybrid import (GROUPS, MAMBA_HEAD_DIM, MAMBA_HEADS, STATE, TAPS, finish_mamba2_file,
                                              mamba2_tensor)
from tests.parity.tiny_models import MAX_POSITIONS, VOCAB_SIZE, random_model

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 96, 3
MULTIPLIERS = dict(attention_in_multiplier=0.8, key_multiplier=0.6, attention_out_multiplier=0.9,
                   ssm_in_multiplier=1.25, ssm_out_multiplier=0.7, ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9],
                   mlp_multipliers=[1.3, 0.6], embedding_multiplier=2.0, lm_head_multiplier=0.4)
_ATTENTION = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "feed_forward.gate_proj.weight": "ffn_gate.weight", "feed_forward.up_proj.weight": "ffn_up.weight",
              "feed_forward.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
              "pre_ff_layernorm.weight": "ffn_norm"}


def tiny_falcon_h1_hf(seed: int = 0, rms_norm: bool = False):
    """A random FalconH1ForCausalLM (tiny_models.random_model)."""
    import transformers as tf

    return random_model(tf.FalconH1Config(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        mamba_d_ssm=MAMBA_HEADS * MAMBA_HEAD_DIM, mamba_n_heads=MAMBA_HEADS, mamba_d_head=MAMBA_HEAD_DIM,
        mamba_d_state=STATE, mamba_n_groups=GROUPS, mamba_d_conv=TAPS, mamba_rms_norm=rms_norm,
        mamba_norm_before_gate=False, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
        tie_word_embeddings=False, eos_token_id=0, bos_token_id=None, pad_token_id=None, **MULTIPLIERS), seed)


def _multiplied(part: str, w: np.ndarray) -> np.ndarray:
    """conversion/falcon_h1.py's modify_tensors: the multipliers into the weights."""
    m = MULTIPLIERS
    if part.endswith("down_proj.weight"):
        return w * m["mlp_multipliers"][1]
    if part.endswith("gate_proj.weight"):
        return w * m["mlp_multipliers"][0]
    if part.endswith("k_proj.weight"):
        return w * m["key_multiplier"] * m["attention_in_multiplier"]
    if part.endswith(("q_proj.weight", "v_proj.weight")):
        return w * m["attention_in_multiplier"]
    if part.endswith("o_proj.weight"):
        return w * m["attention_out_multiplier"]
    if part.endswith("out_proj.weight"):
        return w * m["ssm_out_multiplier"]
    if part.endswith("in_proj.weight"):
        inner, gs = MAMBA_HEADS * MAMBA_HEAD_DIM, GROUPS * STATE
        w = w * m["ssm_in_multiplier"]
        for (start, end), factor in zip(((0, inner), (inner, 2 * inner), (2 * inner, 2 * inner + gs),
                                         (2 * inner + gs, 2 * inner + 2 * gs), (2 * inner + 2 * gs, len(w))),
                                        m["ssm_multipliers"]):
            w[start:end] *= factor
    return w


def gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    out = {}
    for name, tensor in hf_model.state_dict().items():
        w = tensor.float().numpy().copy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w * MULTIPLIERS["embedding_multiplier"]
        elif name == "lm_head.weight":
            out["output.weight"] = w * MULTIPLIERS["lm_head_multiplier"]
        elif name == "model.final_layernorm.weight":
            out["output_norm.weight"] = w
        else:
            layer, part = name.removeprefix("model.layers.").split(".", 1)
            w = _multiplied(part, w)
            if part.startswith("mamba."):
                gguf_name, w = mamba2_tensor(part.removeprefix("mamba."), w, GROUPS)
            else:
                gguf_name = _ATTENTION[part]
            out[f"blk.{layer}.{gguf_name}"] = w
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_falcon_h1_gguf(path: Path, hf_model, tokenizer: Tokenizer, *, q8_0: bool = False) -> Path:
    c = hf_model.config
    w = GGUFWriter(path, "falcon-h1")
    w.add_type("model")
    w.add_name("tiny-falcon-h1")
    w.add_block_count(LAYERS)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(c.vocab_size)
    return finish_mamba2_file(w, gguf_tensors(hf_model), tokenizer, q8_0, path)

