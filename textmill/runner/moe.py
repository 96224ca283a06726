"""A mixture of experts (models/moe.py) on the CPU kernels, for a GGUF file's own blocks.

models/moe.py runs each expert as a module of its own: per layer and step, a few torch ops
and two linears for every expert some token chose (8 of 128 per token on Qwen3 30B-A3B: 16
linears a layer at one stream, and at 16 streams those of up to all 128 experts). Here a layer's
experts are packed once into one weight per projection, gate and up side by side, then
down, each expert's rows whole tiles of it, and a step's MLP is five calls:

    logits = router(y)                       dense_rows (float router) or its QLinear
    tok, w, offsets = moe_route(logits)      each token's k experts, grouped by expert
    g = experts_linear(y[tok], offsets, gate_up)   every routed row against its expert
    d = experts_linear(silu_mul(g), offsets, down)      (Nemotron-H's: relu(g)^2 of up alone)
    out = moe_combine(d, tok, w)             the weighted sum, in expert order
    [out += sigmoid(gate . y) * shared(y)]   a shared expert (Qwen2 MoE; ungated in Granite's)

gpt-oss adds the router's bias to its logits, and its experts' biases and clamped SwiGLU
(models/llama.swiglu_clamped) in the two calls around the grouped projections: `moe_glu`
(each routed row's expert's gate|up biases, then the clamped SwiGLU) in silu_mul's place, and
moe_combine with each row's down bias. Row by row too.

Each call computes a row from that row alone (kernels/csrc/layer.cpp and quant.cpp say how),
so a token's output is bitwise the same whatever else its step holds: guessed tokens stay
exact (runner/kernel_forward.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from textmill.kernels import load
from textmill.loader.group_codes import PACKED_FROM_FILE_TYPES, CodesRef
from textmill.models.llama import SWIGLU_ALPHA
from textmill.models.moe import SparseMoE
from textmill.models.nemotron_h import relu_squared
from textmill.runner.qlinear import TILE_ROWS, OutOfHalfRange, QLinear


class KernelMoE(nn.Module):
    """SparseMoE's math with its experts stacked: `gate_up` (E x 2F rows: expert e's gate
    rows, then its up rows), `down` (E x C rows)."""

    def __init__(self, moe: SparseMoE, router: nn.Module, gate_up: QLinear, down: QLinear):
        super().__init__()
        self.top_k, self.normalize, self.sigmoid = moe.top_k, moe.normalize, moe.sigmoid
        # Nemotron-H's experts: up alone (`gate_up` is E x F rows), relu(u)^2, weights times router_scale.
        self.glu, self.scale = hasattr(moe.experts[0], "gate_proj"), moe.scale
        bias = moe.selection_bias  # ERNIE 4.5 MoE's and LFM2 MoE's: chooses, does not weigh
        self._selection_bias = None if bias is None else bias.detach().float().contiguous()
        self.num_experts = len(moe.experts)
        self.router = router
        self.gate_up, self.down = gate_up, down
        self.width = gate_up.out_features // self.num_experts  # 2F (F: Nemotron-H's)
        self.hidden = down.out_features // self.num_experts  # C
        self._layer, self._quant = load("layer"), load("quant")
        self._recurrent = load("recurrent") if moe.shared_expert_gate is not None else None
        self._modes = (self._quant.mode_number(gate_up.mode), self._quant.mode_number(down.mode))
        float_router = type(router) is nn.Linear and router.weight.dtype == torch.float32
        self._router_weight = router.weight.detach().contiguous() if float_router else None
        self._router_bias = router.bias.detach().float() if float_router and router.bias is not None else None
        # gpt-oss: its clamped SwiGLU and each expert's biases, (E, 2F) gate's then up's, and (E, C)
        # (the two come together: stack_experts).
        self._limit = getattr(moe.experts[0], "limit", None)
        self._gate_up_bias = self._down_bias = None
        if self._limit is not None:
            self._gate_up_bias = torch.stack([torch.cat([e.gate_proj.bias, e.up_proj.bias]).detach().float()
                                              for e in moe.experts])
            self._down_bias = torch.stack([e.down_proj.bias.detach().float() for e in moe.experts])
        # A shared expert (runner/fused.py fuses it as any MLP), and its gate's float row (Qwen2 MoE).
        self.shared_expert = moe.shared_expert
        gate = moe.shared_expert_gate
        self._shared_gate = None if gate is None else gate.weight.detach().float().contiguous()

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        if self._router_weight is not None:
            logits = self._layer.dense_rows(y, self._router_weight)
            return logits if self._router_bias is None else logits.add_(self._router_bias)
        return self.router(y).float().contiguous()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y.float().contiguous()
        tok, w, offsets = self._layer.moe_route(self.logits(y), self.top_k, self.normalize, self._selection_bias,
                                                self.sigmoid)
        routed = y.index_select(0, tok)
        g = self._quant.experts_linear(routed, offsets, self._modes[0], self.gate_up.packed, self.width)
        if self._limit is not None:
            a = self._layer.moe_glu(g, offsets, self._gate_up_bias, self._limit, SWIGLU_ALPHA)
        elif self.glu:
            a = self._layer.silu_mul(g)
        else:
            a = relu_squared(g)
        if self.scale != 1.0:
            w = w * self.scale
        d = self._quant.experts_linear(a, offsets, self._modes[1], self.down.packed, self.hidden)
        bias = {} if self._down_bias is None else {"bias": self._down_bias, "offsets": offsets}
        out = self._layer.moe_combine(d, tok, w, y.shape[0], **bias)
        if self.shared_expert is None:
            return out
        shared = self.shared_expert(y)
        if self._shared_gate is not None:
            # sigmoid row by row (recurrent.cpp): torch.sigmoid's vector body and tail round apart, so
            # a token's gate would depend on its place in the step
            gate = self._recurrent.sigmoid_gate(torch.ones(y.shape[0], 1), self._layer.dense_rows(y, self._shared_gate))
            shared = shared * gate
        return out.add_(shared)


def stack_experts(model: nn.Module, ref_of: Callable[[nn.Linear], CodesRef | None],
                  router_of: Callable[[nn.Linear], nn.Module], arena) -> list[CodesRef]:
    """Replace each SparseMoE whose experts the file holds in one packable form per projection
    (every expert's gate and up alike, every down alike, whole tiles) by a KernelMoE; returns
    the file tensors so packed. The rest keep their experts as modules (fused and swapped like
    any MLP)."""
    packed: list[CodesRef] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            first = child.experts[0] if type(child) is SparseMoE else None
            if first is None:
                continue
            glu = hasattr(first, "gate_proj")  # Nemotron-H's ReLU^2 experts have up alone
            if glu and (first.gate_proj.bias is None) != (first.limit is None):
                continue  # biases without gpt-oss's clamp, or the clamp without biases: no family; the module runs them
            gate_up = [ref_of(p) for e in child.experts for p in ((e.gate_proj, e.up_proj) if glu else (e.up_proj,))]
            down = [ref_of(e.down_proj) for e in child.experts]
            stacked = _stacked(gate_up, down, arena)
            if stacked is not None:
                setattr(parent, name, KernelMoE(child, router_of(child.gate), *stacked))
                packed += gate_up + down
    return packed


def _stacked(gate_up: list[CodesRef | None], down: list[CodesRef | None], arena) -> tuple[QLinear, QLinear] | None:
    if any(r is None or r.qtype not in PACKED_FROM_FILE_TYPES for r in gate_up + down):
        return None
    if len({r.form for r in gate_up}) > 1 or len({r.form for r in down}) > 1:
        return None
    if (len(gate_up) // len(down) * gate_up[0].shape[0]) % TILE_ROWS or down[0].shape[0] % TILE_ROWS:
        return None
    try:
        return QLinear.from_file(gate_up, arena=arena), QLinear.from_file(down, arena=arena)
    except OutOfHalfRange:
        return None
