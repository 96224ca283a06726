"""A dense AttentionContext for tests: one sequence, no cache, all N tokens at once.

Token i of the N given tokens attends to tokens 0..i (and only the last `sliding_window`
of them when a window is set), so calling the model on a whole sequence gives the same
hidden states a cached runner would give token by token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseAttention:
    def __init__(self) -> None:
        # each layer's k/v of this call, for Gemma 4's shared layers (k None: read `layer`'s)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # (N, Hq, D)
        k: torch.Tensor | None,  # (N, Hkv, D)
        v: torch.Tensor | None,  # (N, Hkv, D)
        *,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (N, Hq, D)
        if k is None:
            k, v = self.kv[layer]
        self.kv[layer] = k, v
        n, hq, _ = q.shape
        group = hq // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # (N, Hq, D): query head h reads kv head h // group
        v = v.repeat_interleave(group, dim=1)
        mask = causal_mask(n, sliding_window, q.device)  # (N, N) True = may attend
        q_, k_, v_ = (t.transpose(0, 1) for t in (q, k, v))  # (Hq, N, D)
        if logit_softcap is None and sinks is None:
            out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale)
        else:
            scores = (q_ @ k_.transpose(1, 2)).float() * scale  # (Hq, N, N)
            if logit_softcap is not None:
                scores = logit_softcap * torch.tanh(scores / logit_softcap)
            out = (_softmax(scores.masked_fill(~mask, float("-inf")), sinks).to(v_.dtype)) @ v_
        return out.transpose(0, 1)  # (N, Hq, D)


def _softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension of (Hq, N, L) scores; with sinks (gpt-oss) each head's
    sink logit joins the sum and its weight is dropped."""
    if sinks is None:
        return scores.softmax(-1)
    sink = sinks.float()[:, None, None].expand(*scores.shape[:-1], 1)
    return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]


def causal_mask(n: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    distance = i[:, None] - i[None, :]  # query minus key position
    mask = distance >= 0
    if sliding_window is not None:
        mask &= distance < sliding_window
    return mask


class CachedAttention:
    """A dense KV cache for one sequence: call the model on the prompt, then one token at a
    time, as an incremental decoder would. Keys and values grow per layer by concatenation."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}  # layer -> (L, Hkv, D)
        self.v: dict[int, torch.Tensor] = {}

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # (N, Hq, D), the N tokens after the cached ones
        k: torch.Tensor | None,  # (N, Hkv, D); None: `layer` stored this call's already
        v: torch.Tensor | None,  # (N, Hkv, D)
        *,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (N, Hq, D)
        if k is None:
            k, v = self.k[layer], self.v[layer]
        elif layer in self.k:
            k, v = torch.cat([self.k[layer], k]), torch.cat([self.v[layer], v])
        self.k[layer], self.v[layer] = k, v
        n, hq, _ = q.shape
        length = k.shape[0]
        group = hq // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (L, Hq, D)
        q_pos = torch.arange(length - n, length, device=q.device)[:, None]  # (N, 1)
        distance = q_pos - torch.arange(length, device=q.device)[None, :]  # (N, L)
        mask = distance >= 0
        if sliding_window is not None:
            mask &= distance < sliding_window
        scores = torch.einsum("nhd,lhd->hnl", q.float(), k.float()) * scale  # (Hq, N, L)
        if logit_softcap is not None:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        probs = _softmax(scores.masked_fill(~mask, float("-inf")), sinks)
        return torch.einsum("hnl,lhd->nhd", probs, v.float()).to(q.dtype)  # (N, Hq, D)
