"""The paged KV cache tensors and the AttentionContext that reads and writes them.

The cache is one flat pool of slots per layer: slot = block_id * block_size + offset. The
engine's block manager decides which blocks a request owns; this module only follows the
block tables it is given. Attention runs for every sequence of the step at once: each
sequence's context is gathered into a padded batch, one boolean mask covers causality,
padding and sliding windows, and one scaled_dot_product_attention call does the rest.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from textmill.config import CacheConfig, ModelConfig

# enable_gqa arrived in torch 2.5; older versions get the kv heads expanded by hand.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class KVCache:
    """Per-layer pools of (num_blocks * block_size) slots, K and V of a slot side by side.

    kv[layer] is (num_slots, 2, Hkv, D) in the pool's dtype, so a step writes K and V with
    one index_copy_ and gathers a context with one index_select; k[layer] and v[layer] are
    the (num_slots, Hkv, D) views of either half.

    The pool's dtype is kv_dtype, by default the model's activation dtype. A 16-bit pool
    under float32 activations (the CPU kernels' case) halves the cache's memory and the
    bytes attention reads: k and v are rounded once when written (to nearest even) and
    widened exactly when read, by the kernels (kernels/csrc/layer.cpp) and by
    PagedAttention alike. float16 keeps 3 more mantissa bits than bfloat16 and loses
    range above 65504, which keys and values of the models measured stay far below.

    An int8 pool (the CPU kernels only: the plan refuses it elsewhere) is (S, 2, Hkv, D + 4):
    each head row's D codes, then its float32 scale's 4 bytes (quantize_int8_rows). Half
    the bytes of a 16-bit pool; the kernels apply the scales as they read.

    `scratch_block`: one block more than the pool's, at index num_blocks, that no request
    owns. Replayed decode graphs (decode_graphs.py) pad a step to a fixed batch; the padding
    rows write their K/V there, where they can harm no one.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        kv_dtype: torch.dtype | None = None,
        scratch_block: bool = False,
    ):
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.num_blocks
        self.scratch_block = self.num_blocks if scratch_block else None
        self.dtype = kv_dtype or dtype
        num_slots = (self.num_blocks + int(scratch_block)) * self.block_size
        self.kv: list[torch.Tensor | None] = []
        for layer in range(model_config.num_layers):
            if not model_config.has_kv(layer):  # a recurrent layer keeps a state per sequence instead
                self.kv.append(None)
                continue
            source = model_config.kv_source(layer)
            if source != layer:  # Gemma 4's shared layers: the same pool, never written by them
                self.kv.append(self.kv[source])
                continue
            heads, head_dim = model_config.layer_kv_shape(layer)
            self.kv.append(untouched_zeros((num_slots, 2, heads, _row(head_dim, self.dtype)), self.dtype, device))
        self.k = [None if kv is None else kv[:, 0] for kv in self.kv]
        self.v = [None if kv is None else kv[:, 1] for kv in self.kv]

    @staticmethod
    def bytes_per_block(model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype,
                        kv_dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V, all layers that own a pool, for one block of a pool built with
        these arguments."""
        kv_dtype = kv_dtype or dtype
        elem = torch.empty((), dtype=kv_dtype).element_size()
        per_token = 0
        for layer in range(model_config.num_layers):
            if model_config.has_kv(layer) and model_config.kv_source(layer) == layer:
                heads, head_dim = model_config.layer_kv_shape(layer)
                per_token += heads * _row(head_dim, kv_dtype) * elem
        return 2 * cache_config.block_size * per_token


def write_kv(pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k and v (N, Hkv, D) of N new tokens into one layer's pool (S, 2, Hkv, D) at `slots`.
    A pool narrower than the activations (kv_dtype) stores them rounded, as the kernels do;
    an int8 pool (S, 2, Hkv, D + 4) stores quantize_int8_rows of them."""
    new_kv = torch.stack([k, v], dim=1)  # (N, 2, Hkv, D)
    if pool.dtype == torch.int8:
        new_kv = quantize_int8_rows(new_kv.float())
    pool.index_copy_(0, slots, new_kv if new_kv.dtype == pool.dtype else new_kv.to(pool.dtype))


def quantize_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., D) float32 -> (..., D + 4) int8: per row s = max|x| / 127 and codes round(x * (1 / s))
    (ties to even; all zero when s is 0), then s's 4 bytes. The rule of the kernels'
    rope_kv_write (kernels/csrc/layer.cpp quantize_kv_row), float operation for operation,
    so both writers store the same bytes."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round(x * inv).clamp_(-127, 127).to(torch.int8)
    return torch.cat([codes, scale.contiguous().view(torch.int8)], dim=-1)


_INT8_SCALE_BYTES = 4  # an int8 row's float32 scale, after its codes (layer.cpp's kKVScaleBytes)


def _row(head_dim: int, dtype: torch.dtype) -> int:
    """Pool elements per head row: an int8 pool's rows end with their float32 scale."""
    return head_dim + _INT8_SCALE_BYTES if dtype == torch.int8 else head_dim


def gather_blocks(pool: torch.Tensor, block_size: int, table: torch.Tensor) -> torch.Tensor:
    """(B, M * block_size, 2, Hkv, D): the blocks of each row of `table` (B, M), copied in
    order from one layer's pool (a block is one contiguous run of slots)."""
    per_block = pool.view(-1, block_size * pool[0].numel())  # (blocks, bs * 2 * Hkv * D)
    return per_block.index_select(0, table.view(-1)).view(table.shape[0], -1, *pool.shape[1:])


def untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """torch.zeros, but on the CPU resident only where written: an anonymous mapping is
    zero pages until touched, so a pool sized for the longest contexts costs memory as
    sequences fill it, not at start (torch.zeros writes every page: the whole pool counted
    in the server's memory before its first request). Contents are the same as zeros'."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the tensor keeps it alive
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


@dataclass(frozen=True)
class AttentionGroup:
    """The sequences of a step that attend together, and their index tensors.

    A step has up to two groups: the sequences with one new token (decode), then those with
    more (prefill chunks), each contiguous in the flat batch. Queries are padded only to
    the longest chunk of their own group. Tmax is that longest chunk, Lmax the longest
    context (start + chunk length).
    """

    token_start: int  # the group's tokens are rows [token_start, token_start + num_tokens)
    num_tokens: int
    query_dest: torch.Tensor  # (n,) int64: row of each token in the group's (B * Tmax) padded queries
    block_table: torch.Tensor  # (B, max_blocks) int64: each sequence's blocks, padded with block 0
    starts: torch.Tensor  # (B,) int64: position of each chunk's first token
    context_lens: torch.Tensor  # (B,) int64: start + chunk length
    # (B + 1,) int64: sequence b's tokens are the group's rows [query_start[b], query_start[b + 1])
    query_start: torch.Tensor
    num_seqs: int
    max_query_len: int  # Tmax
    max_context_len: int  # Lmax
    min_context_len: int = 0
    first_start: int = 0  # start of the first chunk (a lone prefill from 0 is plain causal)
    # A lone sequence whose context blocks are consecutive in the pool: its first slot.
    contiguous_from: int | None = None

    @property
    def decode_only(self) -> bool:
        """One new token per sequence: queries need no padding."""
        return self.max_query_len == 1


@dataclass(frozen=True)
class AttentionMetadata:
    """Index tensors for one step, built once (batch.py) and shared by every layer."""

    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token
    groups: tuple[AttentionGroup, ...]

    @property
    def num_seqs(self) -> int:
        return sum(g.num_seqs for g in self.groups)

    @property
    def max_query_len(self) -> int:
        return max(g.max_query_len for g in self.groups)

    @property
    def max_context_len(self) -> int:
        return max(g.max_context_len for g in self.groups)

    def for_rows(self, rows: torch.Tensor) -> AttentionMetadata:
        """Rows `rows` of this step (indices into its N tokens, in their order) as one group of
        one-token queries, each at its own position over its own sequence's context, this step's
        keys included: what a layer that only reads the cache needs for just those rows (Gemma 4's
        shared layers run for the rows whose output the step reads). No slots: nothing is written."""
        device = rows.device
        firsts = torch.tensor([g.token_start for g in self.groups], device=device)
        group_of = torch.searchsorted(firsts, rows, right=True) - 1
        width = max(g.block_table.shape[1] for g in self.groups)
        tables, positions = [], []
        for index, g in enumerate(self.groups):
            local = rows[group_of == index] - g.token_start
            seq = torch.searchsorted(g.query_start, local, right=True) - 1
            table = g.block_table.index_select(0, seq)
            tables.append(F.pad(table, (0, width - table.shape[1])))  # block 0 past a context: never read
            positions.append(g.starts.index_select(0, seq) + local - g.query_start.index_select(0, seq))
        order = torch.cat([torch.nonzero(group_of == i).flatten() for i in range(len(self.groups))])
        table = torch.empty((len(rows), width), dtype=torch.int64, device=device)
        table[order] = torch.cat(tables)
        starts = torch.empty(len(rows), dtype=torch.int64, device=device)
        starts[order] = torch.cat(positions)
        lens = starts + 1
        n = len(rows)
        group = AttentionGroup(token_start=0, num_tokens=n, query_dest=torch.arange(n, device=device),
                               block_table=table, starts=starts, context_lens=lens,
                               query_start=torch.arange(n + 1, device=device), num_seqs=n, max_query_len=1,
                               max_context_len=int(lens.max()) if n else 0, min_context_len=int(lens.min()) if n else 0,
                               first_start=int(starts[0]) if n else 0)
        return AttentionMetadata(slot_mapping=rows.new_empty(0), groups=(group,))


@dataclass
class PagedAttention:
    """AttentionContext over the paged cache for one step. Build one per step, not per layer."""

    cache: KVCache
    meta: AttentionMetadata
    # Decode steps as (B, Hkv, G, D) queries: faster than SDPA's own GQA with 2+ threads,
    # slower with one (docs/performance.md); the runner decides.
    grouped_decode: bool = False
    # Masks depend only on the step, the group and the window size; layers share them.
    _masks: dict[tuple, torch.Tensor | str | None] = field(default_factory=dict)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # (N, Hq, D)
        k: torch.Tensor | None,  # (N, Hkv, D); None: stored already (base.py)
        v: torch.Tensor | None,  # (N, Hkv, D)
        *,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (N, Hq, D)
        cache = self.cache.kv[layer]  # (S, 2, Hkv, D)
        if k is not None:  # None: a Gemma 4 shared layer reads what `layer` wrote this step
            write_kv(cache, self.meta.slot_mapping, k, v)
        # The context includes this step's own tokens, just written: one path for
        # prefill, chunked prefill, prefix-cache hits and decode.
        outs = [self._attend_group(i, g, cache, q[g.token_start : g.token_start + g.num_tokens], scale,
                                   sliding_window, logit_softcap, sinks)
                for i, g in enumerate(self.meta.groups)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def for_rows(self, rows: torch.Tensor) -> PagedAttention:
        """This step's context for rows `rows` only, each a one-token query (AttentionMetadata.for_rows)."""
        return PagedAttention(self.cache, self.meta.for_rows(rows), self.grouped_decode)

    def _attend_group(self, index: int, g: AttentionGroup, cache: torch.Tensor, q: torch.Tensor, scale: float,
                      sliding_window: int | None, logit_softcap: float | None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
        context = self._gather(g, cache)  # (B, Lmax, 2, Hkv, D)
        if context.dtype != q.dtype:  # a 16-bit pool widens after the gather: half the bytes copied
            context = context.to(q.dtype)
        keys = context[:, :, 0].transpose(1, 2)  # (B, Hkv, Lmax, D)
        values = context[:, :, 1].transpose(1, 2)  # (B, Hkv, Lmax, D)
        n, hq, d = q.shape
        hkv = keys.shape[1]
        explicit = logit_softcap is not None or sinks is not None  # what SDPA cannot express
        if g.decode_only and self.grouped_decode and not explicit and hq != hkv:
            # The G query heads of a KV head as G query rows of one head (GQA's repeat order):
            # a third as many SDPA tasks, each reading its keys once.
            out = _sdpa(q.view(n, hkv, hq // hkv, d), keys, values,
                        self._additive_mask(index, sliding_window, q.dtype), scale)  # (B, Hkv, G, D)
            return out.reshape(n, hq, d)
        if g.decode_only:  # one query per sequence, nothing to pad
            queries = q.view(n, 1, hq, d).transpose(1, 2)  # (B, Hq, 1, D)
        else:
            # index_copy_/index_select, not tensor[idx] = ...: advanced-index assignment is
            # orders of magnitude slower on CPU.
            q_pad = q.new_zeros(g.num_seqs * g.max_query_len, hq, d).index_copy_(0, g.query_dest, q)
            queries = q_pad.view(g.num_seqs, g.max_query_len, hq, d).transpose(1, 2)  # (B, Hq, Tmax, D)
        if not explicit:
            out = _sdpa(queries, keys, values, self._additive_mask(index, sliding_window, q.dtype), scale)
        else:
            mask = self._mask(index, sliding_window, need_tensor=True)
            out = explicit_attention(queries, keys, values, mask, scale, logit_softcap, sinks)
        out = out.transpose(1, 2)  # (B, Tmax, Hq, D)
        if g.decode_only:
            return out.reshape(n, hq, d)
        return out.reshape(g.num_seqs * g.max_query_len, hq, d).index_select(0, g.query_dest)  # (n, Hq, D)

    def _gather(self, g: AttentionGroup, cache: torch.Tensor) -> torch.Tensor:  # (B, Lmax, 2, Hkv, D)
        """Each sequence's context. A lone sequence whose blocks are consecutive in the pool
        is a view of it; otherwise the context is copied block by block (a block is one
        contiguous run of slots) and cut to Lmax; padding blocks read block 0, which the mask
        hides."""
        if g.contiguous_from is not None:
            return cache[g.contiguous_from : g.contiguous_from + g.max_context_len][None]
        return gather_blocks(cache, self.cache.block_size, g.block_table)[:, : g.max_context_len]

    def _additive_mask(self, index: int, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor | str | None:
        """_mask() as 0 / -inf in the query dtype, made once per step: SDPA would convert
        a bool mask in every layer."""
        key = (index, sliding_window, dtype)
        if key not in self._masks:
            mask = self._mask(index, sliding_window)
            if isinstance(mask, torch.Tensor):
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._masks[key] = mask
        return self._masks[key]

    def _mask(self, index: int, sliding_window: int | None, need_tensor: bool = False) -> torch.Tensor | str | None:
        """Group `index`'s mask for this window: a (B, 1, Tmax, Lmax) bool tensor, or, where
        one is not needed, None (every query sees every key) or "causal" (a lone prefill
        from 0)."""
        key = (index, sliding_window, need_tensor)
        if key not in self._masks:
            g = self.meta.groups[index]
            window_cuts = sliding_window is not None and sliding_window < g.max_context_len
            if need_tensor or window_cuts:
                self._masks[key] = build_mask(g, sliding_window)
            elif g.decode_only and g.min_context_len == g.max_context_len:
                self._masks[key] = None
            elif g.num_seqs == 1 and g.first_start == 0:
                self._masks[key] = "causal"
            else:
                self._masks[key] = build_mask(g, None)
        return self._masks[key]


def build_mask(group: AttentionGroup, sliding_window: int | None) -> torch.Tensor:
    """(B, 1, Tmax, Lmax) bool, True where a query may attend to a key.

    Padded query rows get their position clamped to the last context token, so no row is
    empty: an all-False row would make softmax produce NaN.
    """
    device = group.block_table.device
    key_pos = torch.arange(group.max_context_len, device=device)  # (Lmax,)
    q_pos = group.starts[:, None] + torch.arange(group.max_query_len, device=device)  # (B, Tmax)
    q_pos = torch.minimum(q_pos, group.context_lens[:, None] - 1)[:, :, None]  # (B, Tmax, 1)
    mask = (key_pos <= q_pos) & (key_pos < group.context_lens[:, None, None])  # (B, Tmax, Lmax)
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


def explicit_attention(q, k, v, mask, scale, cap: float | None = None,
                       sinks: torch.Tensor | None = None) -> torch.Tensor:
    """What SDPA cannot express: Gemma 2's soft-cap, scores = cap * tanh(scores / cap), and
    gpt-oss's sinks, one more logit per head in the softmax whose weight goes to no value."""
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, Hq, Tmax, Lmax)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
