"""The ModelConfig of a hybrid's GGUF file (recurrent layers beside attention), as llama.cpp's
converter writes one and its loader reads it.

Qwen3.5 (conversion/qwen.py Qwen3_5TextModel; src/models/qwen35.cpp):

The file says which layers are gated delta nets either as a per-layer array
(`attention.recurrent_layers`) or by an interval (`full_attention_interval`: every 4th layer
attends); the delta nets' shape is in the `ssm.*` keys. A file may end with multi-token-prediction
blocks (`nextn_predict_layers`), a draft head llama.cpp runs only on request: they are not layers
of the model here, and their tensors are left in the file. Qwen3.5 MoE (`qwen35moe`, 35B-A3B and
up; src/models/qwen35moe.cpp) is the same model with a mixture of experts in every layer: a
softmax router renormalized over the chosen, and a shared expert behind a sigmoid gate, Qwen2
MoE's (gguf_experts.py reads them). Its files need not give a dense MLP width. Qwen3-Next
(`qwen3next`, 80B-A3B; conversion/qwen.py Qwen3NextModel) came first and is the same but for its
delta nets: the converter leaves their value heads grouped by key head, and keeps beta's and
alpha's projections in one tensor, each key head's b rows then its a rows (`ssm_ba`).

LFM2 (conversion/lfm2.py LFM2Model; src/models/lfm2.cpp): a layer whose `attention.head_count_kv`
entry is 0 is a short convolution of `shortconv.l_cache` taps; the final norm is `token_embd_norm`
(llama.cpp's "fix for wrong tensor name"). LFM2 MoE (`lfm2moe`, 8B-A1B, 24B-A2B; src/models/lfm2moe.cpp)
has experts after its first few layers, chosen by the sigmoid of the router's logits plus a
per-expert bias and weighted by those sigmoids renormalized.

Granite 4.0-H (`granitehybrid`; conversion/granite.py GraniteHybridModel; src/models/granite-hybrid.cpp):
a layer whose `attention.head_count_kv` entry is 0 is a Mamba-2 mixer, shaped by the `ssm.*` keys
(`time_step_rank` is its head count, `group_count` B's and C's groups); Granite's multipliers as
granite_fields reads them, and `rope.scaling.finetuned` false (Granite 4.0-H's) turns RoPE off. The
MLP is dense (ffn_gate, ffn_up, ffn_down: the checkpoint's shared_mlp) or a mixture of experts with
that shared MLP as their ungated shared expert.

Nemotron-H (`nemotron_h`; conversion/nemotron.py NemotronHModel on GraniteHybridModel;
src/models/nemotron-h.cpp): one sublayer a layer, told by two per-layer arrays: 0 KV heads and 0 MLP
width is a Mamba-2 mixer, an MLP width an MLP layer (ReLU^2, no gate), the rest attention (no RoPE).
Nemotron 3 Nano (`nemotron_h_moe`): its MLP layers are experts and a shared expert (gguf_experts.py).

Falcon-H1 (`falcon-h1`; conversion/falcon_h1.py; src/models/falcon-h1.cpp): attention (NEOX RoPE,
unpermuted) and a Mamba-2 mixer in every layer, the muP multipliers already in the weights; a file
without `ssm_norm` tensors gates its mixers' output without the norm.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from textmill.config import ModelConfig
from textmill.linear_attention import LinearAttentionShape
from textmill.loader.gguf_experts import expert_fields
from textmill.loader.gguf_file import GGUFFile, GGUFMetadata
from textmill.loader.names import QWEN35_ARCHS


def qwen35_config(gguf: GGUFFile, meta: GGUFMetadata, vocab_size: int) -> ModelConfig:
    names = {t.name for t in gguf.tensors}
    layers = int(meta.arch_get("block_count")) - int(meta.arch_get("nextn_predict_layers", 0))
    flags = meta.arch_get("attention.recurrent_layers", None)
    if flags is not None:
        recurrent = tuple(i for i in range(layers) if flags[i])
    else:
        interval = int(meta.arch_get("full_attention_interval", 4))
        recurrent = tuple(i for i in range(layers) if (i + 1) % interval != 0)
    hidden, heads = int(meta.arch_get("embedding_length")), int(meta.arch_get("attention.head_count"))
    head_dim = int(meta.arch_get("attention.key_length", hidden // heads))
    if int(meta.arch_get("attention.value_length", head_dim)) != head_dim:
        raise ValueError("Qwen3.5 files whose keys and values differ in width are not supported")
    rope_dims = int(meta.arch_get("rope.dimension_count", head_dim))
    if meta.arch_get("rope.scaling.type", "none") not in ("none", None):
        raise ValueError("Qwen3.5 files with RoPE scaling are not supported")
    key_dim, key_heads = int(meta.arch_get("ssm.state_size")), int(meta.arch_get("ssm.group_count"))
    value_heads = int(meta.arch_get("ssm.time_step_rank"))
    inner = int(meta.arch_get("ssm.inner_size"))
    if inner % value_heads or value_heads % key_heads:
        raise ValueError(f"a linear attention of {inner} values in {value_heads} heads over {key_heads} "
                         "key heads is not a whole number of heads")
    shape = LinearAttentionShape(key_heads=key_heads, value_heads=value_heads, key_dim=key_dim,
                                 value_dim=inner // value_heads, conv_kernel=int(meta.arch_get("ssm.conv_kernel")))
    return ModelConfig(
        architecture="qwen35",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(meta.arch_get("feed_forward_length", 0)),  # none in a Qwen3.5 MoE file
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(meta.arch_get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta.arch_get("context_length")),
        norm_eps=float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.arch_get("rope.freq_base", 10_000_000.0)),
        rotary_dim=rope_dims if rope_dims < head_dim else None,
        tie_word_embeddings="output.weight" not in names,
        recurrent_layers=recurrent,
        linear_attention=shape,
        name=str(meta.get("general.name", "")),
    )


def _per_layer(meta: GGUFMetadata, key: str, layers: int) -> list[int]:
    value = meta.arch_get(key)
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * layers


def lfm2_config(gguf: GGUFFile, meta: GGUFMetadata, vocab_size: int) -> ModelConfig:
    names = {t.name for t in gguf.tensors}
    if any(name.startswith("dense_2_out") for name in names):
        raise ValueError("LFM2 embedding models (ColBERT's dense_2_out) are not supported")
    if any(name.endswith(".shortconv.in_proj.bias") for name in names):
        raise ValueError("LFM2 files with convolution biases are not supported")
    layers, heads = int(meta.arch_get("block_count")), int(meta.arch_get("attention.head_count"))
    kv = _per_layer(meta, "attention.head_count_kv", layers)
    attention = {h for h in kv if h}
    if len(attention) != 1:
        raise ValueError(f"LFM2 files whose attention layers differ in KV heads ({sorted(attention)}) "
                         "are not supported")
    hidden = int(meta.arch_get("embedding_length"))
    window = meta.arch_get("attention.sliding_window", None)
    return ModelConfig(
        architecture="lfm2",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(meta.arch_get("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=attention.pop(),
        head_dim=hidden // heads,
        max_position_embeddings=int(meta.arch_get("context_length")),
        norm_eps=float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.arch_get("rope.freq_base", 1_000_000.0)),
        tie_word_embeddings="output.weight" not in names,
        qk_norm=True,
        sliding_window=int(window) if window else None,
        recurrent_layers=tuple(i for i in range(layers) if not kv[i]),
        short_conv=int(meta.arch_get("shortconv.l_cache")),
        name=str(meta.get("general.name", "")),
    )


def granite_fields(meta: GGUFMetadata, num_layers: int) -> dict[str, Any]:
    """Granite's multipliers as llama.cpp reads them: a scale that is absent or 0 is not
    applied (the attention's is then head_dim ** -0.5); logit_scale is required. Its
    `rope.scaling.finetuned` false turns RoPE off in every layer."""
    def scale(key: str) -> float | None:
        value = float(meta.arch_get(key, 0.0))
        return value if value != 0.0 else None

    fields = dict(embedding_multiplier=scale("embedding_scale"), residual_multiplier=scale("residual_scale"),
                  attention_scale=scale("attention.scale"), logit_scale=float(meta.arch_get("logit_scale")))
    if not meta.arch_get("rope.scaling.finetuned", True):
        fields |= dict(no_rope_layers=tuple(range(num_layers)))
    return fields


def granitehybrid_config(gguf: GGUFFile, meta: GGUFMetadata, vocab_size: int) -> ModelConfig:
    shapes = {t.name: t.shape for t in gguf.tensors}
    layers, heads = int(meta.arch_get("block_count")), int(meta.arch_get("attention.head_count"))
    kv = _per_layer(meta, "attention.head_count_kv", layers)
    attention = {h for h in kv if h}
    if len(attention) > 1:
        raise ValueError(f"Granite 4.0-H files whose attention layers differ in KV heads ({sorted(attention)}) "
                         "are not supported")
    hidden = int(meta.arch_get("embedding_length"))
    head_dim = int(meta.arch_get("attention.key_length", hidden // heads))
    fields = granite_fields(meta, layers)
    if "no_rope_layers" not in fields and int(meta.arch_get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("Granite 4.0-H files with RoPE on part of each head (Bamba's) are not supported")
    # The dense MLP's width from its tensors: the converter writes the experts' as feed_forward_length.
    dense = next((dims[0] for name, dims in shapes.items() if name.endswith(".ffn_gate.weight")), None)
    experts = expert_fields(meta, gguf)
    return ModelConfig(
        architecture="granitehybrid",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(dense or meta.arch_get("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=attention.pop() if attention else heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta.arch_get("context_length")),
        norm_eps=float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.arch_get("rope.freq_base", 10_000.0)),
        tie_word_embeddings="output.weight" not in shapes,
        recurrent_layers=tuple(i for i in range(layers) if not kv[i]),
        linear_attention=_mamba2_shape(meta),
        name=str(meta.get("general.name", "")),
        **fields, **experts,
    )


def _mamba2_shape(meta: GGUFMetadata) -> LinearAttentionShape:
    """A Mamba-2 mixer's shape from the `ssm.*` keys (`time_step_rank` is its head count)."""
    inner, heads, groups = (int(meta.arch_get(k)) for k in ("ssm.inner_size", "ssm.time_step_rank", "ssm.group_count"))
    if inner % heads or heads % groups:
        raise ValueError(f"a Mamba-2 layer of {inner} values in {heads} heads and {groups} groups is not "
                         "a whole number of heads a group")
    return LinearAttentionShape(key_heads=groups, value_heads=heads, key_dim=int(meta.arch_get("ssm.state_size")),
                                value_dim=inner // heads, conv_kernel=int(meta.arch_get("ssm.conv_kernel")),
                                tiled_heads=False)


def nemotron_h_config(gguf: GGUFFile, meta: GGUFMetadata, vocab_size: int) -> ModelConfig:
    names = {t.name for t in gguf.tensors}
    if int(meta.arch_get("nextn_predict_layers", 0)) or any(".ffn_latent_" in name for name in names):
        raise ValueError("Nemotron-H files with a multi-token-prediction head or latent expert projections "
                         "(Nemotron 3 Super) are not supported")
    layers, heads = int(meta.arch_get("block_count")), int(meta.arch_get("attention.head_count"))
    kv, ff = _per_layer(meta, "attention.head_count_kv", layers), _per_layer(meta, "feed_forward_length", layers)
    attention, widths = {h for h in kv if h}, {f for f in ff if f}
    if len(attention) != 1 or len(widths) != 1:
        raise ValueError(f"Nemotron-H files whose layers differ in KV heads ({sorted(attention)}) or MLP widths "
                         f"({sorted(widths)}) are not supported")
    hidden = int(meta.arch_get("embedding_length"))
    eps = meta.arch_get("attention.layer_norm_rms_epsilon", None) or meta.arch_get("attention.layer_norm_epsilon")
    return ModelConfig(
        architecture="nemotron_h",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=widths.pop(),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=attention.pop(),
        head_dim=int(meta.arch_get("attention.key_length", hidden // heads)),
        max_position_embeddings=int(meta.arch_get("context_length")),
        norm_eps=float(eps),
        tie_word_embeddings="output.weight" not in names,
        no_rope_layers=tuple(range(layers)),
        hidden_act="relu2",
        recurrent_layers=tuple(i for i in range(layers) if not kv[i] and not ff[i]),
        mlp_only_layers=tuple(i for i in range(layers) if ff[i]),
        linear_attention=_mamba2_shape(meta),
        name=str(meta.get("general.name", "")),
        **expert_fields(meta, gguf),  # Nemotron 3 Nano's: the MLP layers' experts (their width: the file's widths)
    )


def falcon_h1_config(gguf: GGUFFile, meta: GGUFMetadata, vocab_size: int) -> ModelConfig:
    names = {t.name for t in gguf.tensors}
    layers, heads = int(meta.arch_get("block_count")), int(meta.arch_get("attention.head_count"))
    hidden = int(meta.arch_get("embedding_length"))
    head_dim = int(meta.arch_get("attention.key_length", hidden // heads))
    if int(meta.arch_get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("Falcon-H1 files with RoPE on part of each head are not supported")
    normed = any(name.endswith(".ssm_norm.weight") for name in names)
    return ModelConfig(
        architecture="falcon_h1",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(meta.arch_get("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(meta.arch_get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta.arch_get("context_length")),
        norm_eps=float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.arch_get("rope.freq_base", 10_000.0)),
        tie_word_embeddings="output.weight" not in names,
        recurrent_layers=tuple(range(layers)),
        parallel_mixers=True,
        linear_attention=dataclasses.replace(_mamba2_shape(meta), gated_norm=normed),
        name=str(meta.get("general.name", "")),
    )


def with_experts(read_config):
    """A family's config reader for its mixture-of-experts files: the same model, the file's experts
    in its MLPs (a dense width where the file gives none: the experts')."""
    def read(gguf: GGUFFile, meta: GGUFMetadata, vocab_size: int) -> ModelConfig:
        fields = expert_fields(meta, gguf)
        if not fields:
            raise ValueError(f"a {meta.arch!r} file must give {meta.arch}.expert_count")
        config = read_config(gguf, meta, vocab_size)
        if not config.intermediate_size:
            fields["intermediate_size"] = fields["moe_intermediate_size"]
        return dataclasses.replace(config, **fields)
    return read


def qwen3next_config(gguf: GGUFFile, meta: GGUFMetadata, vocab_size: int) -> ModelConfig:
    """Qwen3.5 MoE's reading, with Qwen3-Next's delta nets: value heads grouped by key head, beta's
    and alpha's projections in one tensor."""
    if any(t.name.endswith(".ssm_in.weight") for t in gguf.tensors):
        raise ValueError("Qwen3-Next files from older converters (one ssm_in per layer) are not supported; "
                         "convert the model again")
    config = with_experts(qwen35_config)(gguf, meta, vocab_size)
    shape = dataclasses.replace(config.linear_attention, tiled_heads=False, fused_ba=True)
    return dataclasses.replace(config, linear_attention=shape)


MTP_ARCHS = QWEN35_ARCHS  # files that may end with multi-token-prediction blocks


def mtp_tensor(config: ModelConfig, name: str) -> bool:
    """A tensor of the multi-token-prediction blocks after the model's layers."""
    return name.startswith("blk.") and int(name.split(".", 2)[1]) >= config.num_layers


# general.architecture -> its config reader
HYBRID_CONFIGS = {"qwen35": qwen35_config, "lfm2": lfm2_config, "qwen35moe": with_experts(qwen35_config),
                  "lfm2moe": with_experts(lfm2_config), "qwen3next": qwen3next_config,
                  "granitehybrid": granitehybrid_config, "nemotron_h": nemotron_h_config,
                  "nemotron_h_moe": nemotron_h_config, "falcon-h1": falcon_h1_config}
