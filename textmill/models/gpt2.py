"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused qkv, GELU MLP, biases.

Parameter names follow Hugging Face's GPT2LMHeadModel without the leading "transformer."
(`h.3.attn.c_attn.weight`), but every projection is a plain nn.Linear in (out, in) layout:
the loader transposes HF's Conv1D weights, which are stored (in, out).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import ModelConfig
from textmill.models.base import AttentionContext, Embedding
from textmill.models.llama import head_logits

_GELU_APPROXIMATION = {"gelu_tanh": "tanh", "gelu": "none"}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        C = config.hidden_size
        self.c_attn = nn.Linear(C, 3 * self.num_heads * self.head_dim)  # q, k, v stacked
        self.c_proj = nn.Linear(self.num_heads * self.head_dim, C)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        N, H, D = x.shape[0], self.num_heads, self.head_dim
        q, k, v = self.c_attn(x).view(N, 3, H, D).unbind(1)  # (N, H, D) each
        y = ctx.attend(self.layer_idx, q, k, v, scale=D**-0.5)  # (N, H, D)
        return self.c_proj(y.reshape(N, H * D))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, F_ = config.hidden_size, config.intermediate_size
        self.c_fc = nn.Linear(C, F_)
        self.c_proj = nn.Linear(F_, C)
        self.approximate = _GELU_APPROXIMATION[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        self.ln_1 = nn.LayerNorm(C, eps=eps)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(C, eps=eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    """The CausalLM protocol of models/base.py over a flat batch of N tokens."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act not in _GELU_APPROXIMATION:
            raise ValueError(f"gpt2 uses GELU, not {config.hidden_act!r}")
        if config.num_kv_heads != config.num_heads:
            raise ValueError("gpt2 has as many key/value heads as query heads")
        self.config = config
        self.wte = Embedding(config.vocab_size, config.hidden_size)
        self.wpe = Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # (N, C)
        for block in self.h:
            x = block(x, ctx)
        return self.ln_f(x)  # (N, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden, self.wte, self.lm_head)  # (M, V)
