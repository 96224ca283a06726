"""A tiny random-weight Nemotron-H and its GGUF file as llama.cpp's converter writes one
(conversion/nemotron.py NemotronHModel on GraniteHybridModel).

Six layers, "M-M*-M": Mamba-2 mixers (8 heads of 16 in 2 groups, a state of 16) in the first, third
and last, ReLU^2 MLPs in the second and fifth, attention in the fourth. What the converter does: one
`head_count_kv` and one `feed_forward_length` entry a layer (0 where the layer has none of it); the
Mamba-2 tensors as Granite 4.0-H's (tiny_granite_hybrid.mamba2_tensor); q and k rows permuted as
Llama's; each layer's one norm is `attn_norm`; RoPE off (`rope.scaling.finetuned` false); an untied head.
With `moe`, Nemotron 3 Nano's kind (`nemotron_h_moe`): the MLP layers are 8 ReLU^2 experts of 32, 2 a
token by a sigmoid router with a selection bias (`exp_probs_b`), weights renormalized and times 2.5,
beside a shared expert of 64; the experts stacked one tensor per projection.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFWriter
from tokenizers import Tokenizer

from tests.parity.tiny_gguf import llama_cpp_permute
from tests.parity.tiny_granite_hybrid import (GROUPS, MAMBA_HEAD_DIM, MAMBA_HEADS, STATE, TAPS, finish_mamba2_file,
                                              mamba2_tensor)
from tests.parity.tiny_models import MAX_POSITIONS, VOCAB_SIZE, random_model

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 96
LAYER_TYPES = ("mamba", "mlp", "mamba", "attention", "mlp", "mamba")
EXPERTS, PER_TOKEN, EXPERT_FFN, SHARED_FFN, ROUTED_SCALE = 8, 2, 32, 64, 2.5
_ATTENTION = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "up_proj": "ffn_up", "down_proj": "ffn_down", "shared_experts.up_proj": "ffn_up_shexp",
              "shared_experts.down_proj": "ffn_down_shexp"}
_ROUTER = {"mixer.gate.weight": "ffn_gate_inp.weight", "mixer.gate.e_score_correction_bias": "exp_probs_b.bias"}


def tiny_nemotron_h_hf(seed: int = 2, moe: bool = False):
    """A random NemotronHForCausalLM (tiny_models.random_model; the experts' selection bias N(0, 0.05))."""
    import transformers as tf

    experts = dict(n_routed_experts=EXPERTS, num_experts_per_tok=PER_TOKEN, moe_intermediate_size=EXPERT_FFN,
                   moe_shared_expert_intermediate_size=SHARED_FFN, routed_scaling_factor=ROUTED_SCALE, n_group=1,
                   topk_group=1, norm_topk_prob=True) if moe else {}
    model = random_model(tf.NemotronHConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, layers_block_type=_layer_types(moe), num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=FFN, mamba_num_heads=MAMBA_HEADS,
        mamba_head_dim=MAMBA_HEAD_DIM, ssm_state_size=STATE, n_groups=GROUPS, conv_kernel=TAPS, use_conv_bias=True,
        max_position_embeddings=MAX_POSITIONS, layer_norm_epsilon=1e-5, tie_word_embeddings=False, eos_token_id=0,
        bos_token_id=None, pad_token_id=None, **experts), seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero at init: spread to change some choices
                b.copy_(0.05 * torch.randn_like(b))
    return model


def _layer_types(moe: bool) -> list[str]:
    return [("moe" if moe else "mlp") if t == "mlp" else t for t in LAYER_TYPES]


def _moe(hf_model) -> bool:
    return "moe" in hf_model.config.layers_block_type


def gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    out = {}
    for name, tensor in hf_model.state_dict().items():
        w = tensor.float().numpy()
        globals_ = {"model.embeddings.weight": "token_embd.weight", "model.norm_f.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}
        if name in globals_:
            out[globals_[name]] = w
            continue
        layer, part = name.removeprefix("model.layers.").split(".", 1)
        blk, kind = f"blk.{layer}.", LAYER_TYPES[int(layer)]
        if part == "norm.weight":
            out[blk + "attn_norm.weight"] = w
        elif part.startswith("mixer.experts."):  # (E, rows, K) stacks
            out[f"{blk}ffn_{part.removeprefix('mixer.experts.').removesuffix('_proj')}_exps.weight"] = w
        elif part in _ROUTER:
            out[blk + _ROUTER[part]] = w
        elif kind == "mamba":
            gguf_name, w = mamba2_tensor(part.removeprefix("mixer."), w, GROUPS)
            out[blk + gguf_name] = w
        else:
            module = part.removeprefix("mixer.").removesuffix(".weight")
            if module in ("q_proj", "k_proj"):
                w = llama_cpp_permute(w, HEADS if module == "q_proj" else KV_HEADS)
            out[f"{blk}{_ATTENTION[module]}.weight"] = w
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_nemotron_h_gguf(path: Path, hf_model, tokenizer: Tokenizer, *, q8_0: bool = False) -> Path:
    c = hf_model.config
    moe = _moe(hf_model)
    w = GGUFWriter(path, "nemotron_h_moe" if moe else "nemotron_h")
    w.add_type("model")
    w.add_name("tiny-nemotron-h")
    w.add_block_count(len(LAYER_TYPES))
    w.add_context_length(2**20)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length([(EXPERT_FFN if moe else FFN) if t == "mlp" else 0 for t in LAYER_TYPES])
    if moe:
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(PER_TOKEN)
        w.add_expert_feed_forward_length(EXPERT_FFN)
        w.add_expert_shared_feed_forward_length(SHARED_FFN)
        w.add_expert_shared_count(1)
        w.add_expert_weights_norm(True)
        w.add_expert_weights_scale(ROUTED_SCALE)
        w.add_expert_group_count(1)
    w.add_head_count(HEADS)
    w.add_head_count_kv([KV_HEADS if t == "attention" else 0 for t in LAYER_TYPES])
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_scaling_finetuned(False)
    w.add_layer_norm_rms_eps(c.layer_norm_epsilon)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(c.vocab_size)
    return finish_mamba2_file(w, gguf_tensors(hf_model), tokenizer, q8_0, path)
