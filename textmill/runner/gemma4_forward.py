"""Gemma 4's forward pass (models/gemma4.py) on textmill's C++ kernels (float32 CPU).

The model states the math in ~60 eager ops a layer; this runs it in about twenty calls, all of
them row by row (the 2- to 8-bit linears, layer.cpp's norms, RoPE and paged attention, and exact
elementwise torch ops), so a position gets the same bits in a prompt chunk as in a one-token step
and guessed tokens can be checked in one step (docs/architecture.md). Per layer:

    y = rms_norm(h, w_in)
    q = rope_kv_write(qkv_proj(y) with v rms-normed, ..., q_norm, k_norm)   k and v cached
        (a shared layer: q = rope(rms_norm(q_proj(y), q_norm)), no cache write)
    a = rms_norm(o_proj(paged_attention(q over the layer's source pool)), w_post_attn)
    y = add_rms_norm(a, h, w_pre_ffw)                      h += a
    h += rms_norm(down(gelu_tanh_mul(gate_up(y))), w_post_ffw)
    h += rms_norm(proj(gelu_tanh_mul([inp_gate(h) | per_layer_i])), w_post_ple)   E2B, E4B
    h *= layer_scalar

From the first shared layer on only the rows the step reads are computed (`keep`), each a
one-token query over its sequence (AttentionMetadata.for_rows): those layers write no cache.
Built for Gemma4ForCausalLM whose layers runner/fused.py's fuse_gemma4_layers fused.
"""
from __future__ import annotations

import math
from types import ModuleType

import torch

from textmill.models import gemma4
from textmill.runner.kernel_attention import KernelPagedAttention
from textmill.runner.kernel_forward import KernelForwardBase, direct_call


def _weight(norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight.detach().float().contiguous()


class Gemma4KernelForward(KernelForwardBase):
    """KernelForwardBase's place in the runner (rows kept, chunks that match steps), with a layer
    loop of its own: Gemma 4's layers differ in head width, KV source and MLP width, and add the
    per-layer inputs after the MLP."""

    def __init__(self, model: gemma4.Gemma4ForCausalLM, ops: ModuleType):
        # Not KernelForwardBase.__init__: that one reads the Llama families' four fused linears.
        self.ops, self.model, self.one_call = ops, model, None
        config = model.config
        self.eps, self.config = config.norm_eps, config
        self.embed = model.embed_tokens
        self.embed_scale = gemma4.rounded_scale(math.sqrt(config.hidden_size), model.embed_tokens)
        self.first_shared = config.num_layers - config.kv_shared_layers
        self.layers = list(model.layers)
        self.final_norm = _weight(model.norm)
        self.attn = [b.self_attn for b in self.layers]
        self.matmuls = [(direct_call(a.qkv_proj if a.source == i else a.q_proj), direct_call(a.o_proj),
                         direct_call(b.mlp.gate_up_proj), direct_call(b.mlp.down_proj))
                        for i, (a, b) in enumerate(zip(self.attn, self.layers))]
        self.norms = [(_weight(b.input_layernorm), _weight(b.self_attn.q_norm),
                       _weight(b.self_attn.k_norm) if b.self_attn.source == i else None,
                       _weight(b.post_attention_layernorm), _weight(b.pre_feedforward_layernorm),
                       _weight(b.post_feedforward_layernorm)) for i, b in enumerate(self.layers)]
        self.scalars = [1.0 if b.layer_scalar is None else float(b.layer_scalar) for b in self.layers]
        # V's norm has no weight: rms_norm's times 1, which is exact, for each head width.
        self.ones = {a.head_dim: torch.ones(a.head_dim) for a in self.attn}
        P = config.per_layer_input_size
        self.per_layer_norm = _weight(model.per_layer_projection_norm) if P else None  # of the mixed half
        self.per_layer = [(direct_call(b.per_layer_input_gate), direct_call(b.per_layer_projection),
                           _weight(b.post_per_layer_input_norm)) for b in self.layers] if P else None
        # The global layers of a model whose V is k_proj's output (31B): k copied before its norm.
        self.k_is_v = [config.attention_k_eq_v and not a.is_sliding for a in self.attn]

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        if type(model) is not gemma4.Gemma4ForCausalLM:
            return False
        return all(getattr(b.mlp, "gate_up_proj", None) is not None
                   and (b.self_attn.source != i or getattr(b.self_attn, "qkv_proj", None) is not None)
                   for i, b in enumerate(model.layers))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: KernelPagedAttention,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        ops, eps = self.ops, self.eps
        h = self.embed(input_ids).float() * self.embed_scale  # (N, C): the residual stream
        per_layer = self._per_layer_inputs(input_ids, h)  # (N, L, P) or None
        tables = (self.model.rotary_global.table(positions), self.model.rotary_local.table(positions))
        rows = torch.arange(h.shape[0])
        for i in range(len(self.layers)):
            if i == self.first_shared and keep is not None:
                h, ctx, rows = h.index_select(0, keep), ctx.for_rows(keep), None  # rows: the tables', below
                per_layer = None if per_layer is None else per_layer.index_select(0, keep)
                tables = tuple(tuple(t.index_select(0, keep) for t in pair) for pair in tables)
                keep = None
                if h.shape[0] == 0:
                    return h
            h = self._layer(i, h, None if per_layer is None else per_layer[:, i].contiguous(), tables, rows, ctx)
        y = ops.rms_norm(h, self.final_norm, eps)
        return y if keep is None else y.index_select(0, keep)

    def _per_layer_inputs(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        model, P, L = self.model, self.config.per_layer_input_size, self.config.num_layers
        if not P:
            return None
        table = model.embed_tokens_per_layer
        own = table(input_ids).float() * gemma4.rounded_scale(math.sqrt(P), table)
        mixed = model.per_layer_model_projection(h) * self.config.hidden_size**-0.5  # (N, L * P)
        mixed = self.ops.rms_norm(mixed.view(-1, P), self.per_layer_norm, self.eps)
        return (mixed.view(-1, L, P) + own.view(-1, L, P)) * gemma4.PER_LAYER_INPUT_SCALE

    def _layer(self, i: int, h: torch.Tensor, per_layer: torch.Tensor | None,
               tables: tuple[tuple[torch.Tensor, torch.Tensor], ...], rows: torch.Tensor | None,
               ctx: KernelPagedAttention) -> torch.Tensor:
        ops, eps, attn = self.ops, self.eps, self.attn[i]
        proj, o_proj, gate_up, down = self.matmuls[i]
        w_in, w_q, w_k, w_post_attn, w_pre_ffw, w_post_ffw = self.norms[i]
        cos, sin = tables[1 if attn.is_sliding else 0]
        y = ops.rms_norm(h, w_in, eps)
        n, hq, hkv, d = h.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
        if attn.source == i:
            qkv = proj(y)
            if self.k_is_v[i]:  # V is k_proj's output: [q | k | k]
                qkv = torch.cat([qkv, qkv[:, hq * d:]], dim=1)
            v = qkv[:, (hq + hkv) * d:]
            v.copy_(ops.rms_norm(v.reshape(n * hkv, d).contiguous(), self.ones[d], eps).view(n, hkv * d))
            q = ops.rope_kv_write(qkv, rows, cos, sin, ctx.cache.kv[i], ctx.meta.slot_mapping, hq, hkv,
                                  q_norm=w_q, k_norm=w_k, norm_eps=eps)  # (N, Hq, D)
        else:  # a shared layer: q alone, normed and turned; its source wrote this step's k and v
            q = ops.rms_norm(proj(y).view(n * hq, d), w_q, eps).view(n, hq, d)
            q = gemma4.apply_rotary(q, cos[:, None, :], sin[:, None, :]).contiguous()  # tables: h's rows
        o = ctx.attend_cached(attn.source, q, scale=1.0, sliding_window=attn.sliding_window)
        a = ops.rms_norm(o_proj(o.flatten(1)), w_post_attn, eps)
        y = ops.add_rms_norm(a, h, w_pre_ffw, eps)  # h += a
        h.add_(ops.rms_norm(down(ops.gelu_tanh_mul(gate_up(y))), w_post_ffw, eps))
        if per_layer is not None:
            inp_gate, ple_proj, w_ple = self.per_layer[i]
            gated = ops.gelu_tanh_mul(torch.cat([inp_gate(h), per_layer], dim=1))
            h.add_(ops.rms_norm(ple_proj(gated), w_ple, eps))
        return h.mul_(self.scalars[i]) if self.scalars[i] != 1.0 else h
