"""Decode steps on CUDA as replayed CUDA graphs.

Why: the eager forward issues a kernel launch per torch call, about 2,000 a decode step on
SmolLM2 (65 a layer). On an H200 the GPU idled while one CPU core launched them: 13.6
tokens/s at one stream, 8x below textmill's own 2-core CPU path (docs/performance.md). A
CUDA graph records a step's kernels once; a replay launches all of them in one call.

A graph has fixed shapes and fixed addresses, so a decode step runs padded:
- the batch to a bucket (1, 2, 4, 8, then multiples of 8), padding rows writing their K/V
  into the KV pool's scratch block (KVCache(scratch_block=True)) and attending to it alone;
- each sequence's context to a power of two of blocks: attention gathers that many blocks
  per sequence and hides keys past the sequence's length (and outside a sliding window)
  with a mask computed inside the graph from the lengths.
Each (batch, blocks) pair is captured the first time a step needs it, into one memory pool
that all graphs share. That is safe because a step reads its graph's output (the LM head
below) before any other graph replays: graph B's output may lie in memory graph A freed
while it was captured. Contexts past MAX_CONTEXT tokens run eagerly: a padded gather would
read up to twice their keys, and each would be one more graph. A step's inputs are one int64 tensor
copied into the graph's own buffer. A graph ends at the final hidden states (B, C): the LM
head runs after the replay on the real rows only, so no graph keeps a (B, vocabulary)
buffer of its own (Gemma 3's 262k columns would cost 67 MB a graph at B = 64).

Only decode steps replay: one token per sequence, each sampled, no prompt logprobs.
Prefill chunks vary in length and come once per prompt; they run eagerly.

The same path runs uncaptured (capture=False): tests check on the CPU that the padded,
masked step gives the eager path's tokens and logprobs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from textmill.messages import SchedulerOutput
from textmill.runner.block_tables import BlockTables
from textmill.runner.kv_cache import KVCache, explicit_attention, gather_blocks, write_kv

log = logging.getLogger(__name__)


# The longest context a captured graph serves; longer steps run eagerly (see above).
MAX_CONTEXT = 4096


def batch_bucket(n: int) -> int:
    """The padded batch of a step of n sequences: 1, 2, 4, 8, then multiples of 8 (at most
    7 padding rows: a row costs little next to the weights every step reads anyway)."""
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return -(-n // 8) * 8


def blocks_bucket(blocks: int) -> int:
    """The padded context of a step, in blocks: the next power of two (a graph per doubling
    of the longest context; a step gathers at most twice the keys it needs)."""
    return 1 << (blocks - 1).bit_length()


def accepts(scheduled: SchedulerOutput) -> bool:
    """A pure decode step (every chunk one token, sampled, no prompt logprobs) whose
    contexts a graph serves (at most MAX_CONTEXT tokens)."""
    return bool(scheduled.chunks) and all(
        len(c.token_ids) == 1 and c.sample and not c.prompt_logprob_targets and c.start < MAX_CONTEXT
        for c in scheduled.chunks)


@dataclass
class StaticDecodeAttention:
    """The AttentionContext of a padded decode step: B sequences, one query each, each over
    M blocks of the pool. Every tensor it reads is a graph input (fixed address)."""

    cache: KVCache
    slots: torch.Tensor  # (B,) int64: where each row's new K/V go
    table: torch.Tensor  # (B, M) int64: each row's blocks; past its context any valid block
    context_lens: torch.Tensor  # (B,) int64: keys each row sees, its new token included
    # Masks per (window, dtype): built by the first layer that asks, within the same step
    # (inside the graph while capturing). reset() before every step that is not a replay.
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def reset(self) -> None:
        self._masks.clear()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, *, scale: float,
               sliding_window: int | None = None, logit_softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        pool = self.cache.kv[layer]  # (S, 2, Hkv, D)
        if k is not None:  # None: a Gemma 4 shared layer reads what `layer` wrote this step
            write_kv(pool, self.slots, k, v)
        context = gather_blocks(pool, self.cache.block_size, self.table)  # (B, L, 2, Hkv, D)
        if context.dtype != q.dtype:
            context = context.to(q.dtype)
        keys = context[:, :, 0].transpose(1, 2)  # (B, Hkv, L, D)
        values = context[:, :, 1].transpose(1, 2)
        n, hq, d = q.shape
        hkv = keys.shape[1]
        if logit_softcap is not None or sinks is not None:
            visible = self._mask(sliding_window, torch.bool, keys.shape[2])
            out = explicit_attention(q.view(n, 1, hq, d).transpose(1, 2), keys, values, visible, scale,
                                     logit_softcap, sinks)  # (B, Hq, 1, D)
            return out.transpose(1, 2).reshape(n, hq, d)
        # The G query heads of a KV head as G query rows of one head (GQA's repeat order):
        # plain SDPA, each KV head's keys read once, the (B, 1, 1, L) mask broadcast.
        out = F.scaled_dot_product_attention(q.reshape(n, hkv, hq // hkv, d), keys, values,
                                             attn_mask=self._mask(sliding_window, q.dtype, keys.shape[2]),
                                             scale=scale)  # (B, Hkv, G, D)
        return out.reshape(n, hq, d)

    def _mask(self, window: int | None, dtype: torch.dtype, length: int) -> torch.Tensor:
        """(B, 1, 1, L): bool where a key is visible, or 0 / -inf in `dtype`. The query of
        row b is at position context_lens[b] - 1; it sees keys [0, len) (the last `window`
        of them on a sliding layer)."""
        key = (window, dtype)
        if key not in self._masks:
            lens = self.context_lens[:, None]
            pos = torch.arange(length, device=lens.device)[None, :]
            visible = pos < lens
            if window is not None:
                visible &= pos >= lens - window
            if dtype != torch.bool:
                visible = torch.zeros(visible.shape, dtype=dtype, device=lens.device).masked_fill_(
                    ~visible, float("-inf"))
            self._masks[key] = visible[:, None, None, :]
        return self._masks[key]


class _Graph:
    """One (batch, blocks) shape: its input buffer, its context, and once captured, its graph."""

    def __init__(self, cache: KVCache, batch: int, blocks: int, device: torch.device):
        self.batch, self.blocks = batch, blocks
        self.inputs = torch.zeros(4 * batch + batch * blocks, dtype=torch.int64, device=device)
        ids, positions, slots, lens, table = self.inputs.split([batch] * 4 + [batch * blocks])
        self.ids, self.positions = ids, positions
        self.ctx = StaticDecodeAttention(cache, slots, table.view(batch, blocks), lens)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None  # (batch, C), the graph's output


class DecodeGraphs:
    """Runs pure decode steps padded to fixed shapes: captured and replayed as CUDA graphs
    on CUDA (capture=True), or run op by op on the same padded tensors (the tests' case)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, device: torch.device, capture: bool):
        if cache.scratch_block is None:
            raise ValueError("padded decode steps need the KV pool's scratch block")
        self.model, self.cache, self.device, self.capture = model, cache, device, capture
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0  # decode steps this object ran (the tests check the path was taken)
        self.failed: str | None = None  # why a capture failed: every step runs eagerly from then on

    @property
    def captured(self) -> int:
        return sum(g.graph is not None for g in self._graphs.values())

    def run(self, scheduled: SchedulerOutput, tables: BlockTables) -> torch.Tensor | None:
        """The (n, V) float32 logits of a step accepts() took, rows in the scheduler's order;
        None when capturing its graph failed (then `failed` says why: run it eagerly)."""
        chunks = scheduled.chunks
        n, bs = len(chunks), self.cache.block_size
        batch = batch_bucket(n)
        blocks = blocks_bucket(-(-max(c.start + 1 for c in chunks) // bs))
        g = self._graphs.get((batch, blocks))
        if g is None:
            g = self._graphs[(batch, blocks)] = _Graph(self.cache, batch, blocks, self.device)
        g.inputs.copy_(self._host_inputs(scheduled, tables, batch, blocks))
        if g.graph is not None:
            g.graph.replay()
        elif self.capture:
            if not self._capture(g):
                return None
        else:
            g.hidden = self._step(g)
        self.steps += 1
        return self.model.logits(g.hidden[:n])

    def _host_inputs(self, scheduled: SchedulerOutput, tables: BlockTables, batch: int, blocks: int) -> torch.Tensor:
        """ids, positions, slots, context lengths and block tables of the padded step, in one
        tensor laid out as _Graph.inputs. A real row's table past its blocks reads block 0
        (BlockTables.gather's padding), which its mask hides; padding rows read and write
        the scratch block alone."""
        chunks, bs = scheduled.chunks, self.cache.block_size
        pad = batch - len(chunks)
        scratch = self.cache.scratch_block
        ids, positions, slots = [], [], []
        for c in chunks:
            ids.append(c.token_ids[0])
            positions.append(c.start)
            slots.append(tables.block_ids(c.request_id)[c.start // bs] * bs + c.start % bs)
        lens = [p + 1 for p in positions] + [1] * pad
        head = torch.tensor(ids + [0] * pad + positions + [0] * pad + slots + [scratch * bs] * pad + lens,
                            dtype=torch.int64)
        table = tables.gather([c.request_id for c in chunks], blocks)  # (n, blocks)
        return torch.cat([head, table.view(-1), torch.full((pad * blocks,), scratch, dtype=torch.int64)])

    def _step(self, g: _Graph) -> torch.Tensor:
        g.ctx.reset()
        return self.model.forward(g.ids, g.positions, g.ctx)

    def _capture(self, g: _Graph) -> bool:
        """Warm up on a side stream (the first call of a shape allocates and picks kernels,
        which a capture must not do), then capture. The warm-up already computed this
        step's K/V from the same inputs; the capture records, it does not run, so the
        replay that follows writes the same K/V again. False when capturing failed (out
        of memory, an op that cannot be captured): the graphs are dropped, their pool
        freed, and `failed` says why."""
        # The outer stream context restores this thread's stream even when capture_end
        # raises inside torch.cuda.graph's exit, which then skips restoring it itself.
        with torch.cuda.stream(torch.cuda.current_stream()):
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._step(g)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a CUDA call from another thread (none is expected) does not void the capture.
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    g.hidden = self._step(g)
            except Exception as exc:  # noqa: BLE001 - any failure here means: run eagerly
                self.failed = f"{type(exc).__name__}: {exc}"
                self._graphs.clear()
                torch.cuda.empty_cache()
                return False
        g.graph = graph
        graph.replay()
        log.debug("captured a decode graph: batch %d, context %d blocks (%d graphs)",
                  g.batch, g.blocks, self.captured)
        return True
