"""Granite 4.0-H (IBM's 350M to 32B-A9B; GGUF files): a hybrid of Mamba-2 layers and attention.

Most layers (ModelConfig.recurrent_layers) are Mamba-2 mixers ("state space duality"): their memory
of a sequence is a fixed-size state per head, not a cache that grows with it. One projection gives

    [z | x | B | C | dt] = in_proj(y)        x: heads x head_dim;  B, C: groups x state_size

x, B and C go through a causal depthwise convolution of 4 taps with a bias, and a SiLU. Then per
token t and head h (its B and C those of its group, h // (heads / groups)):

    dt = softplus(dt_t + dt_bias)
    S = S * exp(dt * A) + B_t (dt x_t)^T     (A = -exp(A_log) < 0; S: state_size x head_dim)
    y_t = S^T C_t + D * x_t

The heads' outputs, times silu(z), are RMS-normed in groups (each group's heads together, the same
groups as B's and C's) times the norm's weight, then projected back. A sequence's state is S of every
head plus the convolution's last 3 inputs (runner/recurrent_state.py keeps one per running request;
their shape is config.linear_attention's: key_heads the groups, key_dim the state size, value_heads
the heads, value_dim the head width).

The other layers are Llama's attention (Granite 4.0-H's take no RoPE: NoPE, config.no_rope_layers).
Every layer ends with a SwiGLU MLP (the dense models') or a mixture of experts with an ungated shared
expert (H-Tiny, H-Small), and Granite's multipliers scale the embedding, every mixer's and MLP's
output as it joins the residual stream, the attention's scores and the logits (as models/llama.py's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import ModelConfig
from textmill.models.hybrid import HybridBlock, HybridForCausalLM, SequenceStates, causal_conv
from textmill.models.llama import Attention, RMSNorm


class DepthwiseConv(nn.Module):
    """The convolution's (channels, taps) weight and its bias, named as the files name them."""

    def __init__(self, channels: int, taps: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, taps))
        self.bias = nn.Parameter(torch.zeros(channels))


class Mamba2(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        s = config.linear_attention
        assert s is not None
        self.layer_idx, self.shape, self.eps = layer_idx, s, config.norm_eps
        self.inner = s.value_heads * s.value_dim
        C, H = config.hidden_size, s.value_heads
        self.in_proj = nn.Linear(C, self.inner + s.conv_channels + H, bias=False)  # [z | x B C | dt]
        self.conv1d = DepthwiseConv(s.conv_channels, s.conv_kernel)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A = nn.Parameter(torch.zeros(H))  # -exp(A_log), as the files store it
        self.D = nn.Parameter(torch.zeros(H))
        # grouped: forward norms each group alone; None: y silu(z) alone (Falcon-H1's files without ssm_norm)
        self.norm = RMSNorm(self.inner, config.norm_eps) if s.gated_norm else None
        self.out_proj = nn.Linear(self.inner, C, bias=False)

    def forward(self, x: torch.Tensor, states: SequenceStates) -> torch.Tensor:
        N, s = x.shape[0], self.shape
        H, P, G, Ns = s.value_heads, s.value_dim, s.key_heads, s.key_dim
        z, xbc, dt = self.in_proj(x).float().split([self.inner, s.conv_channels, H], -1)
        conv, ssm = states.pools(self.layer_idx)
        xbc = causal_conv(xbc, self.conv1d.weight.float(), conv, states.rows, bias=self.conv1d.bias.float())
        xs, B, C = xbc.split([self.inner, G * Ns, G * Ns], -1)
        xs = xs.reshape(N, H, P)
        dt = F.softplus(dt + self.dt_bias.float())  # (N, H)
        y = selective_scan(xs, B.reshape(N, G, Ns), C.reshape(N, G, Ns), dt, self.A.float(), ssm, states.rows)
        y = (y + xs * self.D.float()[:, None]).reshape(N, self.inner) * F.silu(z)
        if self.norm is not None:
            groups = y.view(N, G, -1)
            y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).view(N, -1)
            y = y * self.norm.weight.float()
        return self.out_proj(y.to(x.dtype))


def selective_scan(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                   pool: torch.Tensor, rows: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """(N, H, P): each sequence's tokens in order through its state in `pool` (slots, H, Ns, P), updated
    in place (float32 throughout); B and C (N, G, Ns), each head reading its group's."""
    per_group = x.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(per_group, dim=1), C.repeat_interleave(per_group, dim=1)  # (N, H, Ns)
    out = torch.empty_like(x)
    for first, count, slot in rows:
        S = pool[slot]  # (H, Ns, P)
        for t in range(first, first + count):
            S.mul_((dt[t] * A).exp()[:, None, None])
            S.add_(B[t][:, :, None] * (dt[t][:, None] * x[t])[:, None, :])
            out[t] = torch.einsum("hnp,hn->hp", S, C[t])
    return out


class Block(HybridBlock):
    mixer_name = "mamba"

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, RMSNorm, Mamba2, Attention)


class GraniteHybridForCausalLM(HybridForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        if config.linear_attention is None or config.logit_scale is None:
            raise ValueError("a Granite 4.0-H config gives its Mamba-2 layers' shape and Granite's multipliers")
        super().__init__(config, Block, RMSNorm)
