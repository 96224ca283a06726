"""GGUF files -> (ModelConfig, state dict of torch tensors in the model's names and layout).

The file is memory-mapped by gguf.GGUFReader; each tensor is dequantized once into the
requested dtype, so the float32 copy of one tensor at a time is the peak extra memory.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from tqdm import tqdm

from textmill.config import ModelConfig
from textmill.loader.dequant import dequantize
from textmill.loader.names import gguf_param_name, to_model_layout
from textmill.models.registry import resolve_architecture

_MISSING = object()


class GGUFMetadata:
    """Typed access to a reader's key/value fields, with the `{arch}.` prefix handled."""

    def __init__(self, reader: GGUFReader) -> None:
        self._fields = reader.fields
        self.arch = str(self.get("general.architecture"))

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ValueError(f"GGUF metadata lacks {key!r}")
            return default
        return field.contents()

    def arch_get(self, key: str, default: Any = _MISSING) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def array_len(self, key: str) -> int | None:
        field = self._fields.get(key)
        return None if field is None else len(field.data)


def _rope_scaling_factor(meta: GGUFMetadata) -> float | None:
    kind = meta.arch_get("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return float(meta.arch_get("rope.scaling.factor"))
    raise ValueError(f"RoPE scaling {kind!r} is not supported (only linear)")


def _vocab_size(meta: GGUFMetadata, reader: GGUFReader) -> int:
    size = meta.arch_get("vocab_size", None) or meta.array_len("tokenizer.ggml.tokens")
    if size:
        return int(size)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return int(embd.shape[1])  # ne = (hidden, vocab)


def read_config(reader: GGUFReader) -> ModelConfig:
    meta = GGUFMetadata(reader)
    hidden = int(meta.arch_get("embedding_length"))
    heads = int(meta.arch_get("attention.head_count"))
    head_dim = int(meta.arch_get("attention.key_length", hidden // heads))
    rope_dims = int(meta.arch_get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")
    window = meta.arch_get("attention.sliding_window", None)
    tensor_names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=resolve_architecture(meta.arch),
        vocab_size=_vocab_size(meta, reader),
        hidden_size=hidden,
        intermediate_size=int(meta.arch_get("feed_forward_length")),
        num_layers=int(meta.arch_get("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.arch_get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta.arch_get("context_length")),
        norm_eps=float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.arch_get("rope.freq_base", 10000.0)),
        rope_scaling_factor=_rope_scaling_factor(meta),
        tie_word_embeddings="output.weight" not in tensor_names,
        sliding_window=int(window) if window else None,
        name=str(meta.get("general.name", "")),
    )


def _show_progress() -> bool:
    return sys.stderr.isatty()


def read_state_dict(reader: GGUFReader, config: ModelConfig, *, dtype: torch.dtype,
                    device: str) -> dict[str, torch.Tensor]:
    arch = GGUFMetadata(reader).arch
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="loading", unit="tensor", disable=not _show_progress()):
        name = gguf_param_name(arch, t.name)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (innermost) first
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        tensor = to_model_layout(arch, name, torch.from_numpy(values), config)
        state[name] = tensor.to(device=device, dtype=dtype)
    return state


def load_gguf(path: Path, *, dtype: torch.dtype, device: str
              ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    reader = GGUFReader(path, "r")
    config = read_config(reader)
    return config, read_state_dict(reader, config, dtype=dtype, device=device)
