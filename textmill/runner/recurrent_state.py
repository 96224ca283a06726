"""The per-sequence states of a model's recurrent layers (Qwen3.5's gated delta nets, LFM2's short
convolutions).

A recurrent layer's memory of a sequence is a fixed-size state, updated token by token, not a
KV cache with a slot per position: it cannot be shared by prefix, paged, or rolled back to an
earlier position by forgetting slots. So the runner keeps one slot of every recurrent layer's
pools per running request, from its first chunk until it finishes or is preempted (the
scheduler then recomputes it, and the slot, taken afresh, starts from zeros). Up to max_num_seqs
requests run at once, so that many slots always suffice.

The prefix cache's part: `snapshots` more slots hold copies of states after some block boundaries,
which the engine names (engine/kv_cache/state_snapshots.py): a chunk's `save_state` is copied in
after the step, and a request that starts at a prefix hit takes its slot from its `restore_state`
instead of from zeros.

Guessed tokens need the rollback: before a step that carries guesses the runner copies the
guessing requests' slots (`checkpoint`), the forward records each recurrent layer's inputs
(`StepStates.record`), and where sampling rejects a guess the slot is put back and the kept rows
alone replayed through it (runner/hybrid_forward.py `replay`), which gives the state one-token
steps would have left, bit for bit.

The pools are anonymous mappings (kv_cache.untouched_zeros): resident only once a slot is first
used, so 64 slots of a 9B's 48 MiB each cost what the running requests use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from textmill.config import ModelConfig
from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.runner.kv_cache import untouched_zeros

STATE_DTYPE = torch.float32  # the recurrence adds small updates to a long-lived sum: float32, as llama.cpp's
# The prefix cache's snapshots (engine/kv_cache/state_snapshots.py): as many as SNAPSHOT_BYTES hold,
# at least SNAPSHOTS_MIN (a conversation resumes from one: its last reply's) and at most
# SNAPSHOTS_MAX; Qwen3.5 0.8B's 19 MiB states: 16 of them (304 MiB, resident once used: a GiB's
# worth raised the server's memory by a GiB on a bench that never hits); LFM2's 160 KiB: 256.
SNAPSHOT_BYTES, SNAPSHOTS_MIN, SNAPSHOTS_MAX = 2**28, 16, 256


def snapshot_count(per_sequence: int, room: int | None, lazy: bool = True) -> int:
    """How many states the prefix cache keeps: SNAPSHOT_BYTES' worth within the bounds, and no more
    than a quarter of `room` (the memory left beside the weights and the KV pool; None: unknown); 0
    where none fits. `lazy`: the pools are resident as used (the CPU's); a GPU's are allocated
    whole, so there SNAPSHOT_BYTES bounds them, SNAPSHOTS_MIN or not."""
    count = min(SNAPSHOTS_MAX, max(SNAPSHOTS_MIN if lazy else 0, SNAPSHOT_BYTES // per_sequence))
    return count if room is None else max(0, min(count, room // 4 // per_sequence))


def state_shapes(config: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """One sequence's convolution inputs and delta-rule state (None: LFM2's short convolutions
    have none) in each recurrent layer."""
    if (s := config.linear_attention) is not None:
        return (s.conv_kernel - 1, s.conv_channels), (s.value_heads, s.key_dim, s.value_dim)
    assert config.short_conv > 1, "a model with recurrent layers names their state"
    return (config.short_conv - 1, config.hidden_size), None


def bytes_per_sequence(config: ModelConfig) -> int:
    conv, ssm = state_shapes(config)
    per_layer = math.prod(conv) + (math.prod(ssm) if ssm else 0)
    return per_layer * len(config.recurrent_layers) * STATE_DTYPE.itemsize


def fitting_slots(per_sequence: int, asked: int, room: int | None) -> int:
    """max_num_seqs for a hybrid: `asked`, or fewer where that many requests' states would take more
    than half of `room`, the memory left once the weights and the KV pool are in (None: unknown, no
    cap); at least one. A 27B's states are ~100 MiB a request: 64 of them would not fit beside its
    weights on a 24 GB machine, and a server must not start into an out-of-memory kill."""
    if room is None or per_sequence * asked <= room // 2:
        return asked
    return max(1, room // 2 // per_sequence)


@dataclass(frozen=True)
class StepStates:
    """One step's view (models/qwen35.py SequenceStates): each sequence's rows and slot. `record`:
    where a forward keeps each recurrent layer's inputs (layer -> tensors of the step's rows), for
    a replay; None when no one will replay this step."""

    rows: tuple[tuple[int, int, int], ...]
    conv: dict[int, torch.Tensor]
    ssm: dict[int, torch.Tensor]
    record: dict[int, tuple[torch.Tensor, ...]] | None = None

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.conv[layer], self.ssm.get(layer)


class RecurrentStates:
    def __init__(self, config: ModelConfig, num_slots: int, device: str | torch.device = "cpu", snapshots: int = 0):
        conv, ssm = state_shapes(config)
        # The running requests' slots, then the snapshots' (slot num_slots + i is snapshot i).
        total, self.num_slots = num_slots + snapshots, num_slots
        self.conv = {i: untouched_zeros((total, *conv), STATE_DTYPE, device) for i in config.recurrent_layers}
        self.ssm = {i: untouched_zeros((total, *ssm), STATE_DTYPE, device)
                    for i in config.recurrent_layers} if ssm else {}
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._slot_of: dict[str, int] = {}

    def update(self, scheduled: SchedulerOutput) -> None:
        """Slots back from the requests that finished or were preempted since the last step."""
        for request_id in (*scheduled.finished_request_ids, *scheduled.preempted_request_ids):
            slot = self._slot_of.pop(request_id, None)
            if slot is not None:
                self._free.append(slot)

    def slot_of(self, request_id: str) -> int:
        return self._slot_of[request_id]

    def checkpoint(self, slots: list[int]) -> dict[int, list[torch.Tensor]]:
        """Copies of these slots in every layer's pools, for `restore`."""
        pools = (*self.conv.values(), *self.ssm.values())
        return {slot: [pool[slot].clone() for pool in pools] for slot in slots}

    def restore(self, slot: int, saved: dict[int, list[torch.Tensor]]) -> None:
        for pool, copy in zip((*self.conv.values(), *self.ssm.values()), saved[slot]):
            pool[slot].copy_(copy)

    def for_step(self, chunks: tuple[ScheduledChunk, ...], record: bool = False) -> StepStates:
        """`chunks` in the flat batch's order. A chunk from position 0 takes a slot and zeroes it, one
        at a prefix hit takes a slot and copies its snapshot in; a later chunk continues its request's
        slot. `record`: the forward keeps its recurrent layers' inputs (StepStates.record)."""
        rows, first = [], 0
        for c in chunks:
            slot = self._slot_of.get(c.request_id)
            if c.start == 0 or c.restore_state is not None:
                if slot is None:
                    if not self._free:
                        raise RuntimeError("more running requests than recurrent state slots")
                    slot = self._free.pop()
                    self._slot_of[c.request_id] = slot
                for pool in (*self.conv.values(), *self.ssm.values()):
                    if c.restore_state is None:
                        pool[slot].zero_()
                    else:
                        pool[slot].copy_(pool[self.num_slots + c.restore_state])
            elif slot is None:  # a prefix-cache hit without a snapshot: the engine never asks for one
                raise RuntimeError(f"request {c.request_id} resumes at {c.start} without its recurrent state")
            rows.append((first, len(c.token_ids), slot))
            first += len(c.token_ids)
        return StepStates(tuple(rows), self.conv, self.ssm, {} if record else None)

    def save(self, chunks: tuple[ScheduledChunk, ...]) -> None:
        """After a step's forward: the states the chunks ask to keep, copied to their snapshots (a
        chunk with guesses asks for none, so the rewind that may follow changes none of them)."""
        for c in chunks:
            if c.save_state is not None and (slot := self._slot_of.get(c.request_id)) is not None:
                for pool in (*self.conv.values(), *self.ssm.values()):
                    pool[self.num_slots + c.save_state].copy_(pool[slot])
