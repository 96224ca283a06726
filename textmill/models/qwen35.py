"""Qwen3.5 (dense text: 0.8B to 27B; GGUF files): a hybrid of gated delta nets and attention. Its
mixture of experts (Qwen3.5 MoE) and Qwen3-Next are these layers with experts in the MLP.

Three layers in four (ModelConfig.recurrent_layers) are gated delta nets ("linear attention"):
their memory of a sequence is a fixed-size state, not a cache that grows with it. Per token t
and value head, with q and k L2-normed (q also times key_dim ** -0.5):

    S = S * exp(g_t)                         g_t = A * softplus(alpha_t + dt_bias)   (A < 0)
    S = S + k_t (beta_t (v_t - S^T k_t))^T   beta_t = sigmoid(b_t)                   (S: key_dim x value_dim)
    o_t = S^T q_t

q, k and v come out of one projection through a causal depthwise convolution of 4 taps and a
SiLU, so a sequence's state is S of every value head plus the convolution's last 3 inputs
(runner/recurrent_state.py keeps one per running request). The output is RMS-normed per head,
times the norm's weight and silu(z) of a second projection, then projected back.

The other layers are Qwen3's attention with two changes: q_proj also gives each head a gate,
and the attention's output is multiplied by its sigmoid (the loader puts the queries first and the
gates after them, names.ungate_rows); RoPE turns the first quarter of each
head (rotary_dim; M-RoPE's sections all take the one position a text token has).

Every RMSNorm multiplies by its weight as stored: llama.cpp's converter stores Qwen3.5's
(1 + w) norm weights with the 1 added, and the gated norm's weight as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import ModelConfig
from textmill.linear_attention import LinearAttentionShape
from textmill.models.base import AttentionContext
from textmill.models.gemma4 import RMSNorm
from textmill.models.hybrid import HybridBlock, HybridForCausalLM, SequenceStates, causal_conv
from textmill.models.llama import apply_rotary

L2_EPS = 1e-6  # q and k's L2 norm: x * rsqrt(sum x^2 + eps), the reference's rule


class Attention(nn.Module):
    """Qwen3's attention with a sigmoid gate per head on its output."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        C, D, eps = config.hidden_size, config.head_dim, config.norm_eps
        # All heads' queries, then all heads' gates (the loader moves the file's per-head [q, gate] so).
        self.q_proj = nn.Linear(C, self.num_heads * D * 2, bias=False)
        self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(C, self.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=False)
        self.q_norm = RMSNorm(D, eps)
        self.k_norm = RMSNorm(D, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        N, H, D = x.shape[0], self.num_heads, self.head_dim
        q, gate = self.q_proj(x).view(N, 2, H, D).unbind(1)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(N, self.num_kv_heads, D)), cos, sin)
        v = self.v_proj(x).view(N, self.num_kv_heads, D)
        y = ctx.attend(self.layer_idx, q, k, v, scale=D**-0.5)  # (N, H, D)
        return self.o_proj((y * torch.sigmoid(gate)).reshape(N, H * D))


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        shape = config.linear_attention
        assert shape is not None
        self.layer_idx, self.shape = layer_idx, shape
        C, Hv, Dv = config.hidden_size, shape.value_heads, shape.value_dim
        self.in_proj_qkv = nn.Linear(C, shape.conv_channels, bias=False)
        self.in_proj_z = nn.Linear(C, Hv * Dv, bias=False)
        if shape.fused_ba:  # Qwen3-Next's: b's rows, then a's
            self.in_proj_ba = nn.Linear(C, 2 * Hv, bias=False)
        else:
            self.in_proj_b = nn.Linear(C, Hv, bias=False)
            self.in_proj_a = nn.Linear(C, Hv, bias=False)
        self.conv_weight = nn.Parameter(torch.zeros(shape.conv_channels, shape.conv_kernel))  # (channels, taps)
        self.dt_bias = nn.Parameter(torch.zeros(Hv))
        self.A = nn.Parameter(torch.zeros(Hv))  # -exp(A_log), as the files store it
        self.norm = RMSNorm(Dv, config.norm_eps)
        self.out_proj = nn.Linear(Hv * Dv, C, bias=False)

    def forward(self, x: torch.Tensor, states: SequenceStates) -> torch.Tensor:
        N, s = x.shape[0], self.shape
        mixed = self.in_proj_qkv(x).float()  # (N, channels)
        conv, ssm = states.pools(self.layer_idx)
        mixed = causal_conv(mixed, self.conv_weight.float(), conv, states.rows)
        q, k, v = mixed.split([s.key_heads * s.key_dim, s.key_heads * s.key_dim, s.value_heads * s.value_dim], -1)
        q = l2_normalize(q.view(N, s.key_heads, s.key_dim)) * s.key_dim**-0.5
        k = l2_normalize(k.view(N, s.key_heads, s.key_dim))
        heads = value_head_sources(s)  # each value head's q/k head
        q, k = q.index_select(1, heads), k.index_select(1, heads)  # (N, Hv, Dk)
        if s.fused_ba:
            b, a = self.in_proj_ba(x).float().split(s.value_heads, -1)
        else:
            b, a = self.in_proj_b(x).float(), self.in_proj_a(x).float()
        beta = torch.sigmoid(b)  # (N, Hv)
        g = self.A.float() * F.softplus(a + self.dt_bias.float())  # (N, Hv)
        o = gated_delta_rule(q, k, v.view(N, s.value_heads, s.value_dim), g, beta, ssm, states.rows)
        z = self.in_proj_z(x).view(N, s.value_heads, s.value_dim).float()
        o = self.norm(o) * F.silu(z)
        return self.out_proj(o.reshape(N, -1).to(x.dtype))


def value_head_sources(shape: LinearAttentionShape) -> torch.Tensor:
    """The q/k head each value head reads: tiled (llama.cpp's files) or grouped (the Hub's)."""
    j = torch.arange(shape.value_heads)
    return j % shape.key_heads if shape.tiled_heads else j // (shape.value_heads // shape.key_heads)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     pool: torch.Tensor, rows: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """(N, Hv, Dv): each sequence's tokens in order through its state in `pool`, updated in place
    (float32 throughout)."""
    out = torch.empty_like(v)
    for first, count, slot in rows:
        S = pool[slot]  # (Hv, Dk, Dv)
        for t in range(first, first + count):
            S.mul_(g[t].exp()[:, None, None])
            remembered = torch.einsum("hkv,hk->hv", S, k[t])
            delta = (v[t] - remembered) * beta[t][:, None]
            S.add_(k[t][:, :, None] * delta[:, None, :])
            out[t] = torch.einsum("hkv,hk->hv", S, q[t])
    return out


class Block(HybridBlock):
    mixer_name = "linear_attn"

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, RMSNorm, GatedDeltaNet, Attention)


class Qwen35ForCausalLM(HybridForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        if config.linear_attention is None:
            raise ValueError("a Qwen3.5 config gives its linear-attention layers' shape")
        super().__init__(config, Block, RMSNorm)
