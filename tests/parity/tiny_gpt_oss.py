"""A tiny transformers gpt-oss as a GGUF file, the way llama.cpp's converter writes one
(conversion/gpt_oss.py): gate and up taken apart from transformers' interleaved gate_up
stack (gate the even columns), every expert stack transposed to (E, rows, K), the sinks as
`attn_sinks.weight`, the pre-MLP norm as `post_attention_norm`; the experts in MXFP4 (as the
released files hold them) or float32.

For MXFP4 the source model's experts are first rounded to what the file holds, so the file
and transformers compute the same weights.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as T
from tokenizers import Tokenizer

from tests.parity.tiny_gguf import _write_metadata, _write_vocab

_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.sinks": "attn_sinks", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "post_attention_norm", "mlp.router": "ffn_gate_inp"}
_NAME_RE = re.compile(r"(?:model\.)?(?:layers\.(\d+)\.)?(.+?)(?:\.(weight|bias))?")
_EXPERTS_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?")


def _expert_stacks(layer: str, kind: str, bias: bool, t: np.ndarray) -> dict[str, np.ndarray]:
    """transformers' (E, C, 2F) gate_up (interleaved), (E, F, C) down and their biases as the
    converter's (E, rows, K) stacks and (E, rows) biases."""
    suffix = "bias" if bias else "weight"
    if kind == "down_proj":
        return {f"blk.{layer}.ffn_down_exps.{suffix}": t if bias else t.transpose(0, 2, 1)}
    w = t if bias else t.transpose(0, 2, 1)  # (E, 2F[, C])
    return {f"blk.{layer}.ffn_gate_exps.{suffix}": w[:, ::2], f"blk.{layer}.ffn_up_exps.{suffix}": w[:, 1::2]}


def round_experts_to_mxfp4(hf_model) -> None:
    """Each expert weight (not bias) of the model set to its MXFP4 value along its input (C for
    gate_up, F for down), in place."""
    for layer in hf_model.model.layers:
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name)  # (E, K, N): rounded in blocks of 32 along K
            rows = p.data.transpose(1, 2).contiguous().numpy()  # (E, N, K)
            rounded = quants.dequantize(quants.quantize(rows, T.MXFP4), T.MXFP4).reshape(rows.shape)
            p.data.copy_(torch.from_numpy(rounded).transpose(1, 2))


def write_gpt_oss_gguf(path: Path, hf_model, tokenizer: Tokenizer, *, mxfp4: bool) -> Path:
    config = hf_model.config
    w = GGUFWriter(path, "gpt-oss")
    w.add_name("tiny-gpt-oss")
    _write_metadata(w, "gpt_oss", config)  # YaRN, the window, the experts' count and width
    _write_vocab(w, tokenizer)
    for name, tensor in hf_model.state_dict().items():
        t = tensor.float().numpy()
        if m := _EXPERTS_RE.fullmatch(name):
            layer, kind, bias = m.groups()
            for target, values in _expert_stacks(layer, kind, bool(bias), t).items():
                values = np.ascontiguousarray(values)
                if mxfp4 and not bias:
                    w.add_tensor(target, quants.quantize(values, T.MXFP4), raw_dtype=T.MXFP4)
                else:
                    w.add_tensor(target, values)
            continue
        layer, module, kind = _NAME_RE.fullmatch(name).groups()
        target = _NAMES[module]
        target = f"blk.{layer}.{target}" if layer is not None else target
        w.add_tensor(f"{target}.{kind or 'weight'}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
