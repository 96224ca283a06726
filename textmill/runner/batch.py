"""SchedulerOutput -> the tensors of one step.

Python builds flat lists (one pass over the chunks, cache slots included), then all of them
become one tensor in one torch.tensor call, split into views; masks are derived on the
device, and only in the steps that need one (kv_cache.py). Block tables come from the
runner's BlockTables (block_tables.py), one index_select per attention group: nothing here
walks a request's blocks, so a step's Python work follows its tokens, not their context.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.runner.block_tables import BlockTables
from textmill.runner.kv_cache import AttentionGroup, AttentionMetadata


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
    # token of each chunk with sample=True, and the len(draft) rows before it where the
    # chunk carries guesses), then the P prompt-logprob rows.
    logits_rows: torch.Tensor  # (S + P,) int64
    sample_request_ids: tuple[str, ...]  # (S,) the request of each sampled row (a chunk's rows together)
    prompt_segments: tuple[PromptSegment, ...]
    prompt_targets: torch.Tensor  # (P,) int64: the token whose logprob each prompt row scores
    # The flat batch holds the scheduler's chunks in this order (indices into its tuple).
    order: tuple[int, ...] = ()

    @property
    def num_sampled(self) -> int:
        return len(self.sample_request_ids)


@dataclass
class _GroupLists:
    """One attention group's per-sequence arrays (see kv_cache.AttentionGroup)."""

    max_query_len: int
    max_blocks: int
    token_start: int
    query_dest: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    query_start: list[int] = field(default_factory=lambda: [0])

    def add(self, c: ScheduledChunk) -> None:
        b, n = len(self.starts), len(c.token_ids)
        self.query_dest.extend(range(b * self.max_query_len, b * self.max_query_len + n))
        self.query_start.append(self.query_start[-1] + n)
        self.starts.append(c.start)
        self.context_lens.append(c.start + n)

    def arrays(self) -> tuple[list[int], ...]:
        return self.query_dest, self.starts, self.context_lens, self.query_start


@dataclass
class _HostLists:
    """The step's flat arrays as Python lists: one pass over the chunks, no tensors yet."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    segments: list[PromptSegment] = field(default_factory=list)

    def add(self, c: ScheduledChunk, ids: list[int], block_size: int) -> None:
        """`ids`: the request's block table."""
        n, offset, end = len(c.token_ids), len(self.input_ids), c.start + len(c.token_ids)
        assert n > 0 and len(ids) * block_size >= end, f"bad chunk for {c.request_id}"
        self.input_ids.extend(c.token_ids)
        self.positions.extend(range(c.start, end))
        self.slots.extend(ids[p // block_size] * block_size + p % block_size for p in range(c.start, end))
        if c.sample:  # the last position, and with guesses each position that checks one
            first = offset + n - 1 - len(c.draft)
            self.sample_rows.extend(range(first, offset + n))
            self.sample_ids.extend([c.request_id] * (len(c.draft) + 1))
        targets = c.prompt_logprob_targets
        if targets:
            assert len(targets) <= n
            self.segments.append(PromptSegment(c.request_id, len(self.prompt_rows), len(targets), tuple(targets)))
            self.prompt_rows.extend(range(offset, offset + len(targets)))
            self.prompt_targets.extend(targets)


def step_order(chunks: tuple[ScheduledChunk, ...]) -> tuple[int, ...]:
    """The order of the chunks in the flat batch: single-token chunks (decode) first, then
    longer ones, each in the scheduler's order. Attention runs per group, so a prefill
    chunk never pads every decoding sequence to its length."""
    return tuple(sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids) > 1))


def build_batch(scheduled: SchedulerOutput, tables: BlockTables, device: str | torch.device) -> Batch:
    """`tables` already holds this step's blocks (BlockTables.update(scheduled))."""
    assert scheduled.chunks, "an empty step has no batch"
    order = step_order(scheduled.chunks)
    chunks = tuple(scheduled.chunks[i] for i in order)
    block_size = tables.block_size
    host = _HostLists()
    groups = _groups(chunks, block_size)
    for c in chunks:
        host.add(c, tables.block_ids(c.request_id), block_size)
    for g, members in groups:
        for c in members:
            g.add(c)

    # One host-to-device copy for all index arrays, then views of it.
    arrays = [host.input_ids, host.positions, host.slots, host.sample_rows + host.prompt_rows, host.prompt_targets]
    for g, _ in groups:
        arrays.extend(g.arrays())
    flat = torch.tensor(list(itertools.chain.from_iterable(arrays)), dtype=torch.int64, device=device)
    views = flat.split([len(a) for a in arrays])
    input_ids, positions, slots, logits_rows, prompt_targets = views[:5]
    attn_groups = tuple(
        _attention_group(g, members, views[5 + 4 * i : 9 + 4 * i], tables, device)
        for i, (g, members) in enumerate(groups))
    return Batch(
        input_ids=input_ids,
        positions=positions,
        attn=AttentionMetadata(slot_mapping=slots, groups=attn_groups),
        logits_rows=logits_rows,
        sample_request_ids=tuple(host.sample_ids),
        prompt_segments=tuple(host.segments),
        prompt_targets=prompt_targets,
        order=order,
    )


def _groups(chunks: tuple[ScheduledChunk, ...], block_size: int) -> list[tuple[_GroupLists, list[ScheduledChunk]]]:
    """Split the ordered chunks into the decode group and the rest (either may be absent)."""
    num_decode = sum(1 for c in chunks if len(c.token_ids) == 1)
    out, token_start = [], 0
    for members in (list(chunks[:num_decode]), list(chunks[num_decode:])):
        if not members:
            continue
        max_context = max(c.start + len(c.token_ids) for c in members)
        lists = _GroupLists(max(len(c.token_ids) for c in members), -(-max_context // block_size), token_start)
        out.append((lists, members))
        token_start += sum(len(c.token_ids) for c in members)
    return out


def _attention_group(g: _GroupLists, members: list[ScheduledChunk], views, tables: BlockTables,
                     device: str | torch.device) -> AttentionGroup:
    query_dest, starts, context_lens, query_start = views
    # Only the blocks that hold context: a table may run ahead of the tokens.
    table = tables.gather([c.request_id for c in members], g.max_blocks).to(device)
    return AttentionGroup(
        token_start=g.token_start,
        num_tokens=len(g.query_dest),
        query_dest=query_dest,
        block_table=table,  # (B, max_blocks)
        starts=starts,
        context_lens=context_lens,
        query_start=query_start,
        num_seqs=len(members),
        max_query_len=g.max_query_len,
        max_context_len=max(g.context_lens),
        min_context_len=min(g.context_lens),
        first_start=g.starts[0],
        contiguous_from=_contiguous_from(members, g.max_blocks, tables),
    )


def _contiguous_from(chunks: list[ScheduledChunk], num_blocks: int, tables: BlockTables) -> int | None:
    """First slot of a lone chunk whose context blocks are consecutive ids, else None.

    One stream gets its blocks one at a time from the head of the pool's free queue, so
    this is the usual case for it, and its attention then reads the cache in place."""
    if len(chunks) != 1:
        return None
    first = tables.consecutive_from(chunks[0].request_id, num_blocks)
    return None if first is None else first * tables.block_size
