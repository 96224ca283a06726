"""runner/block_tables.py: the runner keeps each request's block table from the new blocks
the scheduler sends, so a step's work follows what changed, not the context length."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.runner.batch import build_batch
from textmill.runner.block_tables import BlockTables

BLOCK = 4


def chunk(rid: str, start: int, new: tuple[int, ...], n: int = 1, offset: int | None = None) -> ScheduledChunk:
    """offset None: the new blocks follow the table the runner holds (step() fills it in)."""
    return ScheduledChunk(rid, tuple(range(n)), start, new, sample=True, block_offset=-1 if offset is None else offset)


def step(tables: BlockTables, *chunks: ScheduledChunk, finished=(), preempted=()) -> SchedulerOutput:
    gone = {*finished, *preempted}
    chunks = tuple(dataclasses.replace(c, block_offset=len(tables.block_ids(c.request_id))
                                       if c.request_id in tables and c.request_id not in gone else 0)
                   if c.block_offset < 0 else c for c in chunks)
    scheduled = SchedulerOutput((), chunks, tuple(finished), tuple(preempted))
    tables.update(scheduled)
    return scheduled


def test_tables_grow_by_the_new_blocks_and_gather_rows_padded_with_zero():
    tables = BlockTables(BLOCK, rows=1, width=2)  # both dimensions must grow
    step(tables, chunk("a", 0, (7, 3, 9), n=10), chunk("b", 0, (5,), n=2))
    step(tables, chunk("a", 10, ()), chunk("b", 2, ()))
    step(tables, chunk("a", 11, ()), chunk("b", 3, ()))
    step(tables, chunk("a", 12, (2,)), chunk("b", 4, (6,)))
    assert tables.block_ids("a") == [7, 3, 9, 2] and tables.block_ids("b") == [5, 6]
    assert tables.gather(["b", "a"], 4).tolist() == [[5, 6, 0, 0], [7, 3, 9, 2]]
    assert tables.gather(["a"], 3).tolist() == [[7, 3, 9]]  # only the blocks asked for
    assert tables.gather(["a", "b"], 4).is_contiguous()


def test_a_request_that_leaves_or_is_preempted_starts_a_fresh_table():
    tables = BlockTables(BLOCK, rows=2)
    step(tables, chunk("a", 0, (1, 2), n=5), chunk("b", 0, (3, 4, 8), n=9))
    step(tables, finished=["b"], preempted=["a"])
    assert "a" not in tables and "b" not in tables
    step(tables, chunk("a", 0, (6,), n=3), chunk("c", 0, (0,), n=1))  # rows reused, cleared
    assert tables.block_ids("a") == [6] and tables.block_ids("c") == [0]
    assert tables.gather(["a", "c"], 3).tolist() == [[6, 0, 0], [0, 0, 0]]


def test_a_table_restarts_where_the_scheduler_says():
    """A chunk's block_offset says how much of the table the runner should hold: a runner
    that missed a preemption (a step that failed before it was read) starts over anyway,
    and blocks that never came are an error, not a wrong table."""
    tables = BlockTables(BLOCK)
    step(tables, chunk("a", 0, (4, 5, 6), n=12))
    step(tables, chunk("a", 0, (9,), n=3, offset=0))  # resumed after an unseen preemption
    assert tables.block_ids("a") == [9] and tables.gather(["a"], 3).tolist() == [[9, 0, 0]]
    assert tables.consecutive_from("a", 1) == 9
    with pytest.raises(AssertionError, match="never came"):
        step(tables, chunk("a", 8, (10,), offset=2))


def test_consecutive_blocks_are_known_as_they_arrive():
    tables = BlockTables(BLOCK)
    step(tables, chunk("run", 0, (4, 5), n=8), chunk("gap", 0, (4, 6), n=8), chunk("one", 0, (9,), n=1))
    assert tables.consecutive_from("run", 2) == 4
    assert tables.consecutive_from("gap", 1) == 4 and tables.consecutive_from("gap", 2) is None
    step(tables, chunk("run", 8, (6, 8)), chunk("gap", 8, (7,)))
    assert tables.consecutive_from("run", 3) == 4  # the context may stop before the break
    assert tables.consecutive_from("run", 4) is None
    assert tables.consecutive_from("gap", 3) is None  # 4, 6, 7: broken for good
    assert tables.consecutive_from("one", 1) == 9


def _lines_run(fn) -> int:
    """Lines of textmill's runner executed by fn() (sys.settrace)."""
    runner_dir = str(Path(build_batch.__code__.co_filename).parent)
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if not frame.f_code.co_filename.startswith(runner_dir):
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def _decode_step_lines(context_blocks: int, scattered: bool) -> int:
    """Python lines a decode step costs the runner (its tables and its batch) for one
    request whose table holds context_blocks blocks, the step bringing one more."""
    ids = list(range(context_blocks + 1))
    if scattered:
        ids.reverse()
    tables = BlockTables(BLOCK, width=2048)  # room made beforehand: growing is amortized, by doubling
    context = context_blocks * BLOCK  # full blocks: the decoded token starts the next one
    step(tables, chunk("r", 0, tuple(ids[:context_blocks]), n=context))
    decode = SchedulerOutput((), (chunk("r", context, (ids[-1],), offset=context_blocks),))

    def one_step():
        tables.update(decode)
        batch = build_batch(decode, tables, "cpu")
        assert batch.attn.groups[0].block_table.shape == (1, context_blocks + 1)

    return _lines_run(one_step)


def test_a_decode_step_costs_the_same_python_work_at_any_context_length():
    """Counted in executed lines, not time: the tables take the new block, the batch
    gathers the row, and nothing walks the context's blocks in Python (checking that they
    are consecutive used to)."""
    for scattered in (False, True):
        assert _decode_step_lines(4, scattered) == _decode_step_lines(1024, scattered)


def test_the_block_table_a_step_uses_is_the_whole_table():
    tables = BlockTables(BLOCK)
    step(tables, chunk("r", 0, (3, 1), n=8))
    decode = SchedulerOutput((), (chunk("r", 9, (8,), offset=2),))
    tables.update(decode)
    batch = build_batch(decode, tables, "cpu")
    assert batch.attn.groups[0].block_table.tolist() == [[3, 1, 8]]
    assert batch.attn.slot_mapping.tolist() == [8 * BLOCK + 1]  # position 9 -> the third block, offset 1
    assert batch.attn.groups[0].block_table.dtype == torch.int64
