"""The AttentionContext over the paged cache on textmill's C++ kernels (float32 CPU).

Same contract as kv_cache.PagedAttention, without its gather: kernels/csrc/layer.cpp's
paged_attention reads each sequence's keys and values straight from the pool through the
block table, with causality, sliding windows, softcapping and sinks computed per query instead of
materialized as masks, and decode and prefill rows of a group in one call. Every query row
is computed from its own sequence alone, whatever else is in the batch, so outputs do not
depend on batch composition.

Activations are float32; the pool may be float32, float16 or bfloat16 (KVCache's kv_dtype):
the kernels round k and v to it when they write them and widen them when they read them,
so a 16-bit pool costs no conversion pass of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from textmill.runner.kv_cache import AttentionMetadata, KVCache, write_kv


@dataclass
class KernelPagedAttention:
    cache: KVCache
    meta: AttentionMetadata
    ops: ModuleType  # the compiled "layer" extension

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
        # rounded to a 16-bit pool as rope_kv_write rounds; None: a Gemma 4 shared layer reads
        # what `layer` wrote this step
        if k is not None:
            write_kv(self.cache.kv[layer], self.meta.slot_mapping, k, v)
        return self.attend_cached(layer, q.contiguous(), scale=scale, sliding_window=sliding_window,
                                  logit_softcap=logit_softcap, sinks=sinks)

    def for_rows(self, rows: torch.Tensor) -> KernelPagedAttention:
        """This step's context for rows `rows` only, each a one-token query (AttentionMetadata.for_rows)."""
        return KernelPagedAttention(self.cache, self.meta.for_rows(rows), self.ops)

    def attend_cached(self, layer: int, q: torch.Tensor, *, scale: float,
                      sliding_window: int | None = None, logit_softcap: float | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention for queries whose own keys and values are already in the cache
        (written by the kernel that applied RoPE: rope_kv_write)."""
        cache = self.cache.kv[layer]
        outs = [self.ops.paged_attention(q[g.token_start : g.token_start + g.num_tokens], cache,
                                         g.block_table, g.query_start, g.starts, g.context_lens,
                                         self.cache.block_size, float(scale), int(sliding_window or 0),
                                         float(logit_softcap or 0.0), sinks)
                for g in self.meta.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
