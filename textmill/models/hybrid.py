"""What the hybrids share. HybridBlock (models/qwen35.py, models/lfm2.py, models/granite_hybrid.py): a
layer either recurrent (a state per sequence, handed over by the runner as `states`) or attention,
followed by a SwiGLU MLP or a mixture of SwiGLU experts (models/moe.py: Qwen3.5 MoE, LFM2 MoE, Granite
4.0-H's), both pre-normed, with Granite's multipliers where the config gives them. HybridForCausalLM
(those and models/nemotron_h.py, models/falcon_h1.py, whose blocks are their own): the embedding, the
layers over the states, the head. And the causal depthwise convolution every family's recurrent layers
start with.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import ModelConfig
from textmill.models.base import AttentionContext, Embedding
from textmill.models.llama import RotaryEmbedding, feed_forward, head_logits


class SequenceStates(Protocol):
    """What a recurrent layer needs of its runner: which rows of the flat batch are whose, and
    each sequence's state (a runner zeroes a state before its sequence's first token)."""

    # (first row, rows, slot) of each sequence of the step, rows in order; a slot indexes the pools
    rows: tuple[tuple[int, int, int], ...]

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's (slots, conv_kernel - 1, channels) convolution inputs and its
        (slots, value_heads, key_dim, value_dim) float32 states (None where the layer has only
        the convolution: LFM2's), updated in place."""
        ...


def causal_conv(mixed: torch.Tensor, weight: torch.Tensor, pool: torch.Tensor,
                rows: tuple[tuple[int, int, int], ...], silu: bool = True,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's rows through the depthwise convolution (plus `bias`, Mamba-2's; then SiLU, unless
    not `silu`), the taps before its first row taken from the pool's slot, which then keeps its last
    taps - 1 inputs."""
    out = torch.empty_like(mixed)
    taps = weight.shape[1]
    for first, count, slot in rows:
        seq = torch.cat([pool[slot], mixed[first:first + count]])  # (taps - 1 + count, channels)
        windows = seq.unfold(0, taps, 1)  # (count, channels, taps)
        out[first:first + count] = (windows * weight).sum(-1)
        pool[slot] = seq[count:]
    if bias is not None:
        out += bias
    return F.silu(out) if silu else out


class HybridBlock(nn.Module):
    """A pre-norm mixer, recurrent or attention, and a pre-norm SwiGLU MLP. A family names its
    recurrent mixer's attribute (its checkpoints' parameter names) and gives the classes."""

    mixer_name = "mixer"

    def __init__(self, config: ModelConfig, layer_idx: int, norm: type[nn.Module], recurrent: type[nn.Module],
                 attention: type[nn.Module]) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        self.recurrent = layer_idx in config.recurrent_layers
        self.input_layernorm = norm(C, eps)
        if self.recurrent:
            setattr(self, self.mixer_name, recurrent(config, layer_idx))
        else:
            self.self_attn = attention(config, layer_idx)
        self.post_attention_layernorm = norm(C, eps)
        self.mlp = feed_forward(config, layer_idx)  # a mixture of experts in Qwen3.5 MoE's and LFM2 MoE's
        self.residual = config.residual_multiplier  # Granite: each output scaled as it joins x

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                states: SequenceStates) -> torch.Tensor:
        y = self.input_layernorm(x)
        mixed = getattr(self, self.mixer_name)(y, states) if self.recurrent else self.self_attn(y, cos, sin, ctx)
        x = x + (mixed if self.residual is None else mixed * self.residual)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (m if self.residual is None else m * self.residual)


class HybridForCausalLM(nn.Module):
    """The CausalLM protocol of models/base.py, plus the per-sequence states of the recurrent
    layers (`states`, from the runner)."""

    def __init__(self, config: ModelConfig, block: type[nn.Module], norm: type[nn.Module],
                 hidden_act: str = "silu") -> None:
        super().__init__()
        if not config.recurrent_layers or config.hidden_act != hidden_act:
            raise ValueError(f"a hybrid config names its recurrent layers, and its MLP's activation is {hidden_act}")
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(block(config, i) for i in range(config.num_layers))
        self.norm = norm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.rotary_dim or config.head_dim, config.max_position_embeddings,
                                      config.rope_theta, freq_factors=config.rope_freq_factors)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                states: SequenceStates) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (N, C)
        if self.config.embedding_multiplier is not None:  # Granite
            x = x * self.config.embedding_multiplier
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx, states)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = head_logits(hidden, self.embed_tokens, self.lm_head)
        # Granite's division in place (the runner's head may write into a reused buffer).
        return logits if self.config.logit_scale is None else logits.div_(self.config.logit_scale)
