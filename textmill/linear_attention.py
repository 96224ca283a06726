"""The shape of a hybrid's linear-attention layers (ModelConfig.linear_attention): Qwen3.5's gated delta
nets and the Mamba-2 mixers (Granite 4.0-H, Nemotron-H, Falcon-H1) alike."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearAttentionShape:
    """A gated delta net's shape (Qwen3.5's linear attention): key_heads heads of q and k,
    key_dim wide, each serving value_heads / key_heads heads of v, value_dim wide, all of them
    through a causal depthwise convolution of conv_kernel taps. Its state per sequence is
    (value_heads, key_dim, value_dim) float32 and the last conv_kernel - 1 inputs of the
    convolution. A Mamba-2 mixer's (Granite 4.0-H's, Nemotron-H's, Falcon-H1's) is the same: C and B
    are q and k, in key_heads groups of key_dim (its state size), x is v."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_kernel: int = 4
    # llama.cpp's files order v heads "tiled" (v head j uses k head j % key_heads); the Hub's
    # checkpoints and Qwen3-Next's files group them (j // (value_heads / key_heads)).
    tiled_heads: bool = True
    # Qwen3-Next: beta's and alpha's projections are one (in_proj_ba: every b row, then every a row).
    fused_ba: bool = False
    # Mamba-2: y silu(z) RMS-normed by groups times a weight; without (Falcon-H1's files with no
    # ssm_norm) y silu(z) alone.
    gated_norm: bool = True

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim
