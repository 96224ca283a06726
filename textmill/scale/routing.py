"""Prefix-cache-aware routing on Ray Serve's request-router API.

A replica's prefix cache holds the KV blocks of prompts it has seen; a prompt that starts
the same way is cheaper where those blocks are. This router keeps, per routing process, a
table from chained hashes of a prompt's leading chunks (as the KV cache chains its blocks'
hashes) to the replica last sent that chunk, and sends a request to the replica that holds
its longest such prefix, unless that replica has `imbalanced_threshold` more requests
queued or running than the least loaded one: then (and for prompts with no match) it goes
to the least loaded replica.

Why not Ray's PrefixCacheAffinityRouter: its public module (ray.serve.llm) needs ray[llm]'s
dependencies (pyarrow and more), and it keeps its prefix tree in a separate actor that it
queries with blocking calls on every request. The idea is the same; this one is local
state and a dictionary lookup per chunk.
"""
from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# ~16 tokens of English text: about one KV block of textmill's default size.
CHUNK_CHARS = 64


def chunk_hashes(text: str, chunk_chars: int = CHUNK_CHARS) -> list[bytes]:
    """One hash per full chunk, each covering everything before it (a chain): equal hashes
    mean equal prefixes, as with the KV cache's block hashes."""
    hashes, prev = [], b""
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        prev = hashlib.blake2b(prev + text[start:start + chunk_chars].encode("utf-8", "surrogatepass"),
                               digest_size=16).digest()
        hashes.append(prev)
    return hashes


class PrefixTable:
    """Chunk hash -> the replica that last got that prefix; least recently used evicted."""

    def __init__(self, max_entries: int):
        self._owners: OrderedDict[bytes, Any] = OrderedDict()
        self._max = max_entries

    def longest_match(self, hashes: list[bytes], allowed: set) -> Any | None:
        owner = None
        for h in hashes:
            holder = self._owners.get(h)
            if holder is None:
                break
            if holder in allowed:
                owner = holder
        return owner

    def record(self, hashes: list[bytes], replica: Any) -> None:
        for h in hashes:
            self._owners[h] = replica
            self._owners.move_to_end(h)
        while len(self._owners) > self._max:
            self._owners.popitem(last=False)


def rank(owner: Any | None, replicas: list, queue_len, imbalanced_threshold: int) -> list[list]:
    """The replicas in ranks, most preferred first; Ray's base router sends the request to the
    least loaded replica of the first rank that has room. The prefix's holder alone first,
    unless it has more than `imbalanced_threshold` requests beyond the least loaded replica;
    then, and without a holder, all replicas in one rank (least loaded wins)."""
    if owner is None or queue_len(owner) - min(map(queue_len, replicas)) > imbalanced_threshold:
        return [replicas]
    return [[owner], [r for r in replicas if r != owner]]


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalanced_threshold: int = 4, chunk_chars: int = CHUNK_CHARS,
                         max_entries: int = 200_000, **_: Any) -> None:
        self._imbalanced_threshold = imbalanced_threshold
        self._chunk_chars = chunk_chars
        self._table = PrefixTable(max_entries)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        hashes = self._hashes(pending_request)
        owner = self._table.longest_match(hashes, set(by_id)) if hashes else None
        ranks = rank(owner, random.sample(list(by_id), len(by_id)), self._queue_len, self._imbalanced_threshold)
        return [[by_id[i] for i in ids] for ids in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = self._hashes(pending_request)
        if hashes:
            self._table.record(hashes, replica_id)

    def _hashes(self, pending_request: PendingRequest | None) -> list[bytes]:
        if pending_request is None:
            return []
        text = next((a.prompt for a in pending_request.args if isinstance(getattr(a, "prompt", None), str)), "")
        return chunk_hashes(text, self._chunk_chars)

    def _queue_len(self, replica_id: ReplicaID) -> int:
        return self.replica_queue_len_cache.get(replica_id) or 0
