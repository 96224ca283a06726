"""A tiny random-weight LFM2 and its GGUF file as llama.cpp's converter writes one
(conversion/lfm2.py LFM2Model on TextModel).

Six layers, attention in the third and sixth, short convolutions of 3 taps in the rest. What the
converter does: `num_key_value_heads` becomes one entry a layer, 0 for a convolution; the MLP width
is written as the model computes it (block_auto_adjust_ff_dim); the conv weight (C, 1, taps) is
squeezed to (C, taps); nothing is permuted (ggml's NEOX RoPE) and no norm is shifted; the final
norm is named `token_embd_norm`.
With `moe`, LFM2 MoE (conversion/lfm2.py LFM2MoeModel, arch "lfm2moe"): eight experts, two a token,
after two dense layers, chosen by the sigmoid of the router's logits plus a per-expert bias
(`exp_probs_b.bias`), stacked one tensor per projection (tiny_gguf._stacked_experts).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as T
from tokenizers import Tokenizer

from tests.parity.tiny_gguf import _stacked_experts, _write_vocab, finish_file
from tests.parity.tiny_models import MAX_POSITIONS, VOCAB_SIZE, random_model

HIDDEN, FFN_CONFIG, HEADS, KV_HEADS, TAPS = 64, 192, 4, 2, 3
LAYER_TYPES = ("conv", "conv", "full_attention", "conv", "conv", "full_attention")
EXPERTS, PER_TOKEN, EXPERT_FFN, DENSE_LAYERS = 8, 2, 32, 2


def lfm2_config(moe: bool = False):
    import transformers as tf

    if moe:
        return tf.Lfm2MoeConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN_CONFIG,
                                moe_intermediate_size=EXPERT_FFN, num_experts=EXPERTS, num_experts_per_tok=PER_TOKEN,
                                num_dense_layers=DENSE_LAYERS, use_expert_bias=True, norm_topk_prob=True,
                                routed_scaling_factor=1.0, num_hidden_layers=len(LAYER_TYPES),
                                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                max_position_embeddings=MAX_POSITIONS, norm_eps=1e-5, conv_L_cache=TAPS,
                                layer_types=list(LAYER_TYPES), tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=0,
                                bos_token_id=None, pad_token_id=None)

    # intermediate 192 -> int(2 * 192 / 3) = 128, a multiple of block_multiple_of 64
    return tf.Lfm2Config(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN_CONFIG,
                         num_hidden_layers=len(LAYER_TYPES), num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=MAX_POSITIONS, norm_eps=1e-5, conv_L_cache=TAPS,
                         block_multiple_of=64, layer_types=list(LAYER_TYPES), tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=0,
                         bos_token_id=None, pad_token_id=None)


def tiny_lfm2_hf(seed: int = 0, moe: bool = False):
    """A random Lfm2ForCausalLM (Lfm2MoeForCausalLM), float32, eval mode: norm weights 1 + N(0, 0.2), every other
    weight N(0, 0.15) on top of the init (the conv's too, so a convolution read the wrong way
    round is far off); the experts' selection bias N(0, 0.05)."""
    model = random_model(lfm2_config(moe), seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):  # a buffer, zero at init: spread to change some choices
                b.copy_(0.05 * torch.randn_like(b))
    return model


def ffn_width(config) -> int:
    return lfm2_mlp_width(config.intermediate_size, config.block_multiple_of, config.block_ffn_dim_multiplier)


def lfm2_mlp_width(size: int, multiple: int, multiplier: float | None) -> int:
    width = int(2 * size / 3)
    if multiplier is not None:
        width = multiple * ((int(multiplier * width) + multiple - 1) // multiple)
    return width


def _moe(hf_model) -> bool:
    return hf_model.config.model_type == "lfm2_moe"


def gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LFM2MOE if _moe(hf_model) else gguf.MODEL_ARCH.LFM2,
                                     len(LAYER_TYPES))
    state, out = _stacked_experts(hf_model.state_dict(), legacy=False)
    for name, tensor in state.items():
        if name == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        if "conv.conv" in name:
            tensor = tensor.squeeze(1)
        if name.endswith(".expert_bias"):  # the converter's filter_tensors
            name += ".bias"
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise KeyError(f"no GGUF name for {name}")
        out[target] = tensor.float().numpy()
    return out


def _file_type(gguf_name: str, values: np.ndarray, q8_0: bool) -> T:
    """--outtype q8_0: 2- and 3-D weights Q8_0; norms, 1-D, the conv kernel (3 taps a row) and the router F32."""
    if not q8_0 or values.ndim <= 1 or "norm" in gguf_name or values.shape[-1] % 32 or "gate_inp" in gguf_name:
        return T.F32
    return T.Q8_0


def round_to_file(hf_model) -> None:
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            router = name.endswith("feed_forward.gate.weight")
            if p.dim() >= 2 and "norm" not in name and not router and p.shape[-1] % 32 == 0:
                rows = p.data.numpy()
                back = quants.dequantize(quants.quantize(rows, T.Q8_0), T.Q8_0).reshape(rows.shape)
                p.data.copy_(torch.from_numpy(back.astype(np.float32)))


def write_lfm2_gguf(path: Path, hf_model, tokenizer: Tokenizer, *, q8_0: bool = False) -> Path:
    c = hf_model.config
    w = GGUFWriter(path, "lfm2moe" if _moe(hf_model) else "lfm2")
    w.add_type("model")
    w.add_name("tiny-lfm2")
    w.add_block_count(len(LAYER_TYPES))
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv([KV_HEADS if t != "conv" else 0 for t in LAYER_TYPES])
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(c.vocab_size)
    w.add_shortconv_l_cache(TAPS)
    w.add_layer_norm_rms_eps(c.norm_eps)
    if _moe(hf_model):
        w.add_feed_forward_length(c.intermediate_size)
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(PER_TOKEN)
        w.add_expert_feed_forward_length(EXPERT_FFN)
        w.add_leading_dense_block_count(DENSE_LAYERS)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    else:
        w.add_feed_forward_length(ffn_width(c))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(w, tokenizer)
    finish_file(w, gguf_tensors(hf_model), lambda target, values: _file_type(target, values, q8_0))
    return path
