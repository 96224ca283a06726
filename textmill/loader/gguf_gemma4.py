"""A Gemma 4 GGUF file's ModelConfig, as llama.cpp's converter writes one and its loader reads it.

Gemma 4 files give per-layer arrays where other files give one number (the KV heads, the MLP
widths, which layers slide), and two head widths (`attention.key_length` for the global layers,
`key_length_swa` for the sliding ones), so they are read here rather than by gguf.read_config's
general path. The mixture-of-experts model (26B-A4B: a router with its own norm and scales, and
a dense MLP beside the experts) is refused, as are the vision and audio towers (mmproj files).
"""
from __future__ import annotations

import re
from typing import Any

from textmill.config import ModelConfig
from textmill.loader.gguf_file import GGUFFile, GGUFMetadata
from textmill.loader.hf_config import pattern_of_layers


def gemma4_config(gguf: GGUFFile, meta: GGUFMetadata, vocab_size: int,
                  rope_freqs: tuple[float, ...] | None) -> ModelConfig:
    """`vocab_size`: the embedding's rows; `rope_freqs`: the file's rope_freqs divisors (the global
    layers' proportional RoPE)."""
    names = {t.name for t in gguf.tensors}
    if any(name.endswith(".ffn_gate_inp.weight") for name in names):
        raise ValueError("Gemma 4 with experts (26B-A4B) is not supported; the dense Gemma 4 files are")
    layers = int(meta.arch_get("block_count"))
    sliding = [bool(s) for s in _per_layer(meta.arch_get("attention.sliding_window_pattern"), layers)]
    first_global = sliding.index(False) if False in sliding else None
    heads = set(_per_layer(meta.arch_get("attention.head_count"), layers))
    if len(heads) != 1:
        raise ValueError("Gemma 4 files whose layers differ in query heads are not supported")
    heads = int(heads.pop())
    kv_heads = _per_layer(meta.arch_get("attention.head_count_kv", heads), layers)
    widths = tuple(int(w) for w in _per_layer(meta.arch_get("feed_forward_length"), layers))
    local_dim = int(meta.arch_get("attention.key_length_swa"))
    global_dim = int(meta.arch_get("attention.key_length"))
    if int(meta.arch_get("attention.value_length_swa", local_dim)) != local_dim or int(
            meta.arch_get("attention.value_length", global_dim)) != global_dim:
        raise ValueError("Gemma 4 files whose keys and values differ in width are not supported")
    if int(meta.arch_get("rope.dimension_count_swa", local_dim)) != local_dim:
        raise ValueError("Gemma 4 files with partial RoPE in the sliding layers are not supported")
    if meta.arch_get("rope.scaling.type", "none") != "none":
        raise ValueError("Gemma 4 files with RoPE scaling are not supported")
    if rope_freqs is not None and len(rope_freqs) != global_dim // 2:
        raise ValueError(f"rope_freqs holds {len(rope_freqs)} divisors, not the {global_dim // 2} of a global head")
    local = next((int(kv_heads[i]) for i in range(layers) if sliding[i]), int(kv_heads[0]))
    cap = meta.arch_get("final_logit_softcapping", None)
    window = meta.arch_get("attention.sliding_window", None)
    fields: dict[str, Any] = dict(
        architecture="gemma4",
        vocab_size=vocab_size,
        hidden_size=int(meta.arch_get("embedding_length")),
        intermediate_size=widths[0],
        layer_intermediate_sizes=widths if len(set(widths)) > 1 else None,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=local,
        head_dim=local_dim,
        global_head_dim=global_dim,
        global_kv_heads=int(kv_heads[first_global]) if first_global is not None else None,
        # A global layer without attn_v takes V from k_proj (the 31B's attention_k_eq_v).
        attention_k_eq_v=first_global is not None and f"blk.{first_global}.attn_v.weight" not in names,
        kv_shared_layers=int(meta.arch_get("attention.shared_kv_layers", 0)),
        per_layer_input_size=int(meta.arch_get("embedding_length_per_layer_input", 0)),
        layer_scalars="blk.0.layer_output_scale.weight" in names,
        max_position_embeddings=int(meta.arch_get("context_length")),
        norm_eps=float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.arch_get("rope.freq_base", 1_000_000.0)),
        rope_local_theta=float(meta.arch_get("rope.freq_base_swa", 10_000.0)),
        rope_freq_factors=rope_freqs,
        tie_word_embeddings="output.weight" not in names,
        sliding_window=int(window) if window else None,
        sliding_window_pattern=pattern_of_layers(sliding),
        attention_scale=1.0,
        final_logit_softcap=None if cap is None else float(cap),
        hidden_act="gelu_tanh",
        name=str(meta.get("general.name", "")),
    )
    return ModelConfig(**fields)


def _per_layer(value: Any, layers: int) -> list[Any]:
    """A key that is one value for all layers or an array of one per layer."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * layers
    if len(values) != layers:
        raise ValueError(f"a per-layer key holds {len(values)} values for {layers} layers")
    return values


_KV_TENSOR = re.compile(r"blk\.(\d+)\.(attn_k|attn_v|attn_k_norm)\.weight")


def unused_kv_tensor(config: ModelConfig, name: str) -> bool:
    """A shared layer's own K/V projection or norm: the converter copies them from checkpoints
    that hold them, and neither llama.cpp nor transformers uses them (the layer reads its source's
    cache), so the loader leaves them in the file."""
    m = _KV_TENSOR.fullmatch(name)
    return m is not None and config.kv_source(int(m.group(1))) != int(m.group(1))
