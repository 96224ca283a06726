"""runner/recurrent_state.py on its own: how many requests' states a machine holds, slots taken and
given back, zeroed for a new sequence, checkpointed and restored, and the refusals."""
from __future__ import annotations

import pytest
import torch

from textmill.config import ModelConfig
from textmill.linear_attention import LinearAttentionShape
from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.runner.recurrent_state import RecurrentStates, bytes_per_sequence, fitting_slots

CONFIG = ModelConfig(architecture="qwen35", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=3,
                     num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=64, recurrent_layers=(0, 2),
                     linear_attention=LinearAttentionShape(key_heads=1, value_heads=2, key_dim=4, value_dim=4))


def test_fitting_slots_caps_what_does_not_fit() -> None:
    assert fitting_slots(100, 64, None) == 64  # memory unknown: as asked
    assert fitting_slots(100, 64, 2 * 6400) == 64  # exactly half of the room
    assert fitting_slots(100, 64, 2 * 6399) == 63
    assert fitting_slots(100, 64, 50) == 1  # never none
    assert fitting_slots(100, 64, -10**9) == 1


def test_state_sizes() -> None:
    # per recurrent layer: 3 taps x (2 x 4 + 2 x 4) channels and 2 x 4 x 4 state values, float32
    assert bytes_per_sequence(CONFIG) == 2 * (3 * 16 + 32) * 4
    lfm2 = ModelConfig(**{**CONFIG.__dict__, "architecture": "lfm2", "linear_attention": None, "short_conv": 3})
    assert bytes_per_sequence(lfm2) == 2 * 2 * 8 * 4  # two taps of the hidden width, no other state
    assert RecurrentStates(lfm2, 2).for_step((_chunk("a", 0),)).pools(0)[1] is None


def _chunk(rid: str, start: int, n: int = 2) -> ScheduledChunk:
    return ScheduledChunk(rid, (1,) * n, start, (), sample=True)


def test_slots_are_taken_zeroed_given_back_and_restored() -> None:
    states = RecurrentStates(CONFIG, 2)
    step = states.for_step((_chunk("a", 0), _chunk("b", 0, 3)))
    assert step.rows == ((0, 2, 0), (2, 3, 1)) and step.record is None
    for pool in (*states.conv.values(), *states.ssm.values()):
        pool.fill_(7.0)  # the sequences' states after their first chunks
    saved = states.checkpoint([states.slot_of("b")])
    states.ssm[2][1].fill_(9.0)
    states.restore(1, saved)
    assert torch.all(states.ssm[2][1] == 7.0)
    assert states.for_step((_chunk("a", 2, 1),), record=True).record == {}  # continues its slot, unzeroed
    assert torch.all(states.conv[0][0] == 7.0)
    with pytest.raises(RuntimeError, match="more running requests"):
        states.for_step((_chunk("c", 0),))
    states.update(SchedulerOutput((), (), ("a",), ()))  # a finished: its slot serves c, zeroed
    assert states.for_step((_chunk("c", 0),)).rows == ((0, 2, 0),)
    assert torch.all(states.conv[0][0] == 0) and torch.all(states.ssm[2][0] == 0)
    with pytest.raises(RuntimeError, match="without its recurrent state"):
        states.for_step((_chunk("d", 5),))  # a prefix-cache hit: the state of those positions was never kept


def test_snapshots_keep_a_state_and_start_a_request_from_it() -> None:
    """A chunk's save_state copies its request's slot to that snapshot after the step; a request that
    starts at a prefix hit takes a slot holding the snapshot (not zeros), and later changes to the
    slot leave the snapshot alone."""
    import dataclasses

    states = RecurrentStates(CONFIG, 2, snapshots=3)
    step = states.for_step((_chunk("a", 0),))
    for pool in (*states.conv.values(), *states.ssm.values()):
        pool[step.rows[0][2]].fill_(7.0)  # what the forward left
    states.save((dataclasses.replace(_chunk("a", 0), save_state=2),))
    states.update(SchedulerOutput((), (), finished_request_ids=("a",)))
    resumed = states.for_step((dataclasses.replace(_chunk("b", 16), restore_state=2),))
    slot = resumed.rows[0][2]
    assert all(bool((pool[slot] == 7.0).all()) for pool in (*states.conv.values(), *states.ssm.values()))
    states.conv[0][slot].zero_()
    assert bool((states.conv[0][2 + 2] == 7.0).all())  # snapshot 2 lies after the 2 running slots
    with pytest.raises(RuntimeError, match="without its recurrent state"):
        states.for_step((_chunk("c", 16),))


def test_snapshot_counts() -> None:
    from textmill.runner.recurrent_state import snapshot_count

    assert snapshot_count(12 << 20, None) == 21  # Qwen3.5 35B-A3B: 256 MiB's worth
    assert snapshot_count(160 << 10, None) == 256 and snapshot_count(19 << 20, None) == 16  # the bounds
    assert snapshot_count(19 << 20, 4 * 10 * (19 << 20)) == 10  # a quarter of the room left
    assert snapshot_count(19 << 20, 0) == 0  # none fits: wiring turns the prefix cache off
    assert snapshot_count(100 << 20, None, lazy=False) == 2  # a GPU's pools: 256 MiB whole
