"""SchedulerOutput -> the tensors of one step.

Python builds flat lists (one pass over the chunks), then each array becomes a tensor in
one torch.tensor call; everything per-position (slots, masks) is derived on the device.
"""
from __future__ import annotations

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
    seq_index: list[int] = field(default_factory=list)
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
        self.seq_index.extend([b] * n)
        self.query_dest.extend(range(b * self.max_query_len, b * self.max_query_len + n))
        self.starts.append(c.start)
        self.context_lens.append(end)
        self.block_table.extend(c.block_ids)
        self.block_table.extend([0] * (self.max_blocks - len(c.block_ids)))
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
    host = _HostLists(max(len(c.token_ids) for c in chunks), max(len(c.block_ids) for c in chunks))
    for b, c in enumerate(chunks):
        host.add(b, c, block_size)

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    positions = t(host.positions)
    table = t(host.block_table).view(len(chunks), host.max_blocks)  # (B, max_blocks)
    attn = _attention_metadata(
        table, t(host.seq_index), positions, t(host.query_dest), t(host.starts), t(host.context_lens),
        block_size, host.max_query_len, max(host.context_lens),
    )
    return Batch(
        input_ids=t(host.input_ids),
        positions=positions,
        attn=attn,
        logits_rows=t(host.sample_rows + host.prompt_rows),
        sample_request_ids=tuple(host.sample_ids),
        prompt_segments=tuple(host.segments),
        prompt_targets=t(host.prompt_targets),
    )


def _attention_metadata(
    table: torch.Tensor,  # (B, max_blocks)
    seq_index: torch.Tensor,  # (N,)
    positions: torch.Tensor,  # (N,)
    query_dest: torch.Tensor,  # (N,)
    starts: torch.Tensor,  # (B,)
    context_lens: torch.Tensor,  # (B,)
    block_size: int,
    max_query_len: int,
    max_context_len: int,
) -> AttentionMetadata:
    device = table.device
    slot_mapping = table[seq_index, positions // block_size] * block_size + positions % block_size
    key_pos = torch.arange(max_context_len, device=device)  # (Lmax,)
    # A block table covers start + len tokens, so key_pos // block_size < max_blocks; rows of
    # shorter sequences read padding slots there, which the mask hides.
    block_of_key = (key_pos // block_size).expand(table.shape[0], -1)  # (B, Lmax)
    context_slots = table.gather(1, block_of_key) * block_size + key_pos % block_size
    # Padded query rows take the last context position, so their mask row is never empty.
    query_positions = starts[:, None] + torch.arange(max_query_len, device=device)  # (B, Tmax)
    query_positions = torch.minimum(query_positions, context_lens[:, None] - 1)
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        query_dest=query_dest,
        context_slots=context_slots,
        query_positions=query_positions,
        context_lens=context_lens,
        num_seqs=table.shape[0],
        max_query_len=max_query_len,
        max_context_len=max_context_len,
    )
