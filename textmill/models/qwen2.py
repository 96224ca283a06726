"""Qwen2 (Qwen2, Qwen2.5, Qwen2.5-Coder): Llama with a bias on the q, k and v projections.

Everything else (RMSNorm, rotate-half RoPE, GQA, SwiGLU, an lm_head that is tied or not) is
Llama's, so the model is llama.py's with the biases switched on; o_proj has no bias.
"""
from __future__ import annotations

from textmill.config import ModelConfig
from textmill.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        if not config.attention_bias:
            raise ValueError("qwen2 has biases on q/k/v: ModelConfig.attention_bias must be True")
        super().__init__(config)
