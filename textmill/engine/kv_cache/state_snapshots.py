"""The prefix cache of a hybrid (Qwen3.5, LFM2): which recurrent-state snapshots the runner holds.

A recurrent layer's memory of a sequence is one state, not a slot per position, so KV blocks alone
cannot resume a request mid-prompt: a prefix hit also needs the recurrent layers' state after
exactly that prefix. The runner keeps `capacity` snapshots beside its per-request states
(runner/recurrent_state.py); this index, on the engine's side, decides what goes where. A
snapshot is keyed by the chained hash of the block it ends with (engine/kv_cache/prefix_hash.py),
so a key names the whole prefix, and a hit is the longest run of cached KV blocks whose last block
has a snapshot.

Which states are kept (the scheduler asks, ScheduledChunk.save_state): the state at the end of each
prefill chunk the step's budget cut (the scheduler ends those on a block boundary), where the same
long prompt, its n siblings, or other prompts after a shared system prompt resume (from the last
such end inside the shared part); and, as a request generates, the state at the latest block
boundary of its text, which a chat's next turn (this text plus a new message) resumes from. A
prompt's last chunk is not split to keep a state at its end: that would cost every prompt a step,
for a repeat's hit on no more than one chunk's work. A request keeps one generated-text snapshot:
each newer one replaces its older. Beyond that the least recently used snapshot makes room.

A snapshot claimed for a step is written by the runner after that step's forward, so it serves
hits only once the scheduler has the step's results (`commit`); until then it is neither a hit nor
evictable, and if the step fails it is dropped (`discard_pending`): its slot holds whatever it held.
The runner restores before it runs a step and saves after it, so a slot evicted and claimed again
in one step is read before it is overwritten.
"""
from __future__ import annotations

from collections import OrderedDict

from textmill.engine.kv_cache.prefix_hash import BlockHash


class StateSnapshots:
    def __init__(self, capacity: int):
        assert capacity > 0
        self._free = list(range(capacity - 1, -1, -1))  # popped from the end: slot 0 first
        self._ready: OrderedDict[BlockHash, int] = OrderedDict()  # least recently used first
        self._pending: dict[BlockHash, int] = {}  # claimed this step, written after it
        self._latest: dict[str, BlockHash] = {}  # request id -> its generated text's snapshot

    def __contains__(self, key: BlockHash) -> bool:
        return key in self._ready

    def __len__(self) -> int:
        return len(self._ready) + len(self._pending)

    def restore(self, key: BlockHash) -> int:
        """The slot of a ready snapshot, now the most recently used."""
        self._ready.move_to_end(key)
        return self._ready[key]

    def claim(self, key: BlockHash, request_id: str | None = None) -> int | None:
        """A slot for the runner to save `key`'s state into after this step; None when it is kept
        already or every slot is claimed this step. `request_id`: a generated text's snapshot,
        which replaces that request's previous one."""
        if key in self._ready or key in self._pending:
            return None
        if request_id is not None and (old := self._latest.pop(request_id, None)) in self._ready:
            self._free.append(self._ready.pop(old))
        if not self._free:
            if not self._ready:
                return None
            self._free.append(self._ready.popitem(last=False)[1])
        slot = self._free.pop()
        self._pending[key] = slot
        if request_id is not None:
            self._latest[request_id] = key
        return slot

    def commit(self) -> None:
        """The last step ran: what it saved serves hits."""
        self._ready.update(self._pending)
        self._pending.clear()

    def discard_pending(self) -> None:
        """The last step failed: what it was to save is not there, and its slots are free again."""
        for key, slot in self._pending.items():
            self._free.append(slot)
            for request_id in [r for r, k in self._latest.items() if k == key]:
                del self._latest[request_id]
        self._pending.clear()

    def forget(self, request_id: str) -> None:
        """The request left: its generated text's snapshot stays, no longer replaced by it."""
        self._latest.pop(request_id, None)
