"""Each running request's KV block table, kept by the runner from step to step.

The scheduler sends a request's blocks once (ScheduledChunk.new_block_ids: the blocks
added since it was last scheduled); the tables live here. A step's bookkeeping then costs
what changed (new blocks, requests that came or left), never the length of a context: a
table grows by appends, a batch takes its rows with one index_select, and whether a
table's blocks are consecutive (attention then reads the cache in place) is kept as the
length of its consecutive prefix, updated as blocks arrive.

Each request has a row of one int64 tensor (both dimensions grow by doubling) and a
Python list of the same ids for the slots of the tokens a step writes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from textmill.messages import SchedulerOutput


@dataclass(eq=False)
class _Table:
    row: int
    ids: list[int] = field(default_factory=list)
    consecutive: int = 0  # ids[:consecutive] are ids[0], ids[0] + 1, ...


class BlockTables:
    def __init__(self, block_size: int, rows: int = 8, width: int = 16):
        self.block_size = block_size
        self._tables: dict[str, _Table] = {}
        self._free_rows: list[int] = list(range(rows - 1, -1, -1))
        self._rows = torch.zeros((rows, width), dtype=torch.int64)  # (rows, width); 0 past a table's end

    def update(self, scheduled: SchedulerOutput) -> None:
        """Apply one step's news: requests that left or were preempted lose their table (a
        preempted one gets its blocks again, from the first, when it resumes); each chunk's
        new blocks go at its block_offset (a table longer than that, one this runner never
        heard was preempted, is cut there first)."""
        for request_id in (*scheduled.finished_request_ids, *scheduled.preempted_request_ids):
            self._drop(request_id)
        for chunk in scheduled.chunks:
            table = self._tables.get(chunk.request_id)
            have = len(table.ids) if table is not None else 0
            assert chunk.block_offset <= have, f"{chunk.request_id}: blocks before {chunk.block_offset} never came"
            if chunk.block_offset < have:
                self._cut(table, chunk.block_offset)
            if chunk.new_block_ids:
                self._append(chunk.request_id, chunk.new_block_ids)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tables

    def block_ids(self, request_id: str) -> list[int]:
        """The request's table (the runner's own list: do not change it)."""
        return self._tables[request_id].ids

    def gather(self, request_ids: Sequence[str], width: int) -> torch.Tensor:
        """(len(request_ids), width) int64: each request's first `width` blocks, 0 past its end."""
        self._ensure_width(width)
        rows = torch.tensor([self._tables[r].row for r in request_ids], dtype=torch.int64)
        return self._rows[:, :width].index_select(0, rows)  # a new, contiguous tensor

    def consecutive_from(self, request_id: str, num_blocks: int) -> int | None:
        """The first block id when the table's first num_blocks ids are consecutive, else None."""
        table = self._tables[request_id]
        return table.ids[0] if table.consecutive >= num_blocks else None

    # ------------------------------------------------------------------ internals
    def _append(self, request_id: str, new: Sequence[int]) -> None:
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = _Table(self._take_row())
        start = len(table.ids)
        self._ensure_width(start + len(new))
        self._rows[table.row, start:start + len(new)] = torch.tensor(new, dtype=torch.int64)
        if table.consecutive == start:  # still one run: extend it while the new ids follow on
            first = new[0] if start == 0 else table.ids[0]
            while table.consecutive - start < len(new) and new[table.consecutive - start] == first + table.consecutive:
                table.consecutive += 1
        table.ids.extend(new)

    def _cut(self, table: _Table, length: int) -> None:
        self._rows[table.row, length:len(table.ids)] = 0
        del table.ids[length:]
        table.consecutive = min(table.consecutive, length)

    def _drop(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        if table is not None:
            self._rows[table.row, :len(table.ids)] = 0
            self._free_rows.append(table.row)

    def _take_row(self) -> int:
        if not self._free_rows:
            rows = self._rows.shape[0]
            self._rows = torch.cat([self._rows, torch.zeros_like(self._rows)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def _ensure_width(self, width: int) -> None:
        have = self._rows.shape[1]
        if width > have:
            grown = torch.zeros((self._rows.shape[0], max(width, 2 * have)), dtype=torch.int64)
            grown[:, :have] = self._rows
            self._rows = grown
