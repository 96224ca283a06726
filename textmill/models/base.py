"""The interface between model files and whoever runs them.

A model never owns its KV cache. Its attention layers hand the new q/k/v of this step to an
AttentionContext, which stores k/v in the cache and attends over each token's own sequence.
The runner implements the paged version; tests may implement a dense one.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class AttentionContext(Protocol):
    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # (N, Hq, D) new tokens of this step, rotary already applied
        # (N, Hkv, D) each; None: this step's k/v of `layer` are stored already (Gemma 4's
        # shared layers attend over an earlier layer's cache, after that layer wrote it)
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        *,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        sinks: torch.Tensor | None = None,  # (Hq,) gpt-oss: a logit per head in each softmax, no value
    ) -> torch.Tensor:  # (N, Hq, D)
        """Store k/v for these tokens, then attend causally over each token's sequence."""
        ...


class CausalLM(Protocol):
    """What every model in models/ provides.

    forward() works on a flat batch of N tokens from any number of sequences (the context
    knows which token belongs to which sequence); logits() is applied only to the rows
    that need them, so the LM head is not paid for every prompt token.
    """

    def forward(
        self,
        input_ids: torch.Tensor,  # (N,) int64
        positions: torch.Tensor,  # (N,) int64, position of each token in its sequence
        ctx: AttentionContext,
    ) -> torch.Tensor:  # (N, C) final hidden states, after the last norm
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (M, C) -> (M, V) float32
        ...


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the "meta" device, where the loader
    builds models before adopting a checkpoint's tensors: torch's normal_ on meta tensors
    imports torch._dynamo, 2-4 s of a server's start for a table that is thrown away."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()
