"""Falcon-H1 (TII's 0.5B to 34B, Falcon-H1R; GGUF files): attention and a Mamba-2 mixer side by side in
every layer (ModelConfig.parallel_mixers), then a SwiGLU MLP:

    y = input_layernorm(x)
    x = x + attention(y) + mamba(y)          (Llama's attention with RoPE; models/granite_hybrid.py's mixer)
    x = x + mlp(pre_ff_layernorm(x))

So every layer keeps both a KV cache and a recurrent state. Falcon-H1's muP multipliers (on the
embedding, the head, each projection and each part of the mixer's projection) are multiplied into the
weights by llama.cpp's converter (conversion/falcon_h1.py), so the file's model is this plain one. Its
mixers' gated norm is optional (`mamba_rms_norm`; LinearAttentionShape.gated_norm).
"""
from __future__ import annotations

import torch
from torch import nn

from textmill.config import ModelConfig
from textmill.models.base import AttentionContext
from textmill.models.granite_hybrid import Mamba2
from textmill.models.hybrid import HybridForCausalLM, SequenceStates
from textmill.models.llama import Attention, RMSNorm, feed_forward


class Block(nn.Module):
    mixer_name = "mamba"
    recurrent = True  # every layer: a state beside its KV

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        self.input_layernorm = RMSNorm(C, eps)
        self.self_attn = Attention(config, layer_idx)
        self.mamba = Mamba2(config, layer_idx)
        self.pre_ff_layernorm = RMSNorm(C, eps)
        self.mlp = feed_forward(config, layer_idx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                states: SequenceStates) -> torch.Tensor:
        y = self.input_layernorm(x)
        x = x + (self.mamba(y, states) + self.self_attn(y, cos, sin, ctx))
        return x + self.mlp(self.pre_ff_layernorm(x))


class FalconH1ForCausalLM(HybridForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        if config.linear_attention is None or not config.parallel_mixers:
            raise ValueError("a Falcon-H1 config gives its Mamba-2 mixers' shape beside attention in every layer")
        super().__init__(config, Block, RMSNorm)
