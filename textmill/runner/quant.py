"""Weight-only int8 / int4 linear layers (gpt-fast style), swapped in after loading.

* int8: one symmetric scale per output channel; torch.ops.aten._weight_int8pack_mm.
* int4: groups of 32 along the input dimension, each with a scale and a zero point
  (w = (q - 8) * scale + zero, q in 0..15); torch.ops.aten._weight_int4pack_mm_for_cpu.
  Groups of 32 with a min and a max are exactly GGUF's Q4_1 blocks, so a Q4_1 checkpoint
  (the bundled SmolLM2) loses nothing more than the rounding of scales to bf16.

torch's CPU kernels for these are matrix-vector products: fast for a step of one or two
tokens, where reading the weights is the whole cost, but their time grows with every row,
and they use no AMX. Steps with more rows (prefill, batched decode) therefore multiply by
the *dequantized* weights in bf16, so both paths compute with the same quantized model; only
the kernel depends on the step size. The dequantized matrix is made for the step and
dropped (its cost, N x K, is 1/M of the M-row product): keeping a bf16 copy beside the
integer weights would have cost 2-4x their memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textmill.runner.fused import concatenating, fuse_gemma4_layers, fuse_gemma_layers, fuse_llama_layers
from textmill.runner.linear import PackedLinear, packing_supported, swap_linears, tie_head_as_linear

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32
# Rows up to which the int kernels beat packed bf16 on a 2-core AVX-512 machine
# (docs/performance.md). Their time grows with every row; bf16's barely does until ~32.
MAX_SMALL_ROWS = {"int8": 2, "int4": 6}


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) int8 and (N,) float32 scales, w ~= q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) int32 codes in 0..15, (N, K/group) scales and zeros, float32.

    Asymmetric: the group's min and max map to codes 0 and 15.
    """
    n, k = weight.shape
    assert k % group == 0, f"in_features {k} is not a multiple of the int4 group {group}"
    w = weight.detach().float().view(n, k // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    zero = lo + 8.0 * scale  # the kernel computes (q - 8) * scale + zero
    return q.view(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    n, k = q.shape
    w = (q.view(n, k // group, group).float() - 8.0) * scale[..., None] + zero[..., None]
    return w.view(n, k)


class QuantLinear(nn.Module):
    """A bf16 linear with int8 or int4 weights. x (M, K) bf16 -> (M, N) bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, max_small_rows: int):
        super().__init__()
        assert mode in ("int8", "int4"), mode
        self.mode, self.max_small_rows = mode, max_small_rows
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        if mode == "int8":
            q, scale = quantize_int8(weight)
            self.scale = scale.to(torch.bfloat16)
            self.q = q
        else:
            q, scale, zero = quantize_int4(weight)
            scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
            self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (N, K/2) uint8
            self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)
            # torch's packed layout has no unpacking op, so big steps read their own nibbles:
            # half a byte per weight more, where a bf16 copy cost two bytes.
            self.nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (N, K/2)
            self.scale, self.zero = scale, zero

    def dequantized(self) -> torch.Tensor:
        """(N, K) bf16: the weights the integer kernels compute with."""
        if self.mode == "int8":
            return (self.q.float() * self.scale.float()[:, None]).to(torch.bfloat16)
        n, k = self.out_features, self.in_features
        q = torch.stack([self.nibbles & 15, self.nibbles >> 4], dim=-1).view(n, k // INT4_GROUP, INT4_GROUP)
        w = (q.float() - 8.0) * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.view(n, k).to(torch.bfloat16)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, max_small_rows: int) -> "QuantLinear":
        return cls(linear.weight, linear.bias, mode, max_small_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_small_rows:
            return F.linear(x, self.dequantized(), self.bias)
        if self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, INT4_GROUP, self.scales_zeros)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


def quantizable(linear: nn.Linear, mode: str) -> bool:
    return mode == "int8" or linear.in_features % INT4_GROUP == 0


def install_linears(model: nn.Module, vocab_size: int, device: torch.device, dtype: torch.dtype,
                    quantization: str = "none", max_small_rows: dict[str, int] | None = None,
                    kernels: bool = False) -> str:
    """Swap the model's nn.Linear layers for the fastest kernels the device has.

    Returns a one-line summary for the log. float32 on the CPU with textmill's C++ kernels
    (kernels=True): fused nn.Linear layers, or runner/qlinear.py's 2- to 8-bit kernels under
    int4/int8. float32 without them keeps nn.Linear (the reference path). bfloat16: oneDNN
    packed layers, or torch's int kernels under int4/int8.
    """
    max_small_rows = MAX_SMALL_ROWS if max_small_rows is None else max_small_rows
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if kernels and device.type == "cpu" and dtype == torch.float32:
        return _install_kernel_linears(model, vocab_size, quantization)
    if not packing_supported(device, dtype):
        if quantization != "none":
            raise ValueError(f"--quantization {quantization} needs bfloat16 on a CPU with oneDNN "
                             f"(have {dtype} on {device})")
        return "nn.Linear"
    tie_head_as_linear(model, vocab_size)
    head = getattr(model, "lm_head", None)
    # The LM head stays int8 under int4: in 4 bits (usually an 8-bit tensor in the file) it
    # moves prompt logprobs about 3x more than all the other layers together.
    head_mode = "int8" if quantization == "int4" else quantization

    def make(linear: nn.Linear) -> nn.Module:
        mode = head_mode if linear is head else quantization
        if mode != "none" and quantizable(linear, mode):
            return QuantLinear.from_linear(linear, mode, max_small_rows.get(mode, 0))
        return PackedLinear.from_linear(linear)

    fused = fuse_llama_layers(model, concatenating(make))  # q/k/v and gate/up as single matmuls
    count = swap_linears(model, make)
    what = "packed bf16" if quantization == "none" else (
        f"{quantization} (LM head {head_mode}), packed bf16 for steps of many tokens")
    return f"{what}; {fused} attention/MLP modules fused, {count} more linears swapped"


# --quantization -> the qlinear mode of the layers; the LM head is always q8 when quantized
# (4 bits move prompt logprobs about 3x more than all the other layers together, above).
_KERNEL_MODES = {"int4": "q4", "int8": "q8"}


def _install_kernel_linears(model: nn.Module, vocab_size: int, quantization: str) -> str:
    mode = _KERNEL_MODES.get(quantization)
    if mode is None:
        def make(linear: nn.Linear) -> nn.Module:
            return linear
    else:
        from textmill.runner import qlinear

        if not qlinear.available():
            raise ValueError(f"--quantization {quantization} in float32 needs textmill's C++ kernels, "
                             "which could not be built here (see the log)")
        tie_head_as_linear(model, vocab_size)  # so that the swap reaches a tied head too
        head = getattr(model, "lm_head", None)

        def make(linear: nn.Linear) -> nn.Module:
            want = "q8" if linear is head else mode
            return qlinear.QLinear.from_linear(linear, want) if qlinear.supports(linear, want) else linear

    # the kernel forwards need qkv_proj / gate_up_proj
    fused = sum(fuse(model, concatenating(make)) for fuse in (fuse_llama_layers, fuse_gemma_layers, fuse_gemma4_layers))
    count = swap_linears(model, make) if mode else 0
    what = "float32 nn.Linear" if mode is None else f"{mode} kernels (LM head q8)"
    return f"{what}; {fused} attention/MLP modules fused, {count} more linears swapped"
