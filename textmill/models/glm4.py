"""GLM-4 (GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1; GGUF files): Llama with four norms a layer.

Each layer norms its input, the attention's output (post_self_attn_layernorm) before it joins the
residual stream, the MLP's input (post_attention_layernorm) and the MLP's output
(post_mlp_layernorm), all RMSNorms that multiply by their weight. q, k and v have biases; RoPE
turns the first half of each head (ModelConfig.rotary_dim). GLM's RoPE pairs each even value with
the odd one after it; the loader reorders those rows of q and k to the rotate-half pairs the
models here use (names.unpermute_partial_rope_rows). The MLP is a SwiGLU whose gate and up come as
one tensor in the file (split by loader/names.py FUSED_GGUF).
"""
from __future__ import annotations

import torch
from torch import nn

from textmill.config import ModelConfig
from textmill.models import llama
from textmill.models.base import AttentionContext


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        self.input_layernorm = llama.RMSNorm(C, eps)
        self.self_attn = llama.Attention(config, layer_idx)
        self.post_self_attn_layernorm = llama.RMSNorm(C, eps)
        self.post_attention_layernorm = llama.RMSNorm(C, eps)
        self.mlp = llama.MLP(config)
        self.post_mlp_layernorm = llama.RMSNorm(C, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, ctx))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm4ForCausalLM(llama.LlamaForCausalLM):
    block_class = Block
