"""Block hashes for the prefix cache: a chain over the token ids of full blocks.

The hash of block i covers block i's tokens and, through the parent hash, every token
before them, so equal hashes mean equal prefixes up to a hash collision. The hash is only
an index: the pool also compares tokens and the parent block before it serves a hit, so a
collision costs a cache miss, never wrong KV.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

BlockHash = bytes
# hash_fn(parent hash or None for the first block, the block's token ids) -> hash
BlockHashFn = Callable[[BlockHash | None, Sequence[int]], BlockHash]

_ROOT_TAG = b"\x00"  # the first block of a sequence has no parent
_CHILD_TAG = b"\x01"


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """blake2b-128 of (parent hash, token ids as little-endian int64): stable across runs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_ROOT_TAG if parent is None else _CHILD_TAG + parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()

