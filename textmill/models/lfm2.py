"""LFM2 (Liquid AI's 350M to 2.6B; GGUF files): a hybrid of short convolutions and attention.

Most layers mix tokens with a short convolution instead of attention: one projection gives B, C
and x (each hidden wide); B * x goes through a causal depthwise convolution of a few taps (3),
whose output times C is projected back. Its memory of a sequence is the convolution's last taps - 1
inputs (runner/recurrent_state.py keeps one per running request). The other layers
(ModelConfig.recurrent_layers names the convolutions) are Llama's attention with Qwen3's
per-head q and k norms; every layer has Llama's SwiGLU MLP and RMSNorms before the mixer and the
MLP.
"""
from __future__ import annotations

import torch
from torch import nn

from textmill.config import ModelConfig
from textmill.models.base import AttentionContext, Embedding
from textmill.models.llama import MLP, Attention, RMSNorm, RotaryEmbedding, head_logits
from textmill.models.qwen35 import SequenceStates, causal_conv


class ShortConv(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        C = config.hidden_size
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(C, 3 * C, bias=False)
        self.conv_weight = nn.Parameter(torch.zeros(C, config.short_conv))  # (channels, taps)
        self.out_proj = nn.Linear(C, C, bias=False)

    def forward(self, x: torch.Tensor, states: SequenceStates) -> torch.Tensor:
        b, c, h = self.in_proj(x).float().chunk(3, dim=-1)
        conv, _ = states.pools(self.layer_idx)
        y = c * causal_conv(b * h, self.conv_weight.float(), conv, states.rows, silu=False)
        return self.out_proj(y.to(x.dtype))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        self.recurrent = layer_idx in config.recurrent_layers
        self.input_layernorm = RMSNorm(C, eps)
        if self.recurrent:
            self.conv = ShortConv(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(C, eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                states: SequenceStates) -> torch.Tensor:
        y = self.input_layernorm(x)
        x = x + (self.conv(y, states) if self.recurrent else self.self_attn(y, cos, sin, ctx))
        return x + self.mlp(self.post_attention_layernorm(x))


class Lfm2ForCausalLM(nn.Module):
    """The CausalLM protocol of models/base.py, plus the per-sequence states of its convolutions
    (`states`, from the runner)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.short_conv < 2 or not config.recurrent_layers or not config.qk_norm:
            raise ValueError("an LFM2 config names its convolution layers, their taps, and q/k norms")
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
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
