"""RoPE scaling rules as what the models take: per-frequency divisors of the inverse
frequencies (ModelConfig.rope_freq_factors) and a factor on cos and sin
(ModelConfig.rope_attention_factor). Both loaders, GGUF and folder, compute them here, so a
file and the folder it was converted from give the same numbers.
"""
from __future__ import annotations

import math
from typing import Any


def llama3_freq_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> tuple[float, ...]:
    """Divisors of each inverse frequency: 1 for wavelengths shorter than the original
    context / high_freq_factor, `factor` for those longer than context / low_freq_factor,
    and a smooth blend between (what transformers computes and llama.cpp stores)."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    context = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < context / high:
            factors.append(1.0)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude term, 0.1 * mscale * ln(factor) + 1 (1 where nothing is stretched)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def yarn(*, theta: float, rotary_dims: int, factor: float, original: int, beta_fast: float = 32.0,
         beta_slow: float = 1.0, attention_factor: float | None = None, mscale: float | None = None,
         mscale_all_dim: float | None = None, truncate: bool = True) -> dict[str, Any]:
    """YaRN (Qwen2.5/3's long-context setting, Ministral 3): each frequency a blend of itself
    (extrapolated) and itself / factor (interpolated), by a ramp over the pair index between
    the dimensions that turn beta_fast and beta_slow times in the original context; cos and
    sin times the attention factor, by default 0.1 ln(factor) + 1 (with mscale and
    mscale_all_dim, the ratio of two such terms). As transformers computes it and as ggml's
    rope_yarn does (corr_dims floored and ceiled, the ramp's span at least 0.001)."""
    def turning_dim(rotations: float) -> float:
        return rotary_dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turning_dim(beta_fast), turning_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dims - 1)
    span = max(high - low, 0.001)
    divisors = []
    for i in range(rotary_dims // 2):
        kept = 1.0 - min(1.0, max(0.0, (i - low) / span))  # 1: extrapolated, 0: interpolated
        divisors.append(1.0 / (kept + (1.0 - kept) / factor))
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    return dict(rope_freq_factors=tuple(divisors), rope_attention_factor=float(attention_factor))
