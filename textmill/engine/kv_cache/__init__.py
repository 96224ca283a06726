"""The paged KV cache: a block pool with reference counts and a prefix cache over it."""
from textmill.engine.kv_cache.block_pool import BlockPool, CacheEntry, KVBlock
from textmill.engine.kv_cache.manager import KVCacheManager, KVCacheStats
from textmill.engine.kv_cache.prefix_hash import BlockHash, BlockHashFn, hash_block_tokens

__all__ = [
    "BlockHash",
    "BlockHashFn",
    "BlockPool",
    "CacheEntry",
    "KVBlock",
    "KVCacheManager",
    "KVCacheStats",
    "hash_block_tokens",
]
