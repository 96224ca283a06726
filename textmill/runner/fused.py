"""Fewer, bigger ops for Llama-style layers, swapped in by the runner after loading.

A decode step on a small model is dominated by per-op overhead: the eager Llama layer
issues about 70 torch ops, each a few microseconds of dispatch. These modules replace
models/llama.py's Attention and MLP (also used by Qwen2 and Qwen3) with the same math in fewer ops:

* q, k and v come from one matmul over the concatenated weights, gate and up from another;
* RoPE runs once over q and k together, as x * cos2 + roll(x, D/2) * sin2 with
  cos2 = [cos, cos] and sin2 = [-sin, sin] built once per step: the same products and
  sums as rotate-half (a - b == a + (-b) exactly), so the rotation is bitwise unchanged.
  (A concatenated matmul may block its sums differently for big steps: the last bit of a
  bf16 output can differ from three separate matmuls; float32 keeps the unfused model.)

Only exact instances of the llama classes are replaced; tests/unit/test_runner_fused.py
checks the swapped model against the original.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from textmill.models import llama


class RopeTables:
    """cos2/sin2 of the step, built from the first layer's (cos, sin) and reused by the rest
    (the model computes cos/sin once per forward and hands the same tensors to every layer)."""

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cos is not self._key:  # (N, 1, D/2) each -> (N, 1, D) each
            self._tables = (torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))
            self._key = cos
        return self._tables


class FusedAttention(nn.Module):
    def __init__(self, attn: llama.Attention, make_linear: "MakeFused", rope: RopeTables):
        super().__init__()
        self.layer_idx, self.sliding_window, self.scale = attn.layer_idx, attn.sliding_window, attn.scale
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.qkv_proj = make_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = make_linear([attn.o_proj])
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm  # Qwen3's and OLMo 2's QK norms, else None
        self.rope = rope if attn.rope else None  # None: a NoPE layer (SmolLM3)
        self.sinks = getattr(attn, "sinks", None)  # gpt-oss's per-head sink logits, else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        n, d, hq, hkv = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)  # (N, (Hq + 2 Hkv) D)
        qk = qkv[:, : (hq + hkv) * d].view(n, hq + hkv, d)  # (N, Hq + Hkv, D)
        v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)  # (N, Hkv, D)
        if self.q_norm is not None:  # per head (Qwen3) or over all heads (OLMo 2)
            qk = torch.cat([llama.norm_heads(self.q_norm, qk[:, :hq]), llama.norm_heads(self.k_norm, qk[:, hq:])],
                           dim=1)
        if self.rope is not None:
            cos2, sin2 = self.rope.get(cos, sin)
            x32 = qk.float()
            qk = (x32 * cos2 + x32.roll(d // 2, dims=-1) * sin2).to(qk.dtype)
        y = ctx.attend(self.layer_idx, qk[:, :hq], qk[:, hq:], v, scale=self.scale,
                       sliding_window=self.sliding_window, sinks=self.sinks)  # (N, Hq, D)
        return self.o_proj(y.reshape(n, hq * d))


class FusedMLP(nn.Module):
    """SwiGLU with gate and up in one matmul: down(silu(g) * u), [g, u] = x @ [Wg; Wu].T"""

    def __init__(self, mlp: llama.MLP, make_linear: "MakeFused"):
        super().__init__()
        self.hidden = mlp.gate_proj.out_features
        self.gate_up_proj = make_linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = make_linear([mlp.down_proj])
        self.limit = getattr(mlp, "limit", None)  # gpt-oss's experts: their SwiGLU clamped (llama.swiglu_clamped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (N, 2F)
        gate, up = gate_up[:, : self.hidden], gate_up[:, self.hidden :]
        if self.limit is not None:
            return self.down_proj(llama.swiglu_clamped(gate, up, self.limit))
        return self.down_proj(F.silu(gate) * up)


# Builds one module computing the given linears' outputs side by side (q, k, v -> qkv).
MakeFused = Callable[[list[nn.Linear]], nn.Module]


def concatenating(make_linear: Callable[[nn.Linear], nn.Module]) -> MakeFused:
    """A MakeFused for float weights: one nn.Linear over the stacked rows, then make_linear."""
    return lambda parts: make_linear(parts[0] if len(parts) == 1 else _concat(parts))


def fuse_llama_layers(model: nn.Module, make_linear: MakeFused) -> int:
    """Replace exact llama.Attention / llama.MLP children; returns how many were replaced."""
    rope, count = RopeTables(), 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is llama.Attention:
                setattr(parent, name, FusedAttention(child, make_linear, rope))
            elif type(child) is llama.MLP:
                setattr(parent, name, FusedMLP(child, make_linear))
            else:
                continue
            count += 1
    return count


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output rows are the given layers' rows, in order."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias), device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if any(has_bias):
        bias = [lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features) for lin in linears]
        out.bias = nn.Parameter(torch.cat(bias), requires_grad=False)
    return out


def fuse_gemma_layers(model: nn.Module, make_linear: MakeFused) -> int:
    """Give Gemma 2's and 3's attention and MLP modules (Gemma 4's MLP, the same class, too) one
    qkv_proj and one gate_up_proj, for the kernel forwards (runner/kernel_forward.py
    GemmaKernelForward, runner/gemma4_forward.py); the separate q/k/v and gate/up layers are
    dropped, so only those forwards can run the model afterwards."""
    from textmill.models import gemma3

    count = 0
    for module in list(model.modules()):
        if type(module) is gemma3.Attention:
            module.qkv_proj = make_linear([module.q_proj, module.k_proj, module.v_proj])
            module.o_proj = make_linear([module.o_proj])
            module.q_proj = module.k_proj = module.v_proj = None
        elif type(module) is gemma3.MLP:
            module.gate_up_proj = make_linear([module.gate_proj, module.up_proj])
            module.down_proj = make_linear([module.down_proj])
            module.gate_proj = module.up_proj = None
        else:
            continue
        count += 1
    return count


def fuse_gemma4_layers(model: nn.Module, make_linear: MakeFused) -> int:
    """Gemma 4's attention with one qkv_proj (q, k and v, or q and k where V is k's output; a shared
    layer keeps its q_proj alone), for runner/gemma4_forward.py (its MLP is Gemma 3's, which
    fuse_gemma_layers fuses); as there, only that forward runs the model afterwards."""
    from textmill.models import gemma4

    count = 0
    for module in list(model.modules()):
        if type(module) is gemma4.Attention and module.source == module.layer_idx:
            parts = [module.q_proj, module.k_proj] + ([] if module.v_proj is None else [module.v_proj])
            module.qkv_proj = make_linear(parts)
            module.q_proj = module.k_proj = module.v_proj = None
            count += 1
    return count


def fuse_qwen35_layers(model: nn.Module, make_linear: MakeFused) -> int:
    """Qwen3.5's attention with one qkv_proj (queries, gates, keys, values) and its delta nets with
    one in_proj (q|k|v, z, b, a), for runner/hybrid_forward.py (its MLP is Llama's, which
    fuse_llama_layers fuses); as for Gemma, only that forward runs the model afterwards."""
    from textmill.models import qwen35

    count = 0
    for module in list(model.modules()):
        if type(module) is qwen35.Attention:
            module.qkv_proj = make_linear([module.q_proj, module.k_proj, module.v_proj])
            module.o_proj = make_linear([module.o_proj])
            module.q_proj = module.k_proj = module.v_proj = None
        elif type(module) is qwen35.GatedDeltaNet:
            ba = [module.in_proj_ba] if module.shape.fused_ba else [module.in_proj_b, module.in_proj_a]
            module.in_proj = make_linear([module.in_proj_qkv, module.in_proj_z, *ba])
            module.out_proj = make_linear([module.out_proj])
            module.in_proj_qkv = module.in_proj_z = module.in_proj_b = module.in_proj_a = module.in_proj_ba = None
        else:
            continue
        count += 1
    return count
