"""How a model runs on this machine: decided once, before loading, as one typed plan.

Every choice that used to be made by flags in several places lives here: the device, the
activation dtype, the weight format, whether textmill's C++ CPU kernels run the forward and
the attention, and the KV pool's dtype. wiring.py asks for a plan, logs `plan.describe()`,
loads the model in the plan's format and hands the plan to the ModelRunner; nothing else
decides. The rules, in order:

1. device: `auto` is CUDA when torch sees one, else the CPU.
2. kernels: asked for (not `--no-kernels`), on the CPU, and built for this CPU.
3. weights: a quantized GGUF on the kernels, with `--quantization auto`, runs the file's own
   blocks as 2- to 8-bit group codes ("file-codes"); `int4`/`int8` requantize float weights;
   everything else keeps float weights.
4. dtype: `auto` is float32 when the kernels run 2- to 8-bit weights (they take float32
   activations and beat oneDNN's bf16 at every batch size measured: docs/performance.md),
   else bfloat16 where the CPU (AVX512-BF16/AMX) or GPU has it natively, else float32.
   The kernels run only float32: another dtype gives the eager path.
5. kv dtype: `auto` is the activation dtype, except float16 on the CPU kernels, which
   convert on write and read (half the memory; docs/architecture.md has the measurements).
   `int8` (rows of codes and a scale, kv_cache.quantize_int8_rows) only on the kernels.
6. CUDA graphs: on CUDA, decode steps replay captured graphs (runner/decode_graphs.py)
   unless `--enforce-eager`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from textmill.config import KV_DTYPES, QUANTIZATIONS, DeviceConfig



class PlanError(ValueError):
    """The flags ask for something this machine or file cannot run; the message says why."""


@dataclass(frozen=True)
class ExecutionPlan:
    device: str  # "cpu" | "cuda"
    dtype: str  # activations (and float weights): "float32" | "bfloat16"
    weights: str  # "file-codes" | "int4" | "int8" | "float"
    kernels: bool  # textmill's C++ CPU kernels run attention, norms and the fused forwards
    kv_dtype: str  # the paged KV pool: "float32" | "float16" | "bfloat16" | "int8" (kernels only)
    threads: int | None = None  # torch intra-op threads; None: every core
    cuda_graphs: bool = False  # decode steps replay captured CUDA graphs (runner/decode_graphs.py)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_kv_dtype(self) -> torch.dtype:
        return getattr(torch, self.kv_dtype)

    @property
    def quantization(self) -> str:
        """The runner's linear swap (runner/quant.py) for weights that are not file codes."""
        return self.weights if self.weights in ("int4", "int8") else "none"

    def describe(self) -> str:
        what = {"file-codes": "the file's own blocks as 2- to 8-bit codes", "float": f"{self.dtype} weights",
                "int4": "int4 (requantized)", "int8": "int8 (requantized)"}[self.weights]
        engine = "textmill's C++ kernels" if self.kernels else "eager torch"
        graphs = ", decode as CUDA graphs" if self.cuda_graphs else ""
        return (f"{self.device}, {self.dtype} activations, {what}, {engine}{graphs}, KV cache {self.kv_dtype}, "
                f"{self.threads or 'all'} threads")


def decide(model: Path, asked: DeviceConfig) -> ExecutionPlan:
    """The plan for `model` on this machine: every "auto" of `asked` resolved."""
    device, dtype, quantization, kv_dtype = asked.device, asked.dtype, asked.quantization, asked.kv_cache_dtype
    if quantization not in QUANTIZATIONS:
        raise PlanError(f"--quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if kv_dtype not in KV_DTYPES:
        raise PlanError(f"--kv-cache-dtype must be one of {KV_DTYPES}, not {kv_dtype!r}")
    device = _device(device)
    cpu_kernels = asked.kernels and device == "cpu" and _kernels_built()
    file_bits = _file_bits(model) if cpu_kernels else None
    int_weights = file_bits is not None and quantization != "none"
    if dtype == "auto":
        dtype = "float32" if int_weights or (cpu_kernels and quantization in ("int4", "int8")) else (
            "bfloat16" if native_bf16(device) else "float32")
    on_kernels = cpu_kernels and dtype == "float32"
    if quantization == "auto":
        weights = "file-codes" if on_kernels and file_bits is not None else "float"
    else:
        weights = "float" if quantization == "none" else quantization
    if kv_dtype == "auto":
        kv_dtype = "float16" if on_kernels else dtype
    if kv_dtype == "int8" and not on_kernels:
        raise PlanError("an int8 KV cache needs textmill's CPU kernels (float32 on the CPU, without "
                        "--no-kernels): only they read and write its scaled rows")
    return ExecutionPlan(device=device, dtype=dtype, weights=weights, kernels=on_kernels, kv_dtype=kv_dtype,
                         threads=asked.threads, cuda_graphs=device == "cuda" and not asked.enforce_eager)


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PlanError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise PlanError(f"--device must be auto, cpu or cuda, not {device!r}")
    return device


def _kernels_built() -> bool:
    from textmill.runner import qlinear

    return qlinear.available()


def _file_bits(model: Path) -> int | None:
    """4 or 8 for a GGUF whose layers are quantized; None for float files and folders."""
    if model.suffix.lower() != ".gguf":
        return None
    from textmill.loader.gguf import layer_weight_bits

    return layer_weight_bits(model)


def native_bf16(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    # On CPUs without AVX512-BF16/AMX, bf16 matmuls are emulated and slower than float32.
    return bool(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() in ("AVX512", "AMX")
                and torch.cpu._is_avx512_bf16_supported())
