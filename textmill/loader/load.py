"""Model files on disk -> a ready, frozen torch model: `load_model(path)`."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from textmill.config import ModelConfig
from textmill.loader.group_codes import CodesRef, GGUFRows
from textmill.models.registry import build_model

if TYPE_CHECKING:
    from textmill.loader.gguf import RowsDecoder

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: torch.nn.Module  # eval mode, no gradients; implements models.base.CausalLM
    path: Path
    format: str  # "gguf" or "hf" (a Hugging Face folder)
    # load_model(..., codes=True): the linear weights as group codes (their parameters stay
    # on the "meta" device until the runner installs kernels for them), and the embedding
    # table read row by row from the mapped file.
    codes: Mapping[str, CodesRef] = field(default_factory=dict)
    embedding: GGUFRows | None = None
    tables: Mapping[str, GGUFRows] = field(default_factory=dict)  # other tables read row by row


def _read_checkpoint(path: Path, dtype: torch.dtype, device: str, decode: "RowsDecoder | None",
                     window: int | None) -> tuple[str, ModelConfig, dict[str, torch.Tensor]]:
    if path.is_dir():
        from textmill.loader.hf import load_hf_folder

        return ("hf", *load_hf_folder(path, dtype=dtype, device=device, context_window=window))
    if path.suffix.lower() == ".gguf":
        from textmill.loader.gguf import load_gguf

        return ("gguf", *load_gguf(path, dtype=dtype, device=device, decode=decode, context_window=window))
    raise _not_a_model(path)


def _not_a_model(path: Path) -> Exception:
    """The error for a path that is neither a .gguf file nor a folder."""
    if not path.exists():
        return FileNotFoundError(f"model file not found: {path}")
    return ValueError(f"{path}: unknown model format (expected a .gguf file or a "
                      "Hugging Face folder with config.json and *.safetensors)")


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str = "cpu", codes: bool = False, decode: "RowsDecoder | None" = None,
               context_window: int | None = None) -> LoadedModel:
    """`codes`: keep a GGUF file's linear weights as group codes for the CPU kernels (see
    LoadedModel); float32 on the CPU only. Other files load as floats either way.
    `decode`: a faster decoder for a GGUF's quantized tensors on the float path (see
    loader/gguf.py RowsDecoder); numpy's decoders where it is None or declines a tensor.
    `context_window`: the longest sequence it will serve (default: the model's own window);
    it picks LongRoPE's factors (Phi-3.5), as llama.cpp's context size does."""
    if codes and Path(path).suffix.lower() == ".gguf":
        if dtype != torch.float32 or device != "cpu":
            raise ValueError("group codes are for the float32 CPU kernels")
        return _load_gguf_codes(Path(path).expanduser(), context_window)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported (use one of {SUPPORTED_DTYPES})")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    fmt, config, state = _read_checkpoint(path, dtype, device, decode, context_window)
    # Build without allocating or initializing weights, then adopt the loaded tensors.
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # buffers built outside "meta" (the RoPE cache) follow the weights
    model.eval().requires_grad_(False)
    return LoadedModel(config=config, model=model, path=path, format=fmt)


def _load_gguf_codes(path: Path, window: int | None) -> LoadedModel:
    from textmill.loader.gguf import EMBED, read_config, read_quantized_state
    from textmill.loader.gguf_file import GGUFFile

    gguf = GGUFFile(path)
    config = read_config(gguf, window)
    with torch.device("meta"):
        model = build_model(config)
    linears = frozenset(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    state = read_quantized_state(gguf, config, linears)
    missing, unexpected = model.load_state_dict(state.floats, strict=False, assign=True)
    expected_missing = (set(state.codes) | {EMBED} | set(state.tables)) & set(model.state_dict())
    if set(missing) != expected_missing or unexpected:
        raise ValueError(f"GGUF tensors do not match the model: missing {sorted(set(missing) - expected_missing)}, "
                         f"unexpected {sorted(unexpected)}")
    for name, buf in model.named_buffers():  # the RoPE tables, built on "meta" above
        if buf.is_meta:
            raise ValueError(f"buffer {name} was not materialized")
    model.eval().requires_grad_(False)
    return LoadedModel(config=config, model=model, path=path, format="gguf", codes=state.codes,
                       embedding=state.embedding, tables=state.tables)


def read_model_config(path: str | Path) -> ModelConfig:
    """The model's config without its weights (a GGUF's metadata, a folder's config.json and
    tensor names): what the server sizes its KV pool and window from before loading."""
    path = Path(path).expanduser()
    if path.is_dir():
        from textmill.loader.hf import read_folder_config

        return read_folder_config(path)
    if path.suffix.lower() == ".gguf":
        from textmill.loader.gguf import read_config
        from textmill.loader.gguf_file import GGUFFile

        return read_config(GGUFFile(path))
    raise _not_a_model(path)
