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
        self.embed = model.embed_tokens  # nn.Embedding, or file_weights.RowEmbedding
        self.rotary = model.rotary
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
        h = self.embed(input_ids).float()  # (N, C): the residual stream
        n = h.shape[0]
        y = ops.rms_norm(h, self.input_norms[0], eps)
        slots, kv = ctx.meta.slot_mapping, ctx.cache.kv
        cos, sin = self.rotary.table(positions)  # (N, D/2): this step's rows, indexed 0..N-1 below
        rows = torch.arange(n)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv_proj, o_proj, gate_up_proj, down_proj = self.matmuls[i]
            q = ops.rope_kv_write(qkv_proj(y), rows, cos, sin, kv[i], slots,
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


class GemmaKernelForward:
    """Gemma 3's forward (models/gemma3.py) on the same kernels. Per layer:

        x = rms_norm(h, w_in)                               h: the residual stream
        q = rope_kv_write(qkv_proj(x), ..., q_norm, k_norm)  QK norm, RoPE, k and v cached
        a = rms_norm(o_proj(paged_attention(q)), w_post_attn)
        x = add_rms_norm(a, h, w_pre_ffw)                   h += a
        m = rms_norm(down(gelu_tanh_mul(gate_up(x))), w_post_ffw)
        x = add_rms_norm(m, h, w_next)                      h += m; the next layer's input norm

    Gemma's norms multiply by (1 + w) in float32; the weights are stored that way once here.
    Built for exact gemma3 models whose layers runner/fused.py's fuse_gemma_layers fused."""

    def __init__(self, model: torch.nn.Module, ops: ModuleType):
        self.ops = ops
        self.embed = model.embed_tokens
        self.embed_scale = torch.tensor(model.embed_scale, dtype=torch.float32).item()
        self.eps = model.config.norm_eps
        one_plus = lambda norm: (1.0 + norm.weight.detach().float()).contiguous()  # noqa: E731
        self.layers = list(model.layers)
        self.input_norms = [one_plus(b.input_layernorm) for b in self.layers]
        self.next_norms = self.input_norms[1:] + [one_plus(model.norm)]
        self.norms = [tuple(one_plus(n) for n in (b.post_attention_layernorm, b.pre_feedforward_layernorm,
                                                  b.post_feedforward_layernorm, b.self_attn.q_norm,
                                                  b.self_attn.k_norm)) for b in self.layers]
        self.rotary = (model.rotary_global, model.rotary_local)
        self.sliding = [b.self_attn.is_sliding for b in self.layers]
        self.matmuls = [tuple(_direct(m) for m in (b.self_attn.qkv_proj, b.self_attn.o_proj,
                                                   b.mlp.gate_up_proj, b.mlp.down_proj)) for b in self.layers]
        self._gelu_mul = getattr(ops, "gelu_tanh_mul", None) or _gelu_tanh_mul
        # A kernel build from before rope_kv_write took the QK norm: norm q and k in torch.
        self._fused_qk_norm = "q_norm" in (ops.rope_kv_write.__doc__ or "")

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        from textmill.models import gemma3

        if type(model) is not gemma3.Gemma3ForCausalLM or model.config.attn_logit_softcap:
            return False
        return all(getattr(b.self_attn, "qkv_proj", None) is not None and getattr(b.mlp, "gate_up_proj", None)
                   is not None for b in model.layers)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 ctx: KernelPagedAttention) -> torch.Tensor:
        ops, eps = self.ops, self.eps
        h = self.embed(input_ids).float() * self.embed_scale  # (N, C): the residual stream
        n = h.shape[0]
        y = ops.rms_norm(h, self.input_norms[0], eps)
        slots, kv = ctx.meta.slot_mapping, ctx.cache.kv
        tables = [r.table(positions) for r in self.rotary]  # global, local: (N, D/2) each
        positions = torch.arange(n)  # rows of this step's tables
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv_proj, o_proj, gate_up_proj, down_proj = self.matmuls[i]
            post_attn, pre_ffw, post_ffw, q_norm, k_norm = self.norms[i]
            cos, sin = tables[self.sliding[i]]
            qkv = qkv_proj(y)
            if self._fused_qk_norm:
                q = ops.rope_kv_write(qkv, positions, cos, sin, kv[i], slots, attn.num_heads,
                                      attn.num_kv_heads, q_norm=q_norm, k_norm=k_norm, norm_eps=eps)  # (N, Hq, D)
            else:
                _qk_norm_(qkv, attn.num_heads, attn.num_kv_heads, attn.head_dim, q_norm, k_norm, eps)
                q = ops.rope_kv_write(qkv, positions, cos, sin, kv[i], slots, attn.num_heads, attn.num_kv_heads)
            o = ctx.attend_cached(i, q, scale=attn.scale, sliding_window=attn.sliding_window)
            a = ops.rms_norm(o_proj(o.view(n, -1)), post_attn, eps)
            y = ops.add_rms_norm(a, h, pre_ffw, eps)
            m = ops.rms_norm(down_proj(self._gelu_mul(gate_up_proj(y))), post_ffw, eps)
            y = ops.add_rms_norm(m, h, self.next_norms[i], eps)
        return y  # (N, C): after the final norm


def _qk_norm_(qkv: torch.Tensor, hq: int, hkv: int, d: int, q_w: torch.Tensor, k_w: torch.Tensor,
              eps: float) -> None:
    """Gemma's per-head RMSNorm of q and k, in place in the (N, (Hq + 2 Hkv) D) rows."""
    n = qkv.shape[0]
    for start, heads, w in ((0, hq, q_w), (hq * d, hkv, k_w)):
        x = qkv[:, start:start + heads * d].view(n, heads, d)
        x.copy_(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w)


def _gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up over [gate | up] rows, for kernels built before gelu_tanh_mul."""
    half = gate_up.shape[-1] // 2
    return F.gelu(gate_up[:, :half], approximate="tanh") * gate_up[:, half:]
