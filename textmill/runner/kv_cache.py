"""The paged KV cache tensors and the AttentionContext that reads and writes them.

The cache is one flat pool of slots per layer: slot = block_id * block_size + offset. The
engine's block manager decides which blocks a request owns; this module only follows the
block tables it is given. Attention runs for every sequence of the step at once: each
sequence's context is gathered into a padded batch, one boolean mask covers causality,
padding and sliding windows, and one scaled_dot_product_attention call does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from textmill.config import CacheConfig, ModelConfig

# enable_gqa arrived in torch 2.5; older versions get the kv heads expanded by hand.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class KVCache:
    """Per-layer K and V pools, each (num_blocks * block_size, Hkv, D) in the model dtype."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.num_blocks
        num_slots = self.num_blocks * self.block_size
        shape = (num_slots, model_config.num_kv_heads, model_config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_layers)]

    @staticmethod
    def bytes_per_block(model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_token = model_config.num_kv_heads * model_config.head_dim * elem
        return 2 * model_config.num_layers * cache_config.block_size * per_token


@dataclass(frozen=True)
class AttentionMetadata:
    """Index tensors for one step, built once (batch.py) and shared by every layer.

    B sequences, N new tokens in total; the tokens of one sequence are contiguous in the
    flat batch. Tmax is the longest chunk, Lmax the longest context (start + chunk length).
    """

    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token
    query_dest: torch.Tensor  # (N,) int64: row of each new token in the (B * Tmax) padded queries
    context_slots: torch.Tensor  # (B, Lmax) int64: cache slot of each context position (padding -> any slot)
    query_positions: torch.Tensor  # (B, Tmax) int64: absolute position of each padded query
    context_lens: torch.Tensor  # (B,) int64: start + chunk length
    num_seqs: int
    max_query_len: int  # Tmax
    max_context_len: int  # Lmax


@dataclass
class PagedAttention:
    """AttentionContext over the paged cache for one step. Build one per step, not per layer."""

    cache: KVCache
    meta: AttentionMetadata
    # Masks depend only on the step and the window size; layers share them.
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # (N, Hq, D)
        k: torch.Tensor,  # (N, Hkv, D)
        v: torch.Tensor,  # (N, Hkv, D)
        *,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> torch.Tensor:  # (N, Hq, D)
        m = self.meta
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache.index_copy_(0, m.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, m.slot_mapping, v.to(v_cache.dtype))
        # The context includes this step's own tokens, just written: one path for
        # prefill, chunked prefill, prefix-cache hits and decode.
        keys = _gather(k_cache, m.context_slots).to(q.dtype).transpose(1, 2)  # (B, Hkv, Lmax, D)
        values = _gather(v_cache, m.context_slots).to(q.dtype).transpose(1, 2)  # (B, Hkv, Lmax, D)
        n, hq, d = q.shape
        # index_copy_/index_select, not tensor[idx] = ...: advanced-index assignment is
        # orders of magnitude slower on CPU.
        q_pad = q.new_zeros(m.num_seqs * m.max_query_len, hq, d).index_copy_(0, m.query_dest, q)
        queries = q_pad.view(m.num_seqs, m.max_query_len, hq, d).transpose(1, 2)  # (B, Hq, Tmax, D)
        mask = self._mask(sliding_window)  # (B, 1, Tmax, Lmax)
        if logit_softcap is None:
            out = _sdpa(queries, keys, values, mask, scale)
        else:
            out = _softcapped_attention(queries, keys, values, mask, scale, logit_softcap)
        out = out.transpose(1, 2).reshape(m.num_seqs * m.max_query_len, hq, d)
        return out.index_select(0, m.query_dest)  # (N, Hq, D)

    def _mask(self, sliding_window: int | None) -> torch.Tensor:
        mask = self._masks.get(sliding_window)
        if mask is None:
            mask = build_mask(self.meta, sliding_window)
            self._masks[sliding_window] = mask
        return mask


def build_mask(meta: AttentionMetadata, sliding_window: int | None) -> torch.Tensor:
    """(B, 1, Tmax, Lmax) bool, True where a query may attend to a key.

    Padded query rows get their position clamped to the last context token (see batch.py),
    so no row is empty: an all-False row would make softmax produce NaN.
    """
    device = meta.context_slots.device
    key_pos = torch.arange(meta.max_context_len, device=device)  # (Lmax,)
    q_pos = meta.query_positions[:, :, None]  # (B, Tmax, 1)
    mask = (key_pos <= q_pos) & (key_pos < meta.context_lens[:, None, None])  # (B, Tmax, Lmax)
    if sliding_window is not None:
        mask &= q_pos - key_pos < sliding_window
    return mask[:, None]


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache (S, Hkv, D), slots (B, L) -> (B, L, Hkv, D)."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    groups = num_q_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    if q.shape[1] != k.shape[1] and _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _softcapped_attention(q, k, v, mask, scale, cap) -> torch.Tensor:
    """Gemma-2 style: scores = cap * tanh(scores / cap), which SDPA cannot express."""
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, Hq, Tmax, Lmax)
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)
