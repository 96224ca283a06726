"""BlockPool: the fixed set of KV blocks, their reference counts, and the prefix-cache index.

A block is in exactly one of three states:
  in use      ref_count > 0, owned by one or more requests' block tables;
  free+cached ref_count == 0, still published in the prefix cache (its KV is intact);
  free        ref_count == 0, holding nothing anyone can find.
Free blocks (cached or not) wait in one queue ordered by the time they were freed. New
blocks come from its head (the least recently freed), so cached content survives as long
as possible, and a prefix hit on a free cached block takes it out of the queue again.

Exactness: every published block records its token ids and the publication id of its
parent block. A lookup serves a block only when its tokens and its parent both match, so
a served chain equals the looked-up prefix token for token even if hashes collide.
Publication ids are never reused, so a child of an evicted parent can never be served.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from textmill.engine.kv_cache.prefix_hash import BlockHash


@dataclass(frozen=True)
class CacheEntry:
    """What a published block holds: enough to prove a hit is exact."""

    block_hash: BlockHash
    token_ids: tuple[int, ...]
    cache_id: int  # unique per publication, never reused
    parent_cache_id: int | None  # the parent block's publication; None for a first block


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    entry: CacheEntry | None = None  # set while the block is published in the prefix cache


class BlockPool:
    def __init__(self, num_blocks: int):
        assert num_blocks > 0, "the KV cache needs at least one block"
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block id -> block, head = least recently freed; all blocks start free, in id order.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self._cache_ids = itertools.count(1)

    # ------------------------------------------------------------------ accounting
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (free cached blocks count as free)."""
        return 1.0 - len(self._free) / len(self.blocks)

    def free_block_ids(self) -> tuple[int, ...]:
        """The free queue, the next block to be reused first."""
        return tuple(self._free)

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    # ------------------------------------------------------------------ references
    def allocate(self, num: int) -> list[KVBlock]:
        """Take `num` fresh blocks from the head of the free queue, evicting what they cached."""
        assert num <= len(self._free), f"asked for {num} blocks, {len(self._free)} free"
        taken = []
        for _ in range(num):
            _, block = self._free.popitem(last=False)
            self._unpublish(block)
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks served by the prefix cache, reviving free ones."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block; unreferenced ones join the queue tail in order.

        A published block keeps its entry, so a later prefix hit can revive it until the
        block is reused.
        """
        for block in blocks:
            assert block.ref_count > 0, f"block {block.block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block

    # ------------------------------------------------------------------ prefix cache
    def lookup(
        self, block_hash: BlockHash, token_ids: tuple[int, ...], parent_cache_id: int | None
    ) -> KVBlock | None:
        """The published block with exactly this content and parent, if any."""
        block = self._cached.get(block_hash)
        if block is None or not _same_content(block.entry, token_ids, parent_cache_id):
            return None
        return block

    def publish(
        self,
        block: KVBlock,
        block_hash: BlockHash,
        token_ids: tuple[int, ...],
        parent_cache_id: int | None,
    ) -> int:
        """Publish a block whose KV has been computed; return the publication id to chain on.

        When the same content is already published (another request computed it too, or
        this block was itself a hit), that publication stays and its id is returned. A
        different block under the same hash (a collision, or a child of an evicted parent)
        is replaced: the newest computation wins, and both stay correct.
        """
        assert block.ref_count > 0, "only a block someone holds can be published"
        existing = self._cached.get(block_hash)
        if existing is not None and _same_content(existing.entry, token_ids, parent_cache_id):
            return existing.entry.cache_id
        if existing is not None:
            existing.entry = None
        self._unpublish(block)
        block.entry = CacheEntry(block_hash, token_ids, next(self._cache_ids), parent_cache_id)
        self._cached[block_hash] = block
        return block.entry.cache_id

    def _unpublish(self, block: KVBlock) -> None:
        entry = block.entry
        if entry is not None and self._cached.get(entry.block_hash) is block:
            del self._cached[entry.block_hash]
        block.entry = None


def _same_content(
    entry: CacheEntry | None, token_ids: tuple[int, ...], parent_cache_id: int | None
) -> bool:
    return (
        entry is not None
        and entry.parent_cache_id == parent_cache_id
        and entry.token_ids == token_ids
    )
