"""A tiny random-weight Qwen3.5 (dense text) and its GGUF file as llama.cpp's converter writes one
(conversion/qwen.py: Qwen3_5TextModel on _LinearAttentionVReorderBase on Qwen3NextModel).

Eight layers, every fourth full attention (its q_proj with a gate per head, a quarter of each head
turned by RoPE), the others gated delta nets with twice as many value heads as key heads, so the
converter's reordering of value heads (grouped by key head in the checkpoint, tiled in the file)
matters. What the converter does to the tensors, and this writer with it:
- A_log becomes A = -exp(A_log) (`ssm_a`), dt_bias `ssm_dt.bias`, the conv1d weight squeezed;
- every norm weight but the gated norm's (linear_attn.norm) gets 1 added;
- the value heads' rows (of in_proj_qkv's v part, in_proj_z, in_proj_a/b, the conv's v channels,
  A and dt_bias) and out_proj's columns move from grouped to tiled order.
With `moe`, Qwen3.5 MoE (conversion/qwen.py Qwen3_5MoeTextModel, arch "qwen35moe"): eight experts,
two a token, and a shared expert behind a sigmoid gate in every layer, the experts stacked one
tensor per projection (tiny_gguf._stacked_experts); no dense MLP width in the file.
With `next`, Qwen3-Next (conversion/qwen.py Qwen3NextModel, arch "qwen3next"): the same mixture, its
delta nets' q, k, v and z from one per-key-head projection (in_proj_qkvz, which the converter splits
into attn_qkv and attn_gate, value heads left grouped) and b and a from another (in_proj_ba, kept
whole as ssm_ba: each key head's b rows, then its a rows); no M-RoPE sections.
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
from tests.parity.tiny_models import MAX_POSITIONS, VOCAB_SIZE

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 4, 2, 16
LAYERS, INTERVAL = 8, 4
K_HEADS, V_HEADS, K_DIM, V_DIM, CONV = 2, 4, 16, 16, 4
ROTARY_FACTOR = 0.25
EXPERTS, PER_TOKEN, EXPERT_FFN, SHARED_FFN = 8, 2, 32, 64  # widths of whole Q8_0 blocks


def qwen35_config(moe: bool = False, next: bool = False):
    import transformers as tf

    if next:
        return tf.Qwen3NextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=EXPERT_FFN, num_experts=EXPERTS,
            num_experts_per_tok=PER_TOKEN, moe_intermediate_size=EXPERT_FFN, shared_expert_intermediate_size=SHARED_FFN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
            linear_key_head_dim=K_DIM, linear_value_head_dim=V_DIM, linear_num_key_heads=K_HEADS,
            linear_num_value_heads=V_HEADS, linear_conv_kernel_dim=CONV, full_attention_interval=INTERVAL,
            max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": ROTARY_FACTOR})
    if moe:
        sizes = dict(num_experts=EXPERTS, num_experts_per_tok=PER_TOKEN, moe_intermediate_size=EXPERT_FFN,
                     shared_expert_intermediate_size=SHARED_FFN)
    else:
        sizes = dict(intermediate_size=FFN)
    return (tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig)(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, **sizes, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, linear_key_head_dim=K_DIM,
        linear_value_head_dim=V_DIM, linear_num_key_heads=K_HEADS, linear_num_value_heads=V_HEADS,
        linear_conv_kernel_dim=CONV, full_attention_interval=INTERVAL, max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": ROTARY_FACTOR,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=0)


def tiny_qwen35_hf(seed: int = 0, moe: bool = False, next: bool = False):
    """A random Qwen3_5ForCausalLM (Qwen3_5MoeForCausalLM, Qwen3NextForCausalLM), float32, eval mode. Norm
    weights (1 + w norms, zero at init)
    N(0, 0.2) and the gated norm's 1 + N(0, 0.2), so a loader that adds or drops a 1 is far off;
    every other weight N(0, 0.15) on top of the init, A_log and dt_bias spread so the decays differ."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(qwen35_config(moe, next), dtype=torch.float32,
                                                attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith(("A_log", "dt_bias")):
                p.copy_(torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) * 0.15)
    return model.eval().requires_grad_(False)


def _tiled(x: torch.Tensor, dim: int, head_dim: int) -> torch.Tensor:
    """_reorder_v_heads: value heads grouped by key head -> tiled (v0 of each key head, then v1 ...)."""
    shape = list(x.shape)
    x = x.reshape(*shape[:dim], K_HEADS, V_HEADS // K_HEADS, head_dim, *shape[dim + 1:])
    return x.transpose(dim, dim + 1).reshape(shape)


def _value_heads_tiled(name: str, t: torch.Tensor) -> torch.Tensor:
    """_LinearAttentionVReorderBase: the value heads' rows (and out_proj's columns) grouped -> tiled."""
    qk = 2 * K_HEADS * K_DIM
    if ".in_proj_qkv." in name:
        return torch.cat([t[:qk], _tiled(t[qk:], 0, V_DIM)])
    if ".in_proj_z." in name:
        return _tiled(t, 0, V_DIM)
    if ".in_proj_a." in name or ".in_proj_b." in name:
        return _tiled(t, 0, 1)
    if name.endswith((".A_log", ".dt_bias")):
        return _tiled(t[:, None], 0, 1)[:, 0]
    if ".conv1d." in name:
        t = t.squeeze()
        return torch.cat([t[:qk], _tiled(t[qk:], 0, V_DIM)])
    if ".out_proj." in name:
        return _tiled(t, 1, V_DIM)
    return t


def _converted(name: str, t: torch.Tensor, tiled: bool = True) -> tuple[str, torch.Tensor]:
    """One HF tensor as the converter turns it (the value-head reordering, then Qwen3Next's rules)."""
    if tiled:
        t = _value_heads_tiled(name, t)
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.rpartition(".dt_bias")[0] + ".dt_proj.bias"
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    return name, t


ARCHS = {"qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe", "qwen3_next": "qwen3next"}  # model_type -> file's


def _moe(hf_model) -> bool:
    return ARCHS[hf_model.config.model_type] != "qwen35"


def _next(hf_model) -> bool:
    return ARCHS[hf_model.config.model_type] == "qwen3next"


def _next_converted(name: str, t: torch.Tensor, names) -> list[tuple[str, torch.Tensor]]:
    """Qwen3NextModel.modify_tensors, to GGUF names: no value-head reordering; in_proj_qkvz split per
    key head into attn_qkv (every q, every k, every v) and attn_gate."""
    if ".in_proj_qkvz." not in name:
        name, t = _converted(name, t.squeeze() if ".conv1d." in name else t, tiled=False)
        return [(names.get_name(name, try_suffixes=(".weight", ".bias")), t)]
    layer, rows = name.split(".")[2], t.shape[-1]
    r = V_DIM * V_HEADS // K_HEADS
    q, k, v, z = t.view(K_HEADS, -1, rows).split([K_DIM, K_DIM, r, r], dim=1)
    qkv = torch.cat([x.reshape(-1, rows) for x in (q, k, v)])
    return [(f"blk.{layer}.attn_qkv.weight", qkv), (f"blk.{layer}.attn_gate.weight", z.reshape(-1, rows))]


def gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHS[hf_model.config.model_type].upper()], LAYERS)
    state, out = _stacked_experts(hf_model.state_dict(), legacy=False)
    for name, tensor in state.items():
        if name == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        if _next(hf_model):
            out |= {target: values.numpy() for target, values in _next_converted(name, tensor.float(), names)}
            continue
        name, tensor = _converted(name, tensor.float())
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise KeyError(f"no GGUF name for {name}")
        out[target] = tensor.numpy()
    return out


def _file_type(gguf_name: str, values: np.ndarray, q8_0: bool) -> T:
    """--outtype q8_0: 2- and 3-D weights Q8_0 (rows of whole 32-value blocks), norms and 1-D F32; the
    converter keeps ssm_conv1d, ssm_a and ssm_dt float (Qwen3NextModel's tensor_force_quant), and the
    routers (ffn_gate_inp, ffn_gate_inp_shexp) as llama.cpp's quantizer does."""
    if not q8_0 or values.ndim <= 1 or "norm" in gguf_name or "ssm_conv1d" in gguf_name or "gate_inp" in gguf_name:
        return T.F32
    return T.Q8_0 if values.shape[-1] % 32 == 0 else T.F16


def _grouped(x: torch.Tensor, dim: int, head_dim: int) -> torch.Tensor:
    """The inverse of _tiled."""
    shape = list(x.shape)
    x = x.reshape(*shape[:dim], V_HEADS // K_HEADS, K_HEADS, head_dim, *shape[dim + 1:])
    return x.transpose(dim, dim + 1).reshape(shape)


def round_to_file(hf_model) -> None:
    """Each weight the Q8_0 file stores quantized set, in place, to its value read back. Blocks
    run along a row in the file's order: out_proj's columns are tiled there first."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            router = name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
            if p.dim() >= 2 and not name.endswith("norm.weight") and not router and p.shape[-1] % 32 == 0:
                tiled = ".out_proj." in name and not _next(hf_model)
                rows = (_tiled(p.data, 1, V_DIM) if tiled else p.data).numpy()
                back = torch.from_numpy(quants.dequantize(quants.quantize(rows, T.Q8_0), T.Q8_0)
                                        .reshape(rows.shape).astype(np.float32))
                p.data.copy_(_grouped(back, 1, V_DIM) if tiled else back)


def write_qwen35_gguf(path: Path, hf_model, tokenizer: Tokenizer, *, q8_0: bool = False,
                      layer_flags: bool = False, mtp_blocks: int = 0) -> Path:
    """The model as a "qwen35" ("qwen35moe", "qwen3next") GGUF. `layer_flags`: name the delta-net layers by
    `attention.recurrent_layers` (newer converters) instead of `full_attention_interval` alone;
    `mtp_blocks`: that many multi-token-prediction blocks after the layers (random; unread)."""
    c, arch = hf_model.config, ARCHS[hf_model.config.model_type]
    w = GGUFWriter(path, arch)
    w.add_type("model")
    w.add_name("tiny-qwen35")
    w.add_block_count(LAYERS + mtp_blocks)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(HIDDEN)
    if _moe(hf_model):
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(PER_TOKEN)
        w.add_expert_feed_forward_length(EXPERT_FFN)
        w.add_expert_shared_feed_forward_length(SHARED_FFN)
    else:
        w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_ssm_conv_kernel(CONV)
    w.add_ssm_state_size(K_DIM)
    w.add_ssm_group_count(K_HEADS)
    w.add_ssm_time_step_rank(V_HEADS)
    w.add_ssm_inner_size(V_DIM * V_HEADS)
    if layer_flags:
        w.add_array(f"{arch}.attention.recurrent_layers", [t == "linear_attention" for t in c.layer_types]
                    + [False] * mtp_blocks)
    w.add_full_attention_interval(INTERVAL)
    w.add_rope_dimension_count(int(HEAD_DIM * ROTARY_FACTOR))
    if not _next(hf_model):
        w.add_rope_dimension_sections([1, 1, 0, 0])
    if mtp_blocks:
        w.add_uint32(f"{arch}.nextn_predict_layers", mtp_blocks)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(w, tokenizer)
    tensors = gguf_tensors(hf_model)
    rng = np.random.default_rng(1)
    for i in range(LAYERS, LAYERS + mtp_blocks):
        tensors[f"blk.{i}.nextn.eh_proj.weight"] = rng.standard_normal((HIDDEN, 2 * HIDDEN)).astype(np.float32)
        tensors[f"blk.{i}.attn_q.weight"] = rng.standard_normal((2 * HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    finish_file(w, tensors, lambda target, values: _file_type(target, values, q8_0))
    return path
