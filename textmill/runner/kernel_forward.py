"""The Llama-family forward pass on textmill's C++ kernels (float32 CPU).

models/llama.py states the math; this runs the same math in about ten calls per layer
instead of ~60 eager ops, because on a small model the per-op dispatch, not the arithmetic,
is most of a decode step. Per layer:

    qkv = qkv_proj(y)                                  one matmul (runner/fused.py)
    q = rope_kv_write(qkv, ...)                        RoPE on q and k, k and v into the cache
    o = o_proj(paged_attention(q, ...))                straight from the paged pool
    y = add_rms_norm(o, h, w_post)                     h += o; y = RMSNorm(h)
    y = add_rms_norm(down(silu_mul(gate_up(y))), h, w_next)   the next layer's input norm

The residual stream h stays one float32 buffer updated in place, and each RMSNorm is fused
with the residual add before it. The linears are whatever the runner installed (nn.Linear,
or runner/qlinear.py's 4/8-bit kernels), so this module owns only the order of the calls.
Built only for exact llama.LlamaForCausalLM / qwen2 instances whose layers runner/fused.py
has fused; anything else keeps the model's own forward.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from textmill import kernels as cpp_kernels
from textmill.models import llama
from textmill.models.qwen2 import Qwen2ForCausalLM
from textmill.runner.fused import FusedAttention, FusedMLP
from textmill.runner.kernel_attention import KernelPagedAttention
from textmill.runner.qlinear import QLinear


class KernelForward:
    def __init__(self, model: llama.LlamaForCausalLM, ops: ModuleType):
        self.ops = ops
        self.embed = model.embed_tokens.weight
        self.cos, self.sin = model.rotary.cos.contiguous(), model.rotary.sin.contiguous()  # (P, D/2)
        self.layers = list(model.layers)
        self.eps = model.config.norm_eps
        # The norm that follows each layer: the next layer's input norm, the final norm last.
        self.input_norms = [layer.input_layernorm.weight.detach().float().contiguous() for layer in self.layers]
        self.post_norms = [layer.post_attention_layernorm.weight.detach().float().contiguous()
                           for layer in self.layers]
        self.next_norms = self.input_norms[1:] + [model.norm.weight.detach().float().contiguous()]
        # Each layer's four matmuls as plain callables: nn.Module.__call__ costs more than
        # a small kernel call, 120 times a step.
        self.matmuls = [tuple(_direct(m) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                   layer.mlp.gate_up_proj, layer.mlp.down_proj))
                        for layer in self.layers]

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        if type(model) not in (llama.LlamaForCausalLM, Qwen2ForCausalLM):
            return False
        return all(type(layer) is llama.Block and isinstance(layer.self_attn, FusedAttention)
                   and isinstance(layer.mlp, FusedMLP) for layer in model.layers)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 ctx: KernelPagedAttention) -> torch.Tensor:
        ops, eps = self.ops, self.eps
        h = F.embedding(input_ids, self.embed).float()  # (N, C): the residual stream
        n = h.shape[0]
        y = ops.rms_norm(h, self.input_norms[0], eps)
        slots, kv = ctx.meta.slot_mapping, ctx.cache.kv
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv_proj, o_proj, gate_up_proj, down_proj = self.matmuls[i]
            q = ops.rope_kv_write(qkv_proj(y), positions, self.cos, self.sin, kv[i], slots,
                                  attn.num_heads, attn.num_kv_heads)  # (N, Hq, D)
            o = ctx.attend_cached(i, q, scale=attn.head_dim ** -0.5, sliding_window=attn.sliding_window)
            y = ops.add_rms_norm(o_proj(o.view(n, -1)), h, self.post_norms[i], eps)
            y = ops.add_rms_norm(down_proj(ops.silu_mul(gate_up_proj(y))), h, self.next_norms[i], eps)
        return y  # (N, C): after the final norm, as CausalLM.forward promises


def _direct(linear: torch.nn.Module):
    """x -> linear(x) without the module machinery, for the layer types the runner installs."""
    if type(linear) is torch.nn.Linear:
        weight, bias = linear.weight, linear.bias
        return lambda x: F.linear(x, weight, bias)
    if type(linear) is QLinear:  # its forward() minus the reshape for >2-D inputs
        ext = cpp_kernels.load("quant")
        op = ext.q4_linear if linear.mode == "q4" else ext.q8_linear
        packed, n, bias = linear.packed, linear.out_features, linear.bias
        return lambda x: op(x, packed, n, bias)
    return linear
