"""OLMo 2 (1B to 32B) and EXAONE 4.0: Llama with its norms moved.

- no norm on the attention's and the MLP's inputs: each output is RMS-normed instead, before
  it joins the residual stream (post_attention_layernorm, post_feedforward_layernorm);
- q and k RMS-normed before RoPE (ModelConfig.qk_norm): OLMo 2 over the whole projection,
  all heads together (qk_norm_whole: H x D and Hkv x D weights), EXAONE 4.0 each head alone
  as Qwen3 (llama.py's norm_heads takes either).

Everything else (SwiGLU, rotate-half RoPE, the final norm, the head) is llama.py's, so the
fused and kernel forwards take its attention and MLP as Llama's.
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
        self.self_attn = llama.Attention(config, layer_idx)
        self.post_attention_layernorm = llama.RMSNorm(C, eps)
        self.mlp = llama.MLP(config)
        self.post_feedforward_layernorm = llama.RMSNorm(C, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, ctx))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2ForCausalLM(llama.LlamaForCausalLM):
    block_class = Block

    def __init__(self, config: ModelConfig) -> None:
        if config.attention_bias or config.residual_multiplier is not None or not config.qk_norm:
            raise ValueError("OLMo 2 norms q and k and has no attention biases or residual multiplier")
        super().__init__(config)
