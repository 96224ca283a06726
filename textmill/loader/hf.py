"""Hugging Face folders (config.json + one or more *.safetensors) -> (ModelConfig, state dict).

Each shard is memory-mapped by safetensors.safe_open and read one tensor at a time, so the
peak extra memory is one tensor in the requested dtype on top of the model's own.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from textmill.config import ModelConfig
from textmill.loader.hf_config import read_hf_config
from textmill.loader.names import FUSED_HF, fused_parts, hf_param_name, hf_to_model_layout

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(folder: Path) -> list[Path]:
    """The shards named by the index file, or the folder's *.safetensors files."""
    index = folder / INDEX_FILE
    if index.is_file():
        with index.open(encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise FileNotFoundError(f"{folder} has no *.safetensors weights (found: {found}); "
                                "PyTorch .bin checkpoints are not supported")
    return files


def _tensor_names(handles) -> Iterator[tuple[object, str]]:
    for handle in handles:
        for key in handle.keys():
            yield handle, key


def _parts(arch: str, key: str, handle, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensor, or the parts of a fused one (Phi-3's qkv_proj, gate_up_proj)."""
    whole = handle.get_tensor(key)
    parts = fused_parts(FUSED_HF, arch, key, config, whole.shape[0])
    if parts is None:
        yield key, whole
        return
    for name, start, end in parts:
        yield name, whole[start:end]


def read_folder_config(folder: Path) -> ModelConfig:
    """The folder's ModelConfig, from config.json and the shards' tensor names."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt", device="cpu"))
                   for p in safetensors_files(folder)]
        return read_hf_config(folder, [key for _, key in _tensor_names(handles)])


def load_hf_folder(folder: Path, *, dtype: torch.dtype, device: str, context_window: int | None = None
                   ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt", device="cpu"))
                   for p in safetensors_files(folder)]
        entries = list(_tensor_names(handles))
        config = read_hf_config(folder, [key for _, key in entries], context_window)
        arch = config.architecture
        state: dict[str, torch.Tensor] = {}
        for handle, key in tqdm(entries, desc="loading", unit="tensor", disable=not sys.stderr.isatty()):
            for part, tensor in _parts(arch, key, handle, config):
                name = hf_param_name(arch, part)
                if name is None or (name == "lm_head.weight" and config.tie_word_embeddings):
                    continue  # a cached buffer, or a tied head saved anyway: logits read the embedding
                tensor = hf_to_model_layout(arch, name, tensor)
                state[name] = tensor.to(device=device, dtype=dtype)
    return config, state
