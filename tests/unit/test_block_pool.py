"""BlockPool: free queue order, reference counts, publication and exact lookups."""
import pytest

from textmill.engine.kv_cache.block_pool import BlockPool
from textmill.engine.kv_cache.prefix_hash import hash_block_tokens


def h(*tokens, parent=None):
    return hash_block_tokens(parent, tokens)


def test_new_pool_is_all_free_in_id_order():
    pool = BlockPool(5)
    assert pool.num_free_blocks == 5
    assert pool.free_block_ids() == (0, 1, 2, 3, 4)
    assert pool.usage == 0.0


def test_allocate_takes_head_and_free_appends_in_given_order():
    pool = BlockPool(5)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_count == 1 for b in blocks)
    assert pool.usage == pytest.approx(0.6)
    pool.free([blocks[2], blocks[0], blocks[1]])
    assert pool.free_block_ids() == (3, 4, 2, 0, 1)
    assert pool.usage == 0.0


def test_shared_block_is_free_only_when_last_reference_drops():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.touch([block])
    assert pool.ref_count(0) == 2
    pool.free([block])
    assert pool.num_free_blocks == 2
    pool.free([block])
    assert pool.free_block_ids() == (1, 2, 0)
    with pytest.raises(AssertionError):
        pool.free([block])


def test_freed_cached_block_is_revived_by_a_hit():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    cid = pool.publish(a, h(1, 2), (1, 2), None)
    pool.free([b, a])
    assert pool.free_block_ids() == (2, 3, 1, 0)
    hit = pool.lookup(h(1, 2), (1, 2), None)
    assert hit is a and hit.entry.cache_id == cid
    pool.touch([hit])
    assert pool.ref_count(0) == 1
    assert pool.free_block_ids() == (2, 3, 1)


def test_reuse_evicts_the_least_recently_freed_cached_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.publish(a, h(1), (1,), None)
    pool.publish(b, h(2), (2,), None)
    pool.free([a])
    pool.free([b])
    (fresh,) = pool.allocate(1)
    assert fresh is a and fresh.entry is None
    assert pool.lookup(h(1), (1,), None) is None
    assert pool.lookup(h(2), (2,), None) is b
    assert pool.num_cached_blocks == 1


def test_publishing_the_same_content_twice_keeps_the_first():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    first = pool.publish(a, h(7, 8), (7, 8), None)
    second = pool.publish(b, h(7, 8), (7, 8), None)
    assert second == first
    assert b.entry is None
    assert pool.lookup(h(7, 8), (7, 8), None) is a


def test_hash_collision_never_serves_other_tokens():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    same_hash = b"x" * 16
    pool.publish(a, same_hash, (1, 2), None)
    assert pool.lookup(same_hash, (3, 4), None) is None
    # The newest computation takes the slot; the old block is simply no longer findable.
    pool.publish(b, same_hash, (3, 4), None)
    assert a.entry is None
    assert pool.lookup(same_hash, (3, 4), None) is b
    assert pool.lookup(same_hash, (1, 2), None) is None


def test_lookup_requires_the_same_parent_publication():
    pool = BlockPool(4)
    root, child = pool.allocate(2)
    root_id = pool.publish(root, h(1), (1,), None)
    pool.publish(child, h(2, parent=h(1)), (2,), root_id)
    assert pool.lookup(h(2, parent=h(1)), (2,), root_id) is child
    assert pool.lookup(h(2, parent=h(1)), (2,), root_id + 99) is None
    assert pool.lookup(h(2, parent=h(1)), (2,), None) is None
