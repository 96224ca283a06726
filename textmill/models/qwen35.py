"""Qwen3.5 (dense text: 0.8B to 27B; GGUF files): a hybrid of gated delta nets and attention.

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

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import LinearAttentionShape, ModelConfig
from textmill.models.base import AttentionContext, Embedding
from textmill.models.gemma4 import RMSNorm
from textmill.models.llama import MLP, RotaryEmbedding, apply_rotary, head_logits

L2_EPS = 1e-6  # q and k's L2 norm: x * rsqrt(sum x^2 + eps), the reference's rule


class SequenceStates(Protocol):
    """What a recurrent layer needs of its runner: which rows of the flat batch are whose, and
    each sequence's state (a runner zeroes a state before its sequence's first token)."""

    # (first row, rows, slot) of each sequence of the step, rows in order; a slot indexes the pools
    rows: tuple[tuple[int, int, int], ...]

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's (slots, conv_kernel - 1, channels) convolution inputs and its
        (slots, value_heads, key_dim, value_dim) float32 states (None where the layer has only
        the convolution: LFM2's), updated in place."""
        ...


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
        beta = torch.sigmoid(self.in_proj_b(x).float())  # (N, Hv)
        g = self.A.float() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float())  # (N, Hv)
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


def causal_conv(mixed: torch.Tensor, weight: torch.Tensor, pool: torch.Tensor,
                rows: tuple[tuple[int, int, int], ...], silu: bool = True) -> torch.Tensor:
    """Each sequence's rows through the depthwise convolution (then SiLU, unless not `silu`), the
    taps before its first row taken from the pool's slot, which then keeps its last taps - 1 inputs."""
    out = torch.empty_like(mixed)
    taps = weight.shape[1]
    for first, count, slot in rows:
        seq = torch.cat([pool[slot], mixed[first:first + count]])  # (taps - 1 + count, channels)
        windows = seq.unfold(0, taps, 1)  # (count, channels, taps)
        out[first:first + count] = (windows * weight).sum(-1)
        pool[slot] = seq[count:]
    return F.silu(out) if silu else out


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


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        self.recurrent = layer_idx in config.recurrent_layers
        self.input_layernorm = RMSNorm(C, eps)
        if self.recurrent:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(C, eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                states: SequenceStates) -> torch.Tensor:
        y = self.input_layernorm(x)
        x = x + (self.linear_attn(y, states) if self.recurrent else self.self_attn(y, cos, sin, ctx))
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen35ForCausalLM(nn.Module):
    """The CausalLM protocol of models/base.py, plus the per-sequence states of its recurrent
    layers (`states`, from the runner)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.linear_attention is None or not config.recurrent_layers:
            raise ValueError("a Qwen3.5 config names its linear-attention layers and their shape")
        if config.hidden_act != "silu":
            raise ValueError(f"Qwen3.5 uses SwiGLU, not {config.hidden_act!r}")
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.rotary_dim or config.head_dim, config.max_position_embeddings,
                                      config.rope_theta, freq_factors=config.rope_freq_factors)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                states: SequenceStates) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (N, C)
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx, states)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden, self.embed_tokens, self.lm_head)
