"""SchedulerOutput -> the tensors of one step.

Python builds flat lists (one pass over the chunks, cache slots included), then all of them
become one tensor in one torch.tensor call, split into views; masks are derived on the
device, and only in the steps that need one (kv_cache.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.runner.kv_cache import AttentionMetadata


@dataclass(frozen=True)
class PromptSegment:
    """prompt_logprob_targets of one chunk: rows [offset, offset + count) of the prompt rows."""

    request_id: str
    offset: int
    count: int
    targets: tuple[int, ...]  # kept on the host: the output names them without a device read


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    attn: AttentionMetadata
    # Rows of the flat batch whose logits are needed: first the S sampled rows (the last
    # token of each chunk with sample=True), then the P prompt-logprob rows.
    logits_rows: torch.Tensor  # (S + P,) int64
    sample_request_ids: tuple[str, ...]  # (S,) the request of each sampled row
    prompt_segments: tuple[PromptSegment, ...]
    prompt_targets: torch.Tensor  # (P,) int64: the token whose logprob each prompt row scores

    @property
    def num_sampled(self) -> int:
        return len(self.sample_request_ids)


@dataclass
class _HostLists:
    """The step's arrays as Python lists: one pass over the chunks, no tensors yet."""

    max_query_len: int
    max_blocks: int
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_dest: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    segments: list[PromptSegment] = field(default_factory=list)

    def add(self, b: int, c: ScheduledChunk, block_size: int) -> None:
        n, offset, end = len(c.token_ids), len(self.input_ids), c.start + len(c.token_ids)
        assert n > 0 and len(c.block_ids) * block_size >= end, f"bad chunk for {c.request_id}"
        self.input_ids.extend(c.token_ids)
        self.positions.extend(range(c.start, end))
        ids = c.block_ids
        self.slots.extend(ids[p // block_size] * block_size + p % block_size for p in range(c.start, end))
        self.query_dest.extend(range(b * self.max_query_len, b * self.max_query_len + n))
        self.starts.append(c.start)
        self.context_lens.append(end)
        # Only the blocks that hold context: a table may run ahead of the tokens.
        used = ids[: self.max_blocks]
        self.block_table.extend(used)
        self.block_table.extend([0] * (self.max_blocks - len(used)))
        if c.sample:
            self.sample_rows.append(offset + n - 1)
            self.sample_ids.append(c.request_id)
        targets = c.prompt_logprob_targets
        if targets:
            assert len(targets) <= n
            self.segments.append(PromptSegment(c.request_id, len(self.prompt_rows), len(targets), tuple(targets)))
            self.prompt_rows.extend(range(offset, offset + len(targets)))
            self.prompt_targets.extend(targets)


def build_batch(scheduled: SchedulerOutput, block_size: int, device: str | torch.device) -> Batch:
    chunks = scheduled.chunks
    assert chunks, "an empty step has no batch"
    max_context = max(c.start + len(c.token_ids) for c in chunks)
    host = _HostLists(max(len(c.token_ids) for c in chunks), -(-max_context // block_size))
    for b, c in enumerate(chunks):
        host.add(b, c, block_size)

    # One host-to-device copy for all index arrays, then views of it.
    arrays = (host.input_ids, host.positions, host.slots, host.query_dest, host.starts, host.context_lens,
              host.block_table, host.sample_rows + host.prompt_rows, host.prompt_targets)
    flat = torch.tensor(list(itertools.chain.from_iterable(arrays)), dtype=torch.int64, device=device)
    input_ids, positions, slots, query_dest, starts, context_lens, table, logits_rows, prompt_targets = (
        flat.split([len(a) for a in arrays]))
    attn = AttentionMetadata(
        slot_mapping=slots,
        query_dest=query_dest,
        block_table=table.view(len(chunks), host.max_blocks),
        starts=starts,
        context_lens=context_lens,
        num_seqs=len(chunks),
        max_query_len=host.max_query_len,
        max_context_len=max(host.context_lens),
        min_context_len=min(host.context_lens),
        first_start=host.starts[0],
        contiguous_from=_contiguous_from(chunks, host.max_blocks, block_size),
    )
    return Batch(
        input_ids=input_ids,
        positions=positions,
        attn=attn,
        logits_rows=logits_rows,
        sample_request_ids=tuple(host.sample_ids),
        prompt_segments=tuple(host.segments),
        prompt_targets=prompt_targets,
    )


def _contiguous_from(chunks: tuple[ScheduledChunk, ...], num_blocks: int, block_size: int) -> int | None:
    """First slot of a lone chunk whose context blocks are consecutive ids, else None.

    One stream gets its blocks one at a time from the head of the pool's free queue, so
    this is the usual case for it, and its attention then reads the cache in place."""
    if len(chunks) != 1:
        return None
    ids = chunks[0].block_ids[:num_blocks]
    first = ids[0]
    if any(b != first + i for i, b in enumerate(ids)):
        return None
    return first * block_size
