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
    """Per-layer pools of (num_blocks * block_size) slots, K and V of a slot side by side.

    kv[layer] is (num_slots, 2, Hkv, D) in the model dtype, so a step writes K and V with one
    index_copy_ and gathers a context with one index_select; k[layer] and v[layer] are the
    (num_slots, Hkv, D) views of either half.
    """

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
        shape = (num_slots, 2, model_config.num_kv_heads, model_config.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_layers)]
        self.k = [kv[:, 0] for kv in self.kv]
        self.v = [kv[:, 1] for kv in self.kv]

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
    block_table: torch.Tensor  # (B, max_blocks) int64: each sequence's blocks, padded with block 0
    starts: torch.Tensor  # (B,) int64: position of each chunk's first token
    context_lens: torch.Tensor  # (B,) int64: start + chunk length
    num_seqs: int
    max_query_len: int  # Tmax
    max_context_len: int  # Lmax
    min_context_len: int = 0
    first_start: int = 0  # start of the first chunk (a lone prefill from 0 is plain causal)
    # A lone sequence whose context blocks are consecutive in the pool: its first slot.
    contiguous_from: int | None = None

    @property
    def decode_only(self) -> bool:
        """One new token per sequence (N == B): queries need no padding."""
        return self.max_query_len == 1


@dataclass
class PagedAttention:
    """AttentionContext over the paged cache for one step. Build one per step, not per layer."""

    cache: KVCache
    meta: AttentionMetadata
    # Masks depend only on the step and the window size; layers share them.
    _masks: dict[tuple, torch.Tensor | str | None] = field(default_factory=dict)

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
        cache = self.cache.kv[layer]  # (S, 2, Hkv, D)
        new_kv = torch.stack([k, v], dim=1)  # (N, 2, Hkv, D)
        cache.index_copy_(0, m.slot_mapping, new_kv if new_kv.dtype == cache.dtype else new_kv.to(cache.dtype))
        # The context includes this step's own tokens, just written: one path for
        # prefill, chunked prefill, prefix-cache hits and decode.
        context = self._gather(cache)  # (B, Lmax, 2, Hkv, D)
        if context.dtype != q.dtype:
            context = context.to(q.dtype)
        keys = context[:, :, 0].transpose(1, 2)  # (B, Hkv, Lmax, D)
        values = context[:, :, 1].transpose(1, 2)  # (B, Hkv, Lmax, D)
        n, hq, d = q.shape
        if m.decode_only:  # N == B: one query per sequence, nothing to pad
            queries = q.view(n, 1, hq, d).transpose(1, 2)  # (B, Hq, 1, D)
        else:
            # index_copy_/index_select, not tensor[idx] = ...: advanced-index assignment is
            # orders of magnitude slower on CPU.
            q_pad = q.new_zeros(m.num_seqs * m.max_query_len, hq, d).index_copy_(0, m.query_dest, q)
            queries = q_pad.view(m.num_seqs, m.max_query_len, hq, d).transpose(1, 2)  # (B, Hq, Tmax, D)
        if logit_softcap is None:
            out = _sdpa(queries, keys, values, self._additive_mask(sliding_window, q.dtype), scale)
        else:
            mask = self._mask(sliding_window, need_tensor=True)
            out = _softcapped_attention(queries, keys, values, mask, scale, logit_softcap)
        out = out.transpose(1, 2)  # (B, Tmax, Hq, D)
        if m.decode_only:
            return out.reshape(n, hq, d)
        return out.reshape(m.num_seqs * m.max_query_len, hq, d).index_select(0, m.query_dest)  # (N, Hq, D)

    def _gather(self, cache: torch.Tensor) -> torch.Tensor:  # (B, Lmax, 2, Hkv, D)
        """Each sequence's context. A lone sequence whose blocks are consecutive in the pool
        is a view of it; otherwise the context is copied block by block (a block is one
        contiguous run of slots) and cut to Lmax; padding blocks read block 0, which the mask
        hides."""
        m = self.meta
        if m.contiguous_from is not None:
            return cache[m.contiguous_from : m.contiguous_from + m.max_context_len][None]
        per_block = cache.view(self.cache.num_blocks, -1)  # (num_blocks, bs * 2 * Hkv * D)
        blocks = per_block.index_select(0, m.block_table.view(-1))  # (B * max_blocks, bs * 2 * Hkv * D)
        return blocks.view(m.num_seqs, -1, *cache.shape[1:])[:, : m.max_context_len]

    def _additive_mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor | str | None:
        """_mask() as 0 / -inf in the query dtype, made once per step: SDPA would convert
        a bool mask in every layer."""
        key = (sliding_window, dtype)
        if key not in self._masks:
            mask = self._mask(sliding_window)
            if isinstance(mask, torch.Tensor):
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._masks[key] = mask
        return self._masks[key]

    def _mask(self, sliding_window: int | None, need_tensor: bool = False) -> torch.Tensor | str | None:
        """The step's mask for this window: a (B, 1, Tmax, Lmax) bool tensor, or, where one
        is not needed, None (every query sees every key) or "causal" (a lone prefill from 0)."""
        key = (sliding_window, need_tensor)
        if key not in self._masks:
            m = self.meta
            window_cuts = sliding_window is not None and sliding_window < m.max_context_len
            if need_tensor or window_cuts:
                self._masks[key] = build_mask(m, sliding_window)
            elif m.decode_only and m.min_context_len == m.max_context_len:
                self._masks[key] = None
            elif m.num_seqs == 1 and m.first_start == 0:
                self._masks[key] = "causal"
            else:
                self._masks[key] = build_mask(m, None)
        return self._masks[key]


def build_mask(meta: AttentionMetadata, sliding_window: int | None) -> torch.Tensor:
    """(B, 1, Tmax, Lmax) bool, True where a query may attend to a key.

    Padded query rows get their position clamped to the last context token (see batch.py),
    so no row is empty: an all-False row would make softmax produce NaN.
    """
    device = meta.block_table.device
    key_pos = torch.arange(meta.max_context_len, device=device)  # (Lmax,)
    q_pos = meta.starts[:, None] + torch.arange(meta.max_query_len, device=device)  # (B, Tmax)
    # Padded query rows take the last context position, so their mask row is never empty.
    q_pos = torch.minimum(q_pos, meta.context_lens[:, None] - 1)[:, :, None]  # (B, Tmax, 1)
    mask = (key_pos <= q_pos) & (key_pos < meta.context_lens[:, None, None])  # (B, Tmax, Lmax)
    if sliding_window is not None:
        mask &= q_pos - key_pos < sliding_window
    return mask[:, None]


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    groups = num_q_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    causal = isinstance(mask, str)
    mask = None if causal else mask
    if q.shape[1] != k.shape[1] and _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=True)
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _softcapped_attention(q, k, v, mask, scale, cap) -> torch.Tensor:
    """Gemma-2 style: scores = cap * tanh(scores / cap), which SDPA cannot express."""
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, Hq, Tmax, Lmax)
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)
