"""KVCacheManager: block tables, prefix hits with exact block ids, LRU, collisions, in flight."""
from textmill.config import CacheConfig
from textmill.engine.kv_cache.manager import KVCacheManager
from textmill.engine.request import Request
from textmill.sampling_params import SamplingParams

B = 16


def make_request(rid, tokens, **params):
    return Request(rid, tuple(tokens), SamplingParams(**params))


def manager(num_blocks=10, block_size=B, caching=True, **kw):
    return KVCacheManager(CacheConfig(block_size, num_blocks, caching), **kw)


def admit(kv, request, num_new=None):
    """What the scheduler does for a waiting request, then pretend the step computed it."""
    hits, num_hit = kv.get_computed_blocks(request)
    num_new = request.num_tokens - num_hit if num_new is None else num_new
    assert kv.allocate_slots(request, num_new, cached_blocks=hits)
    request.num_computed_tokens = num_hit + num_new
    kv.cache_full_blocks(request)
    return hits, num_hit


PREFIX = list(range(100, 100 + 3 * B))  # three full blocks


def test_first_request_gets_blocks_in_order_and_no_hits():
    kv = manager()
    req = make_request("a", PREFIX + [1, 2, 3])  # 51 tokens -> 4 blocks
    assert kv.get_computed_blocks(req) == ((), 0)
    admit(kv, req)
    assert kv.block_ids("a") == (0, 1, 2, 3)
    assert kv.num_free_blocks == 6
    assert kv.usage == 0.4


def test_second_request_with_same_prefix_shares_the_blocks():
    kv = manager()
    a = make_request("a", PREFIX + [1, 2, 3])
    admit(kv, a)
    b = make_request("b", PREFIX + [7, 8])
    hits, num_hit = admit(kv, b)
    assert (hits, num_hit) == ((0, 1, 2), 48)
    assert kv.block_ids("b") == (0, 1, 2, 4)
    assert [kv.pool.ref_count(i) for i in range(5)] == [2, 2, 2, 1, 1]
    stats = kv.stats()
    assert (stats.prefix_queries, stats.prefix_hits) == (51 + 50, 48)


def test_after_both_free_blocks_wait_in_lru_order_tail_first():
    kv = manager()
    a = make_request("a", PREFIX + [1, 2, 3])
    b = make_request("b", PREFIX + [7, 8])
    admit(kv, a)
    admit(kv, b)
    kv.free(a)
    kv.free(b)
    # a's private tail first, then b's tables back to front: the shared head goes last.
    assert kv.pool.free_block_ids() == (5, 6, 7, 8, 9, 3, 4, 2, 1, 0)
    # The cached prefix survives the free and is revived by the next hit.
    c = make_request("c", PREFIX + [9])
    assert kv.get_computed_blocks(c) == ((0, 1, 2), 48)


def test_hits_never_cover_the_last_token():
    kv = manager()
    admit(kv, make_request("a", PREFIX))
    same = make_request("b", PREFIX)
    assert kv.get_computed_blocks(same) == ((0, 1), 32)


def test_only_computed_blocks_are_published():
    kv = manager()
    a = make_request("a", PREFIX + [1])
    hits, _ = kv.get_computed_blocks(a)
    assert kv.allocate_slots(a, 20, cached_blocks=hits)
    b = make_request("b", PREFIX + [2])
    assert kv.get_computed_blocks(b) == ((), 0)  # allocated, not computed yet
    a.num_computed_tokens = 20
    kv.cache_full_blocks(a)
    assert kv.get_computed_blocks(b) == ((0,), 16)


def test_eviction_after_reuse_means_a_miss():
    kv = manager(num_blocks=4)
    admit(kv, make_request("a", PREFIX + [1]))
    kv.free(make_request("a", ()))
    assert kv.pool.free_block_ids() == (3, 2, 1, 0)
    other = make_request("x", list(range(2 * B)))
    admit(kv, other, num_new=2 * B)  # takes 3 then 2: block 2 (prefix block 3) is evicted
    assert kv.block_ids("x") == (3, 2)
    again = make_request("c", PREFIX + [1])
    assert kv.get_computed_blocks(again) == ((0, 1), 32)


def test_collision_with_different_tokens_does_not_hit():
    kv = manager(hash_fn=lambda parent, tokens: b"same hash")
    admit(kv, make_request("a", [1] * B + [0]))
    other = make_request("b", [2] * B + [0])
    assert kv.get_computed_blocks(other) == ((), 0)
    same = make_request("c", [1] * B + [5])
    assert kv.get_computed_blocks(same) == ((0,), 16)


def test_same_block_tokens_after_a_different_parent_do_not_hit():
    # A hash that ignores the parent makes block 1 of both prompts collide with equal
    # tokens; the parent check refuses to serve a block computed after other KV.
    kv = manager(hash_fn=lambda parent, tokens: bytes(str(tokens), "ascii"))
    admit(kv, make_request("a", [1] * B + [5] * B + [0]))  # blocks 0, 1, 2
    admit(kv, make_request("d", [2] * B + [5] * B + [0]))  # blocks 3, 4, 5
    # Block 4 (after d's first block) now holds the slot of hash([5] * B).
    again = make_request("c", [1] * B + [5] * B + [9])
    assert kv.get_computed_blocks(again) == ((0,), 16)


def test_prompt_logprob_requests_take_no_hits_but_publish():
    kv = manager()
    scoring = make_request("s", PREFIX + [1], prompt_logprobs=0)
    admit(kv, scoring)
    assert kv.block_ids("s") == (0, 1, 2, 3)
    rescoring = make_request("s2", PREFIX + [1], prompt_logprobs=0)
    assert kv.get_computed_blocks(rescoring) == ((), 0)
    hits, num_hit = admit(kv, rescoring)
    assert kv.block_ids("s2") == (4, 5, 6, 7)
    assert kv.get_computed_blocks(make_request("c", PREFIX + [3])) == ((0, 1, 2), 48)
    assert kv.stats().prefix_queries == 0


def test_failed_allocation_changes_nothing():
    kv = manager(num_blocks=4, block_size=4)
    first = make_request("a", list(range(13)))  # 4 blocks, 3 of them full
    admit(kv, first)
    kv.free(first)
    before = kv.pool.free_block_ids()
    bigger = make_request("b", list(range(17)))  # 3 hits + 2 fresh > 4 blocks
    hits, _ = kv.get_computed_blocks(bigger)
    assert hits == (0, 1, 2)
    assert not kv.allocate_slots(bigger, 5, cached_blocks=hits)
    assert kv.block_ids("b") == ()
    assert kv.pool.free_block_ids() == before
    assert all(kv.pool.ref_count(i) == 0 for i in range(4))
    # The hits sitting in the free queue count against it: 3 revived + 1 fresh fits exactly.
    fits = make_request("c", list(range(13)))
    hits, num_hit = kv.get_computed_blocks(fits)
    assert kv.allocate_slots(fits, 1, cached_blocks=hits)
    assert kv.block_ids("c") == (0, 1, 2, 3)


def test_growing_a_request_allocates_one_block_at_a_time():
    kv = manager(num_blocks=3, block_size=4)
    req = make_request("a", [1, 2, 3])
    admit(kv, req)
    assert kv.block_ids("a") == (0,)
    req.output_token_ids.append(4)
    assert kv.allocate_slots(req, 1)
    assert kv.block_ids("a") == (0,)
    req.num_computed_tokens += 1
    req.output_token_ids.append(5)
    assert kv.allocate_slots(req, 1)
    assert kv.block_ids("a") == (0, 1)


def test_waiting_request_waits_for_in_flight_blocks_then_hits():
    kv = manager()
    first = make_request("a", PREFIX + [1])
    hits, _ = kv.get_computed_blocks(first)
    assert kv.allocate_slots(first, first.num_tokens, cached_blocks=hits)
    sibling = make_request("b", PREFIX + [1])
    _, num_hit = kv.get_computed_blocks(sibling)
    assert kv.waits_for_in_flight(sibling, num_hit)
    first.num_computed_tokens = first.num_tokens
    kv.cache_full_blocks(first)
    hits, num_hit = kv.get_computed_blocks(sibling)
    assert (hits, num_hit) == ((0, 1, 2), 48)
    assert not kv.waits_for_in_flight(sibling, num_hit)


def test_freeing_a_request_releases_its_in_flight_blocks():
    kv = manager()
    first = make_request("a", PREFIX + [1])
    assert kv.allocate_slots(first, first.num_tokens)
    sibling = make_request("b", PREFIX + [1])
    assert kv.waits_for_in_flight(sibling, 0)
    kv.free(first)
    assert not kv.waits_for_in_flight(sibling, 0)


def test_caching_disabled_means_no_hits():
    kv = manager(caching=False)
    admit(kv, make_request("a", PREFIX + [1]))
    assert kv.get_computed_blocks(make_request("b", PREFIX + [1])) == ((), 0)
    assert kv.pool.num_cached_blocks == 0
