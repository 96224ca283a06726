"""Nemotron-H (NVIDIA's Nemotron-H 4B to 56B, Nemotron Nano 9B and 12B v2; GGUF files): a hybrid whose
every layer is one pre-normed sublayer joining the residual stream, of three kinds:

    a Mamba-2 mixer (ModelConfig.recurrent_layers; models/granite_hybrid.py's, with 8 groups of B and C),
    attention (Llama's, without RoPE), or
    an MLP (ModelConfig.mlp_only_layers): down(relu(up(x))^2), no gate.

So a layer that mixes tokens has no MLP of its own and an MLP layer no mixer; the MLP layers keep no
KV cache and no state. In the mixture-of-experts models (Nemotron 3 Nano, `nemotron_h_moe` files) the
MLP layers are experts of that ReLU^2 MLP beside a shared one, chosen by a sigmoid router with a
selection bias and weighted by its sigmoids renormalized, times 2.5 (ModelConfig.router_scale).
"""
from __future__ import annotations

import torch
from torch import nn

from textmill.config import ModelConfig
from textmill.models.base import AttentionContext
from textmill.models.granite_hybrid import Mamba2
from textmill.models.hybrid import HybridForCausalLM, SequenceStates
from textmill.models.llama import Attention, RMSNorm
from textmill.models.moe import SparseMoE


class ReluSquaredMLP(nn.Module):
    def __init__(self, config: ModelConfig, width: int | None = None) -> None:
        super().__init__()
        width = width or config.intermediate_size  # width: an expert's
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu_squared(self.up_proj(x)))


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2: exact products, the same bits whatever else shares the call."""
    x = torch.relu(x)
    return x * x


class Block(nn.Module):
    mixer_name = "mamba"

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.recurrent = layer_idx in config.recurrent_layers
        self.mlp_only = layer_idx in config.mlp_only_layers
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        if self.recurrent:
            self.mamba = Mamba2(config, layer_idx)
        elif self.mlp_only:
            self.mlp = (SparseMoE(config, lambda width: ReluSquaredMLP(config, width)) if config.num_experts
                        else ReluSquaredMLP(config))
        else:
            self.self_attn = Attention(config, layer_idx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                states: SequenceStates) -> torch.Tensor:
        y = self.input_layernorm(x)
        if self.recurrent:
            return x + self.mamba(y, states)
        if self.mlp_only:
            return x + self.mlp(y)
        return x + self.self_attn(y, cos, sin, ctx)


class NemotronHForCausalLM(HybridForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        if config.linear_attention is None or not config.mlp_only_layers:
            raise ValueError("a Nemotron-H config gives its Mamba-2 layers' shape and its MLP layers")
        super().__init__(config, Block, RMSNorm, hidden_act="relu2")
