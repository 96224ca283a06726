"""KVCacheManager: block tables per request, on top of the BlockPool and the prefix cache.

The scheduler decides who runs; this module only answers "which blocks" and "is there
room". Token positions map to blocks as position // block_size -> block_table[...].

Life of a request's blocks:
  get_computed_blocks  look up the longest cached prefix (read-only);
  allocate_slots       take references on those hits and fresh blocks for new tokens,
                       all or nothing;
  cache_full_blocks    after a step has computed them, publish newly full blocks;
  free                 drop the references (finish, abort, preemption).

Blocks are published only after their KV exists, so a hit can never read a block that a
running step is still writing. To let simultaneous requests with one prompt (the n
samples of a completion) still share it, the blocks that scheduled chunks are about to
fill are registered as "in flight"; `waits_for_in_flight` tells the scheduler to hold a
waiting request back until they are published, after which it takes them as hits.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from textmill.config import CacheConfig
from textmill.engine.kv_cache.block_pool import BlockPool, KVBlock
from textmill.engine.kv_cache.prefix_hash import BlockHash, BlockHashFn, hash_block_tokens
from textmill.engine.kv_cache.state_snapshots import StateSnapshots
from textmill.engine.request import Request


@dataclass(frozen=True)
class KVCacheStats:
    num_blocks: int
    num_free_blocks: int
    usage: float  # fraction of blocks in use
    prefix_queries: int  # tokens of admitted requests that looked up the prefix cache
    prefix_hits: int  # of those, tokens served by the cache

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


@dataclass(eq=False)
class _RequestBlocks:
    blocks: list[KVBlock] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # of the request's full blocks
    # Publication id to chain on, per published position (len == blocks published so far).
    anchors: list[int] = field(default_factory=list)
    in_flight: set[BlockHash] = field(default_factory=set)
    num_sent: int = 0  # blocks[:num_sent] were handed out by take_new_block_ids


class KVCacheManager:
    def __init__(self, cache_config: CacheConfig, hash_fn: BlockHashFn = hash_block_tokens):
        assert cache_config.block_size > 0
        self.block_size = cache_config.block_size
        self.enable_prefix_caching = cache_config.enable_prefix_caching
        self.pool = BlockPool(cache_config.num_blocks)
        self._hash_fn = hash_fn
        self._records: dict[str, _RequestBlocks] = {}
        self._in_flight: Counter[BlockHash] = Counter()
        self._prefix_queries = 0
        self._prefix_hits = 0
        # A hybrid's recurrent states after some prefixes (state_snapshots.py): a hit must end at one.
        self.snapshots = (StateSnapshots(cache_config.state_snapshots)
                          if self.enable_prefix_caching and cache_config.state_snapshots else None)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            self.pool.num_blocks,
            self.pool.num_free_blocks,
            self.pool.usage,
            self._prefix_queries,
            self._prefix_hits,
        )

    def block_ids(self, request_id: str) -> tuple[int, ...]:
        record = self._records.get(request_id)
        return tuple(b.block_id for b in record.blocks) if record else ()

    def take_new_block_ids(self, request_id: str) -> tuple[int, tuple[int, ...]]:
        """(offset, ids): the blocks added to the request's table since the last call (all
        of them after a free), and where they start in the table. What the runner has not
        been sent; costs the new blocks, not the table."""
        record = self._records.get(request_id)
        if record is None:
            return 0, ()
        offset = record.num_sent
        record.num_sent = len(record.blocks)
        return offset, tuple(b.block_id for b in record.blocks[offset:])

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """The fresh blocks allocate_slots(request, num_new_tokens) would take (a running
        request: no prefix hits)."""
        record = self._records.get(request.request_id)
        held = len(record.blocks) if record else 0
        return max(0, self.num_blocks_for(request.num_computed_tokens + num_new_tokens) - held)

    def takes_prefix_hits(self, request: Request) -> bool:
        """Prompt scoring needs logits at every prompt position, so it computes them all."""
        return self.enable_prefix_caching and request.params.prompt_logprobs is None

    # ------------------------------------------------------------------ prefix lookup
    def get_computed_blocks(self, request: Request) -> tuple[tuple[int, ...], int]:
        """The longest cached prefix of a request that holds no blocks yet.

        Returns (block ids, number of tokens they hold). Never all of the request's tokens:
        the last one is always computed so there are logits to sample from.
        """
        if not self.takes_prefix_hits(request):
            return (), 0
        record = self._record(request)
        assert not record.blocks, f"{request.request_id} already holds blocks"
        max_hits = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(record, request, max_hits)
        hits: list[int] = []
        parent: int | None = None
        for i in range(max_hits):
            block = self.pool.lookup(record.hashes[i], self._block_tokens(request, i), parent)
            if block is None:
                break
            hits.append(block.block_id)
            parent = block.entry.cache_id
        if self.snapshots is not None:  # a hybrid resumes only where its recurrent state was kept
            while hits and record.hashes[len(hits) - 1] not in self.snapshots:
                hits.pop()
        return tuple(hits), len(hits) * self.block_size

    # ------------------------------------------------------------------ a hybrid's states
    def restore_slot(self, request: Request, num_hit_tokens: int) -> int | None:
        """The snapshot a hybrid's request resumes from after get_computed_blocks' hits."""
        if self.snapshots is None or not num_hit_tokens:
            return None
        return self.snapshots.restore(self._record(request).hashes[num_hit_tokens // self.block_size - 1])

    def snapshot_chunk(self, request: Request, start: int, num_new: int) -> int:
        """A hybrid's prefill chunk that the budget ends before the request's last token ends on the
        block boundary inside it, where its state is kept (save_slot). The last chunk is not cut: a
        split would cost every prompt a step, for a repeat's hit on what one chunk computes anyway."""
        end = start + num_new
        if self.snapshots is None or end >= request.num_tokens or end // self.block_size * self.block_size <= start:
            return num_new
        return end // self.block_size * self.block_size - start

    def save_slot(self, request: Request, start: int, end: int) -> int | None:
        """Where the runner keeps a hybrid's state after a chunk [start, end), or None: at the block
        boundary a prefill chunk ends on (not the last chunk: no hit reaches a prompt's end), and at
        each boundary of generated text (one a request, its latest: what a next turn resumes from)."""
        if self.snapshots is None or end % self.block_size or end == start:
            return None
        generated = start >= request.num_prompt_tokens
        if not generated and end >= request.num_tokens:
            return None
        record = self._record(request)
        self._extend_hashes(record, request, end // self.block_size)
        return self.snapshots.claim(record.hashes[end // self.block_size - 1],
                                    request.request_id if generated else None)

    def waits_for_in_flight(self, request: Request, num_computed_tokens: int) -> bool:
        """True when the block after a waiting request's cached prefix is being computed now.

        num_computed_tokens is what get_computed_blocks returned. Once that block is
        published (after the step), the request can take it as a hit instead of
        computing it a second time.
        """
        # (not a hybrid's: the block may end where no state is kept, and then waiting gains nothing)
        if not self._in_flight or not self.takes_prefix_hits(request) or self.snapshots is not None:
            return False
        next_block = num_computed_tokens // self.block_size
        if next_block >= (request.num_tokens - 1) // self.block_size:
            return False  # the next block could never be a hit anyway
        record = self._record(request)
        self._extend_hashes(record, request, next_block + 1)
        return record.hashes[next_block] in self._in_flight

    # ------------------------------------------------------------------ allocation
    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: tuple[int, ...] = ()
    ) -> bool:
        """Make the block table cover num_computed_tokens + num_new_tokens positions.

        cached_blocks are the hits from get_computed_blocks, given on a request's first
        allocation (with num_computed_tokens still 0); they count as computed. Returns
        False, changing nothing, when the free blocks do not suffice. On success the full
        blocks this step will fill are registered as in flight.
        """
        assert num_new_tokens > 0
        record = self._record(request)
        if cached_blocks:
            assert not record.blocks and request.num_computed_tokens == 0
        hits = [self.pool.blocks[i] for i in cached_blocks]
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        end = num_computed + num_new_tokens
        num_fresh = self.num_blocks_for(end) - len(record.blocks) - len(hits)
        # Hits that sit in the free queue leave it when touched: they are not free for us.
        num_revived = sum(1 for b in hits if b.ref_count == 0)
        if max(num_fresh, 0) + num_revived > self.pool.num_free_blocks:
            return False
        if not record.blocks:
            self._count_query(request, len(hits) * self.block_size)
        self.pool.touch(hits)
        record.blocks.extend(hits)
        record.anchors.extend(b.entry.cache_id for b in hits)
        if num_fresh > 0:
            record.blocks.extend(self.pool.allocate(num_fresh))
        # Guessed tokens (ScheduledChunk.draft) take slots past the request's tokens: no
        # block of them can be hashed, nor shared, before they are confirmed.
        self._mark_in_flight(record, request, min(end, request.num_tokens))
        return True

    def free(self, request: Request) -> None:
        """Release a request's blocks (finish, abort, preemption); unknown ids are ignored.

        The table is freed back to front, so the tail of a prompt is evicted before its
        head: a cached chain stays usable from its start for as long as possible.
        """
        record = self._records.pop(request.request_id, None)
        if self.snapshots is not None:
            self.snapshots.forget(request.request_id)
        if record is None:
            return
        self._release_in_flight(record)
        self.pool.free(reversed(record.blocks))

    # ------------------------------------------------------------------ publication
    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's full blocks whose KV is now computed (after a step)."""
        if not self.enable_prefix_caching:
            return
        record = self._records.get(request.request_id)
        if record is None:
            return
        num_full = request.num_computed_tokens // self.block_size
        assert num_full <= len(record.blocks)
        self._extend_hashes(record, request, num_full)
        for i in range(len(record.anchors), num_full):
            parent = record.anchors[i - 1] if i else None
            tokens = self._block_tokens(request, i)
            record.anchors.append(self.pool.publish(record.blocks[i], record.hashes[i], tokens, parent))
            self._release_hash(record, record.hashes[i])

    # ------------------------------------------------------------------ internals
    def _record(self, request: Request) -> _RequestBlocks:
        return self._records.setdefault(request.request_id, _RequestBlocks())

    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        start = index * self.block_size
        return tuple(request.token_ids_between(start, start + self.block_size))

    def _extend_hashes(self, record: _RequestBlocks, request: Request, num_blocks: int) -> None:
        for i in range(len(record.hashes), num_blocks):
            parent = record.hashes[i - 1] if i else None
            record.hashes.append(self._hash_fn(parent, self._block_tokens(request, i)))

    def _count_query(self, request: Request, num_hit_tokens: int) -> None:
        if self.takes_prefix_hits(request):
            self._prefix_queries += request.num_tokens
            self._prefix_hits += num_hit_tokens

    def _mark_in_flight(self, record: _RequestBlocks, request: Request, end: int) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = end // self.block_size
        self._extend_hashes(record, request, num_full)
        for i in range(len(record.anchors), num_full):
            block_hash = record.hashes[i]
            if block_hash not in record.in_flight:
                record.in_flight.add(block_hash)
                self._in_flight[block_hash] += 1

    def _release_hash(self, record: _RequestBlocks, block_hash: BlockHash) -> None:
        if block_hash in record.in_flight:
            record.in_flight.discard(block_hash)
            self._in_flight[block_hash] -= 1
            if self._in_flight[block_hash] <= 0:
                del self._in_flight[block_hash]

    def _release_in_flight(self, record: _RequestBlocks) -> None:
        for block_hash in list(record.in_flight):
            self._release_hash(record, block_hash)
