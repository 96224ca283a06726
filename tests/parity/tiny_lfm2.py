"""A tiny random-weight LFM2 and its GGUF file as llama.cpp's converter writes one
(conversion/lfm2.py LFM2Model on TextModel).

Six layers, attention in the third and sixth, short convolutions of 3 taps in the rest. What the
converter does: `num_key_value_heads` becomes one entry a layer, 0 for a convolution; the MLP width
is written as the model computes it (block_auto_adjust_ff_dim); the conv weight (C, 1, taps) is
squeezed to (C, taps); nothing is permuted (ggml's NEOX RoPE) and no norm is shifted; the final
norm is named `token_embd_norm`.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as T
from tokenizers import Tokenizer

from tests.parity.tiny_gguf import _write_vocab, finish_file
from tests.parity.tiny_models import MAX_POSITIONS, VOCAB_SIZE

HIDDEN, FFN_CONFIG, HEADS, KV_HEADS, TAPS = 64, 192, 4, 2, 3
LAYER_TYPES = ("conv", "conv", "full_attention", "conv", "conv", "full_attention")


def lfm2_config():
    import transformers as tf

    # intermediate 192 -> int(2 * 192 / 3) = 128, a multiple of block_multiple_of 64
    return tf.Lfm2Config(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN_CONFIG,
                         num_hidden_layers=len(LAYER_TYPES), num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=MAX_POSITIONS, norm_eps=1e-5, conv_L_cache=TAPS,
                         block_multiple_of=64, layer_types=list(LAYER_TYPES), tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=0,
                         bos_token_id=None, pad_token_id=None)


def tiny_lfm2_hf(seed: int = 0):
    """A random Lfm2ForCausalLM, float32, eval mode: norm weights 1 + N(0, 0.2), every other
    weight N(0, 0.15) on top of the init (the conv's too, so a convolution read the wrong way
    round is far off)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(lfm2_config(), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) * 0.15)
    return model.eval().requires_grad_(False)


def ffn_width(config) -> int:
    return lfm2_mlp_width(config.intermediate_size, config.block_multiple_of, config.block_ffn_dim_multiplier)


def lfm2_mlp_width(size: int, multiple: int, multiplier: float | None) -> int:
    width = int(2 * size / 3)
    if multiplier is not None:
        width = multiple * ((int(multiplier * width) + multiple - 1) // multiple)
    return width


def gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LFM2, len(LAYER_TYPES))
    out = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        if "conv.conv" in name:
            tensor = tensor.squeeze(1)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise KeyError(f"no GGUF name for {name}")
        out[target] = tensor.float().numpy()
    return out


def _file_type(gguf_name: str, values: np.ndarray, q8_0: bool) -> T:
    """--outtype q8_0: 2-D weights Q8_0, norms, 1-D and the conv kernel (3 taps a row) F32."""
    if not q8_0 or values.ndim <= 1 or "norm" in gguf_name or values.shape[-1] % 32:
        return T.F32
    return T.Q8_0


def round_to_file(hf_model) -> None:
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.dim() == 2 and "norm" not in name and p.shape[-1] % 32 == 0:
                rows = p.data.numpy()
                back = quants.dequantize(quants.quantize(rows, T.Q8_0), T.Q8_0).reshape(rows.shape)
                p.data.copy_(torch.from_numpy(back.astype(np.float32)))


def write_lfm2_gguf(path: Path, hf_model, tokenizer: Tokenizer, *, q8_0: bool = False) -> Path:
    c = hf_model.config
    w = GGUFWriter(path, "lfm2")
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
    w.add_feed_forward_length(ffn_width(c))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(w, tokenizer)
    finish_file(w, gguf_tensors(hf_model), lambda target, values: _file_type(target, values, q8_0))
    return path
