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
from textmill.models.hybrid import HybridBlock, HybridForCausalLM, SequenceStates, causal_conv
from textmill.models.llama import Attention, RMSNorm


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


class Block(HybridBlock):
    mixer_name = "conv"

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, RMSNorm, ShortConv, Attention)


class Lfm2ForCausalLM(HybridForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        if config.short_conv < 2 or not config.qk_norm:
            raise ValueError("an LFM2 config gives its convolutions' taps and q/k norms")
        super().__init__(config, Block, RMSNorm)
