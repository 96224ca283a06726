"""Paged attention over a mixed batch equals dense causal attention, sequence by sequence."""
from __future__ import annotations

import math
import random

import pytest
import torch

from textmill.config import CacheConfig, ModelConfig
from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.runner.batch import build_batch
from textmill.runner.block_tables import BlockTables
from textmill.runner.kv_cache import KVCache, PagedAttention

HQ, HKV, D, BLOCK = 4, 2, 8, 4



def one_step_batch(scheduled: SchedulerOutput):
    """The batch of a step whose requests are all new (each chunk sends its whole table)."""
    tables = BlockTables(BLOCK)
    tables.update(scheduled)
    return build_batch(scheduled, tables, "cpu")

def _configs(num_layers: int = 2, num_blocks: int = 40):
    mc = ModelConfig(
        architecture="toy", vocab_size=16, hidden_size=HQ * D, intermediate_size=8,
        num_layers=num_layers, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
        max_position_embeddings=256,
    )
    return mc, CacheConfig(block_size=BLOCK, num_blocks=num_blocks)


def _dense_attention(q, k, v, q_positions, scale, window=None, softcap=None):
    """Reference, one sequence: q (T, Hq, D) at q_positions over k/v (L, Hkv, D)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for t, pos in enumerate(q_positions):
        for h in range(q.shape[1]):
            keys = k[: pos + 1, h // group]  # (pos+1, D)
            scores = keys @ q[t, h] * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            if window is not None:
                too_far = pos - torch.arange(pos + 1) >= window
                scores = scores.masked_fill(too_far, float("-inf"))
            out[t, h] = torch.softmax(scores, dim=0) @ v[: pos + 1, h // group]
    return out


# (already computed tokens, tokens in this step's chunk)
MIXED = [
    (5, 6),  # mid-prefill chunk after a chunk in cache
    (13, 1),  # decode
    (0, 7),  # first chunk of a fresh prompt
    (2, 1),  # short decode
    (8, 4),  # last chunk of a prompt, block aligned start
]


def _setup(seqs, num_layers=2, seed=0):
    """Fill the cache with each sequence's earlier tokens; return the step's inputs."""
    torch.manual_seed(seed)
    mc, cc = _configs(num_layers)
    cache = KVCache(mc, cc)
    free = list(range(cc.num_blocks))
    random.Random(seed).shuffle(free)  # non-contiguous, out-of-order block ids
    chunks, full = [], []
    for i, (done, n) in enumerate(seqs):
        total = done + n
        blocks = tuple(free.pop() for _ in range(math.ceil(total / BLOCK)))
        kv = [(torch.randn(total, HKV, D), torch.randn(total, HKV, D)) for _ in range(num_layers)]
        slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(done)], dtype=torch.long)
        for layer, (k, v) in enumerate(kv):
            cache.k[layer][slots] = k[:done]
            cache.v[layer][slots] = v[:done]
        q = torch.randn(n, HQ, D)
        chunks.append(ScheduledChunk(f"r{i}", tuple(range(n)), done, blocks, sample=True))
        full.append((done, q, kv, blocks))
    batch = one_step_batch(SchedulerOutput((), tuple(chunks)))
    # The flat batch holds the chunks in batch.order (decode chunks first).
    return cache, batch, [full[i] for i in batch.order]


def _flat(full, layer):
    q = torch.cat([f[1] for f in full])
    k = torch.cat([f[2][layer][0][f[0]:] for f in full])
    v = torch.cat([f[2][layer][1][f[0]:] for f in full])
    return q, k, v


@pytest.mark.parametrize("window", [None, 3])
def test_mixed_batch_matches_dense(window):
    cache, batch, full = _setup(MIXED)
    ctx = PagedAttention(cache, batch.attn)
    scale = D**-0.5
    for layer in range(2):
        q, k, v = _flat(full, layer)
        out = ctx.attend(layer, q, k, v, scale=scale, sliding_window=window)
        assert out.shape == q.shape
        expected = torch.cat([
            _dense_attention(fq, kv[layer][0], kv[layer][1], range(done, done + len(fq)), scale, window)
            for done, fq, kv, _ in full
        ])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_layers_with_different_windows_in_one_step():
    """Gemma-style: sliding and global layers share one context and its index tensors."""
    cache, batch, full = _setup(MIXED, num_layers=2, seed=3)
    ctx = PagedAttention(cache, batch.attn)
    for layer, window in [(0, 2), (1, None)]:
        q, k, v = _flat(full, layer)
        out = ctx.attend(layer, q, k, v, scale=0.3, sliding_window=window)
        expected = torch.cat([
            _dense_attention(fq, kv[layer][0], kv[layer][1], range(done, done + len(fq)), 0.3, window)
            for done, fq, kv, _ in full
        ])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_softcap_matches_dense():
    cache, batch, full = _setup(MIXED, num_layers=1, seed=1)
    ctx = PagedAttention(cache, batch.attn)
    q, k, v = _flat(full, 0)
    q = q * 4  # large scores, so the cap matters
    out = ctx.attend(0, q, k, v, scale=0.5, sliding_window=4, logit_softcap=5.0)
    expected = torch.cat([
        _dense_attention(q[off : off + len(fq)], kv[0][0], kv[0][1], range(done, done + len(fq)), 0.5, 4, 5.0)
        for off, (done, fq, kv, _) in zip(_offsets(full), full)
    ])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    uncapped = ctx.attend(0, q, k, v, scale=0.5, sliding_window=4)
    assert not torch.allclose(out, uncapped, atol=1e-3)


def _offsets(full):
    offsets, total = [], 0
    for _, fq, _, _ in full:
        offsets.append(total)
        total += len(fq)
    return offsets


def test_new_tokens_are_written_to_their_slots():
    cache, batch, full = _setup(MIXED, num_layers=1, seed=2)
    q, k, v = _flat(full, 0)
    PagedAttention(cache, batch.attn).attend(0, q, k, v, scale=1.0)
    for done, fq, kv, blocks in full:
        for i in range(len(fq)):
            p = done + i
            slot = blocks[p // BLOCK] * BLOCK + p % BLOCK
            torch.testing.assert_close(cache.k[0][slot], kv[0][0][p])
            torch.testing.assert_close(cache.v[0][slot], kv[0][1][p])


def test_bfloat16_cache_close_to_float32():
    cache, batch, full = _setup(MIXED, num_layers=1, seed=4)
    mc, cc = _configs(1)
    cache16 = KVCache(mc, cc, dtype=torch.bfloat16)
    cache16.k[0].copy_(cache.k[0])
    cache16.v[0].copy_(cache.v[0])
    q, k, v = _flat(full, 0)
    out32 = PagedAttention(cache, batch.attn).attend(0, q, k, v, scale=D**-0.5)
    out16 = PagedAttention(cache16, batch.attn).attend(0, q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=D**-0.5)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=5e-2, rtol=5e-2)


def test_batch_metadata():
    _, batch, _ = _setup(MIXED, num_layers=1)
    m = batch.attn
    assert m.num_seqs == len(MIXED)
    assert m.max_query_len == max(n for _, n in MIXED)
    assert m.max_context_len == max(d + n for d, n in MIXED)
    # decode chunks first, then the others, each in the scheduler's order
    assert batch.order == (1, 3, 0, 2, 4)
    ordered = [MIXED[i] for i in batch.order]
    assert batch.positions.tolist() == [p for d, n in ordered for p in range(d, d + n)]
    assert [(g.num_seqs, g.max_query_len) for g in m.groups] == [(2, 1), (3, 7)]
    # every new token has its own slot
    assert len(set(m.slot_mapping.tolist())) == sum(n for _, n in MIXED)
    # only chunks with sample=True get a logits row: the last token of each
    ends = torch.tensor([n for _, n in ordered]).cumsum(0) - 1
    assert batch.logits_rows.tolist() == ends.tolist()


def test_kv_bytes_per_block():
    mc, cc = _configs(num_layers=3)
    assert KVCache.bytes_per_block(mc, cc, torch.bfloat16) == 2 * 3 * BLOCK * HKV * D * 2
    assert KVCache.bytes_per_block(mc, cc, torch.float32) == 2 * 3 * BLOCK * HKV * D * 4


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_16bit_pool_with_float32_activations(kv_dtype):
    """The pool's dtype is its own (kv_dtype): a float32 model stores k and v rounded to 16
    bits and attends over the widened values, returning float32."""
    cache, batch, full = _setup(MIXED, num_layers=2, seed=6)
    mc, cc = _configs(2)
    cache16 = KVCache(mc, cc, dtype=torch.float32, kv_dtype=kv_dtype)
    assert cache16.dtype == kv_dtype and all(kv.dtype == kv_dtype for kv in cache16.kv)
    assert cache16.k[0].dtype == kv_dtype and cache16.k[0].data_ptr() == cache16.kv[0].data_ptr()
    for layer in range(2):
        cache16.kv[layer].copy_(cache.kv[layer])  # the earlier tokens, rounded
    ctx = PagedAttention(cache16, batch.attn)
    for layer in range(2):
        q, k, v = _flat(full, layer)
        out = ctx.attend(layer, q, k, v, scale=D**-0.5)
        assert out.dtype == torch.float32
        # Dense attention over the same rounded keys and values: float32 rounding apart.
        expected = torch.cat([
            _dense_attention(fq, kv[layer][0].to(kv_dtype).float(), kv[layer][1].to(kv_dtype).float(),
                             range(done, done + len(fq)), D**-0.5)
            for done, fq, kv, _ in full
        ])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The step's own tokens were written rounded, like the rest.
    for done, fq, kv, blocks in full:
        for i in range(len(fq)):
            p = done + i
            slot = blocks[p // BLOCK] * BLOCK + p % BLOCK
            assert torch.equal(cache16.k[1][slot], kv[1][0][p].to(kv_dtype))
            assert torch.equal(cache16.v[1][slot], kv[1][1][p].to(kv_dtype))


def test_kv_dtype_defaults_to_the_activation_dtype():
    mc, cc = _configs(1)
    assert KVCache(mc, cc).dtype == torch.float32
    assert KVCache(mc, cc, dtype=torch.bfloat16).kv[0].dtype == torch.bfloat16
    assert KVCache(mc, cc, dtype=torch.bfloat16, kv_dtype=torch.float16).kv[0].dtype == torch.float16


def test_kv_bytes_per_block_counts_the_kv_dtype():
    mc, cc = _configs(num_layers=3)
    per_elem = 2 * 3 * BLOCK * HKV * D
    assert KVCache.bytes_per_block(mc, cc, torch.float32, kv_dtype=torch.float16) == per_elem * 2
    assert KVCache.bytes_per_block(mc, cc, torch.float32, kv_dtype=torch.bfloat16) == per_elem * 2
    assert KVCache.bytes_per_block(mc, cc, torch.float32, kv_dtype=None) == per_elem * 4
    cache = KVCache(mc, cc, kv_dtype=torch.float16)
    assert sum(kv.numel() * kv.element_size() for kv in cache.kv) == per_elem * 2 * cc.num_blocks


def _gemma4_config(**kw) -> ModelConfig:
    """Gemma 4's layout: every third layer global (wider heads, one KV head), the last two
    layers sharing the cache of the last earlier layer of their kind."""
    fields = dict(architecture="gemma4", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=6,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                  sliding_window=8, sliding_window_pattern=3, global_head_dim=32, global_kv_heads=1,
                  kv_shared_layers=2)
    return ModelConfig(**(fields | kw))


def test_shared_layers_read_the_last_earlier_layer_of_their_kind():
    mc = _gemma4_config()
    assert [mc.is_sliding(i) for i in range(6)] == [True, True, False, True, True, False]
    assert [mc.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 3, 2]
    assert [mc.layer_kv_shape(i) for i in range(6)] == [(2, 16), (2, 16), (1, 32), (2, 16), (2, 16), (1, 32)]
    assert [_configs(3)[0].kv_source(i) for i in range(3)] == [0, 1, 2]  # no sharing: every layer its own
    with pytest.raises(ValueError, match="no"):
        _gemma4_config(sliding_window_pattern=None, kv_shared_layers=6).kv_source(0)


def test_pools_per_layer_shape_and_shared_layers_alias_their_source():
    """Each layer's pool has its own heads and width; a shared layer's pool is its source's own
    tensor (no memory of its own), and the block's bytes count only the pools that exist."""
    mc, cc = _gemma4_config(), CacheConfig(block_size=BLOCK, num_blocks=5)
    cache = KVCache(mc, cc, kv_dtype=torch.float16)
    assert [tuple(kv.shape[2:]) for kv in cache.kv] == [(2, 16), (2, 16), (1, 32), (2, 16), (2, 16), (1, 32)]
    assert cache.kv[4] is cache.kv[3] and cache.kv[5] is cache.kv[2] and cache.kv[3] is not cache.kv[1]
    per_token = 2 * (3 * 2 * 16 + 1 * 32) * 2  # K and V, three sliding pools and one global, 2 bytes
    assert KVCache.bytes_per_block(mc, cc, torch.float32, kv_dtype=torch.float16) == BLOCK * per_token
    owned = {kv.data_ptr(): kv.numel() * kv.element_size() for kv in cache.kv}
    assert sum(owned.values()) == BLOCK * per_token * cc.num_blocks


def test_a_shared_layer_attends_over_what_its_source_wrote_this_step():
    """k=None: the context writes nothing and reads the source layer's keys and values, this
    step's included, the same as the source layer's own call."""
    cache, batch, full = _setup(MIXED, num_layers=2, seed=7)
    ctx = PagedAttention(cache, batch.attn)
    q, k, v = _flat(full, 1)
    own = ctx.attend(1, q, k, v, scale=D**-0.5)
    before = cache.kv[1].clone()
    shared = ctx.attend(1, q, None, None, scale=D**-0.5)
    assert torch.equal(cache.kv[1], before)
    torch.testing.assert_close(shared, own, rtol=0, atol=0)


def test_rows_as_one_token_queries_give_the_full_steps_rows():
    """for_rows: any rows of a mixed step (decodes, prompt chunks; in any order), each a one-token
    query at its own position over its own sequence, attend as they did in the whole step."""
    cache, batch, full = _setup(MIXED, num_layers=1, seed=8)
    ctx = PagedAttention(cache, batch.attn)
    q, k, v = _flat(full, 0)
    whole = ctx.attend(0, q, k, v, scale=D**-0.5, sliding_window=3)
    rows = torch.tensor([q.shape[0] - 1, 0, 2, q.shape[0] // 2])
    part = ctx.for_rows(rows).attend(0, q.index_select(0, rows), None, None, scale=D**-0.5, sliding_window=3)
    torch.testing.assert_close(part, whole.index_select(0, rows), rtol=0, atol=1e-6)
