"""Qwen3 (dense: Qwen3 0.6B to 32B): Llama with a per-head RMSNorm of q and k before RoPE.

The norms are Llama's RMSNorm over each head's D values (ModelConfig.qk_norm), the
projections have no biases, and head_dim is the checkpoint's own (128 for every size, not
hidden / heads). Everything else is llama.py's.
"""
from __future__ import annotations

from textmill.config import ModelConfig
from textmill.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        if not config.qk_norm:
            raise ValueError("qwen3 norms q and k per head: ModelConfig.qk_norm must be True")
        super().__init__(config)
