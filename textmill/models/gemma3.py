"""Gemma 2 and Gemma 3 (text): Llama's skeleton with Gemma's changes.

- embeddings scaled by sqrt(hidden), the scale rounded to the weight dtype as in the reference;
- RMSNorm computes x_hat * (1 + weight) in float32 (checkpoints store weight around 0);
- four norms per block: before and after attention, before and after the MLP;
- per-head RMSNorm on q and k before RoPE ("QK norm"; Gemma 3 only: config.qk_norm);
- attention scale query_pre_attn_scalar ** -0.5 rather than head_dim ** -0.5;
- sliding-window (local) layers and global layers, each with its own RoPE base; linear
  RoPE scaling, where the config has it, applies to the global layers only;
- GeGLU MLP with the tanh approximation of GELU;
- optional soft-capping of attention scores and of the final logits (Gemma 2 has both).

Gemma 2 is the same network without the QK norm, with every other layer local and one RoPE
base for all layers (its config says so); Gemma 1 has neither soft-caps nor local layers, and
norms only the attention's and the MLP's inputs (config.post_norms False). The registry maps
the three families here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import ModelConfig
from textmill.models.base import AttentionContext, Embedding
from textmill.models.llama import RotaryEmbedding, apply_rotary, head_logits, is_sliding_layer


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unlike Llama, the weight multiplies in float32, before the cast back (as HF does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.is_sliding = is_sliding_layer(config, layer_idx)
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.softcap = config.attn_logit_softcap
        scalar = config.query_pre_attn_scalar or config.head_dim
        self.scale = scalar**-0.5
        C, D, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(C, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=bias)
        self.q_norm = GemmaRMSNorm(D, config.norm_eps) if config.qk_norm else None
        self.k_norm = GemmaRMSNorm(D, config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        N, D = x.shape[0], self.head_dim
        q = self.q_proj(x).view(N, self.num_heads, D)  # (N, Hq, D)
        k = self.k_proj(x).view(N, self.num_kv_heads, D)  # (N, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(N, self.num_kv_heads, D)  # (N, Hkv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer_idx, q, k, v, scale=self.scale,
                       sliding_window=self.sliding_window, logit_softcap=self.softcap)  # (N, Hq, D)
        return self.o_proj(y.reshape(N, self.num_heads * D))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)). `width`: Gemma 4's per-layer one (default the config's)."""

    def __init__(self, config: ModelConfig, width: int | None = None) -> None:
        super().__init__()
        C, F_ = config.hidden_size, width or config.intermediate_size
        self.gate_proj = nn.Linear(C, F_, bias=False)
        self.up_proj = nn.Linear(C, F_, bias=False)
        self.down_proj = nn.Linear(F_, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        self.input_layernorm = GemmaRMSNorm(C, eps)
        self.self_attn = Attention(config, layer_idx)
        # Gemma 1: no norm on the outputs (None), only on the inputs.
        self.post_attention_layernorm = GemmaRMSNorm(C, eps) if config.post_norms else None
        self.pre_feedforward_layernorm = GemmaRMSNorm(C, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(C, eps) if config.post_norms else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        x = x + (a if self.post_attention_layernorm is None else self.post_attention_layernorm(a))
        m = self.mlp(self.pre_feedforward_layernorm(x))
        return x + (m if self.post_feedforward_layernorm is None else self.post_feedforward_layernorm(m))


class Gemma3ForCausalLM(nn.Module):
    """The CausalLM protocol of models/base.py over a flat batch of N tokens."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        plain_rope = config.rotary_dim in (None, config.head_dim) and not config.rope_freq_factors
        if not plain_rope or config.rope_attention_factor != 1:
            raise ValueError("Gemma with partial rotary embeddings or per-frequency RoPE factors is not supported")
        if config.hidden_act != "gelu_tanh":
            raise ValueError(f"Gemma uses GeGLU with tanh GELU, not {config.hidden_act!r}")
        self.config = config
        self.embed_scale = math.sqrt(config.hidden_size)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.norm_eps)
        P, D = config.max_position_embeddings, config.head_dim
        self.rotary_global = RotaryEmbedding(D, P, config.rope_theta, config.rope_scaling_factor)
        self.rotary_local = RotaryEmbedding(D, P, config.rope_local_theta or config.rope_theta)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        # The reference multiplies by the scale already rounded to the weight dtype.
        scale = torch.tensor(self.embed_scale, dtype=self.embed_tokens.weight.dtype).item()
        x = self.embed_tokens(input_ids) * scale  # (N, C)
        rope_global = self.rotary_global(positions)  # (cos, sin), (N, 1, D/2) each
        rope_local = self.rotary_local(positions)
        for layer in self.layers:
            cos, sin = rope_local if layer.self_attn.is_sliding else rope_global
            x = layer(x, cos, sin, ctx)
        return self.norm(x)  # (N, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = head_logits(hidden, self.embed_tokens, self.lm_head)  # (M, V), this call's own
        cap = self.config.final_logit_softcap
        # Gemma 2's soft cap in place: the same three ops as tanh(logits / cap) * cap, with no
        # (M, V) temporaries (262k wide; the runner's head writes into a reused buffer).
        return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)
