"""Model files on disk -> a ready, frozen torch model: `load_model(path)`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from textmill.config import ModelConfig
from textmill.models.registry import build_model

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: torch.nn.Module  # eval mode, no gradients; implements models.base.CausalLM
    path: Path
    format: str  # "gguf" or "hf" (a Hugging Face folder)


def _read_checkpoint(path: Path, dtype: torch.dtype, device: str
                     ) -> tuple[str, ModelConfig, dict[str, torch.Tensor]]:
    if path.is_dir():
        from textmill.loader.hf import load_hf_folder

        return ("hf", *load_hf_folder(path, dtype=dtype, device=device))
    if path.suffix.lower() == ".gguf":
        from textmill.loader.gguf import load_gguf

        return ("gguf", *load_gguf(path, dtype=dtype, device=device))
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    raise ValueError(f"{path}: unknown model format (expected a .gguf file or a "
                     "Hugging Face folder with config.json and *.safetensors)")


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> LoadedModel:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported (use one of {SUPPORTED_DTYPES})")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    fmt, config, state = _read_checkpoint(path, dtype, device)
    # Build without allocating or initializing weights, then adopt the loaded tensors.
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # buffers built outside "meta" (the RoPE cache) follow the weights
    model.eval().requires_grad_(False)
    return LoadedModel(config=config, model=model, path=path, format=fmt)
