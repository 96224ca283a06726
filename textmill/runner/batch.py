"""SchedulerOutput -> the tensors of one step.

Python builds flat lists (one pass over the chunks), then each array becomes a tensor in
one torch.tensor call; everything per-position (slots, masks) is derived on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from textmill.messages import SchedulerOutput
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


def build_batch(scheduled: SchedulerOutput, block_size: int, device: str | torch.device) -> Batch:
    chunks = scheduled.chunks
    assert chunks, "an empty step has no batch"
    max_query_len = max(len(c.token_ids) for c in chunks)
    max_blocks = max(len(c.block_ids) for c in chunks)
    input_ids: list[int] = []
    positions: list[int] = []
    seq_index: list[int] = []
    query_dest: list[int] = []
    starts: list[int] = []
    context_lens: list[int] = []
    block_table: list[int] = []
    sample_rows: list[int] = []
    sample_ids: list[str] = []
    prompt_rows: list[int] = []
    prompt_targets: list[int] = []
    segments: list[PromptSegment] = []
    for b, c in enumerate(chunks):
        n, offset, end = len(c.token_ids), len(input_ids), c.start + len(c.token_ids)
        assert n > 0 and len(c.block_ids) * block_size >= end, f"bad chunk for {c.request_id}"
        input_ids.extend(c.token_ids)
        positions.extend(range(c.start, end))
        seq_index.extend([b] * n)
        query_dest.extend(range(b * max_query_len, b * max_query_len + n))
        starts.append(c.start)
        context_lens.append(end)
        block_table.extend(c.block_ids)
        block_table.extend([0] * (max_blocks - len(c.block_ids)))
        if c.sample:
            sample_rows.append(offset + n - 1)
            sample_ids.append(c.request_id)
        if c.prompt_logprob_targets:
            targets = c.prompt_logprob_targets
            assert len(targets) <= n
            segments.append(PromptSegment(c.request_id, len(prompt_rows), len(targets), tuple(targets)))
            prompt_rows.extend(range(offset, offset + len(targets)))
            prompt_targets.extend(targets)

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    positions_t, context_lens_t = t(positions), t(context_lens)
    table = t(block_table).view(len(chunks), max_blocks)  # (B, max_blocks)
    attn = _attention_metadata(
        table, t(seq_index), positions_t, t(query_dest), t(starts), context_lens_t,
        block_size, max_query_len, max(context_lens),
    )
    return Batch(
        input_ids=t(input_ids),
        positions=positions_t,
        attn=attn,
        logits_rows=t(sample_rows + prompt_rows),
        sample_request_ids=tuple(sample_ids),
        prompt_segments=tuple(segments),
        prompt_targets=t(prompt_targets),
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
