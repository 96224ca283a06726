"""The cheap attention paths: decode-only steps (no query padding), steps that need no mask
and a lone prefill from position 0 (plain causal) give the same results as dense attention."""
from __future__ import annotations

import pytest
import torch

from tests.unit.test_paged_attention import BLOCK, D, _dense_attention, _flat, _setup, one_step_batch
from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.runner.kv_cache import PagedAttention, build_mask

CASES = {
    "decode, equal contexts": [(9, 1), (9, 1), (9, 1)],  # no mask at all
    "decode, ragged contexts": [(13, 1), (2, 1), (7, 1)],  # key-length mask only
    "lone prefill from 0": [(0, 9)],  # is_causal
    "lone prefill after a cached prefix": [(6, 5)],  # needs the offset mask
    "lone decode": [(11, 1)],
}
EXPECTED_MASK = {
    "decode, equal contexts": None,
    "decode, ragged contexts": torch.Tensor,
    "lone prefill from 0": "causal",
    "lone prefill after a cached prefix": torch.Tensor,
    "lone decode": None,
}


def _run(seqs, window=None, softcap=None, seed=0, grouped=False):
    cache, batch, full = _setup(seqs, num_layers=1, seed=seed)
    ctx = PagedAttention(cache, batch.attn, grouped_decode=grouped)
    q, k, v = _flat(full, 0)
    out = ctx.attend(0, q, k, v, scale=D**-0.5, sliding_window=window, logit_softcap=softcap)
    expected = torch.cat([
        _dense_attention(fq, kv[0][0], kv[0][1], range(done, done + len(fq)), D**-0.5, window, softcap)
        for done, fq, kv, _ in full
    ])
    return ctx, out, expected


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_paths_match_dense(name, grouped):
    ctx, out, expected = _run(CASES[name], grouped=grouped)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    mask = ctx._masks[(0, None, False)]
    want = EXPECTED_MASK[name]
    if want is torch.Tensor:
        assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    else:
        assert mask == want  # None or "causal"


@pytest.mark.parametrize("name", list(CASES))
def test_a_window_shorter_than_the_context_always_gets_a_mask(name):
    ctx, out, expected = _run(CASES[name], window=3, seed=1, grouped=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert isinstance(ctx._masks[(0, 3, False)], torch.Tensor)


def test_softcap_on_a_decode_step():
    _, out, expected = _run(CASES["decode, ragged contexts"], softcap=2.0, seed=2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_build_mask_hides_padding_and_future_keys():
    _, batch, _ = _setup([(3, 2), (0, 3)], num_layers=1)
    (group,) = batch.attn.groups
    mask = build_mask(group, None)[:, 0]  # (B, Tmax, Lmax)
    assert mask.shape == (2, 3, 5)
    # The padded third query row of sequence 0 repeats its last real row: never empty.
    assert mask[0].tolist() == [[True] * 4 + [False], [True] * 5, [True] * 5]
    assert mask[1].tolist() == [[True] + [False] * 4, [True] * 2 + [False] * 3, [True] * 3 + [False] * 2]


def test_a_mixed_step_pads_prefill_queries_only_within_their_group():
    cache, batch, full = _setup([(20, 1), (0, 9), (7, 1), (3, 4)], num_layers=1, seed=9)
    decode, prefill = batch.attn.groups
    assert (decode.num_seqs, decode.max_query_len, decode.token_start) == (2, 1, 0)
    assert (prefill.num_seqs, prefill.max_query_len, prefill.token_start, prefill.num_tokens) == (2, 9, 2, 13)
    q, k, v = _flat(full, 0)
    out = PagedAttention(cache, batch.attn).attend(0, q, k, v, scale=0.3)
    expected = torch.cat([_dense_attention(fq, kv[0][0], kv[0][1], range(d, d + len(fq)), 0.3)
                          for d, fq, kv, _ in full])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_block_tables_that_run_ahead_of_the_tokens():
    """Blocks past the context (allocated ahead) are never attended to (and the table is
    cut to the blocks the longest context needs)."""
    cache, batch, full = _setup([(9, 1), (3, 4)], num_layers=1, seed=5)
    spare = sorted(set(range(40)) - {b for f in full for b in f[3]})[:3]
    chunks = [ScheduledChunk(f"r{i}", tuple(range(len(fq))), done, blocks + tuple(spare), sample=True)
              for i, (done, fq, _, blocks) in enumerate(full)]
    ahead = one_step_batch(SchedulerOutput((), tuple(chunks)))
    # per group (decode, then prefill): only the blocks the group's longest context needs
    assert [g.block_table.shape for g in ahead.attn.groups] == [(1, 3), (1, 2)]
    assert [g.block_table.shape for g in batch.attn.groups] == [(1, 3), (1, 2)]
    q, k, v = _flat(full, 0)
    for b in spare:  # keys that would win every softmax, values that would show
        cache.k[0][b * BLOCK:(b + 1) * BLOCK] = 50.0
        cache.v[0][b * BLOCK:(b + 1) * BLOCK] = 1e6
    out = PagedAttention(cache, ahead.attn).attend(0, q, k, v, scale=0.5)
    expected = torch.cat([_dense_attention(fq, kv[0][0], kv[0][1], range(d, d + len(fq)), 0.5)
                          for d, fq, kv, _ in full])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("done,n", [(10, 1), (0, 7), (5, 6)])
def test_a_lone_sequence_on_consecutive_blocks_reads_the_cache_in_place(done, n):
    from tests.unit.test_paged_attention import HKV, HQ, _configs
    from textmill.runner.kv_cache import KVCache

    torch.manual_seed(7)
    mc, cc = _configs(num_layers=1)
    cache = KVCache(mc, cc)
    total = done + n
    blocks = tuple(range(3, 3 + -(-total // BLOCK))) + (30,)  # consecutive, then one spare
    k, v = torch.randn(total, HKV, D), torch.randn(total, HKV, D)
    cache.k[0][3 * BLOCK : 3 * BLOCK + done] = k[:done]
    cache.v[0][3 * BLOCK : 3 * BLOCK + done] = v[:done]
    chunk = ScheduledChunk("r", tuple(range(n)), done, blocks, sample=True)
    batch = one_step_batch(SchedulerOutput((), (chunk,)))
    assert batch.attn.groups[0].contiguous_from == 3 * BLOCK
    q = torch.randn(n, HQ, D)
    out = PagedAttention(cache, batch.attn).attend(0, q, k[done:], v[done:], scale=0.4)
    torch.testing.assert_close(out, _dense_attention(q, k, v, range(done, total), 0.4), atol=1e-5, rtol=1e-5)


def test_scattered_or_batched_blocks_are_gathered():
    a = ScheduledChunk("a", (1,), 4, (5, 9), sample=True)
    b = ScheduledChunk("b", (1,), 4, (6, 7), sample=True)
    c = ScheduledChunk("c", (1,), 4, (8, 9), sample=True)

    def first(*chunks):
        return one_step_batch(SchedulerOutput((), chunks)).attn.groups[0].contiguous_from

    assert first(a) is None
    assert first(b) == 6 * BLOCK
    assert first(b, c) is None


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 2.0)])
def test_kernel_and_eager_paths_agree_on_a_16bit_pool(kv_dtype, window, softcap):
    """--no-kernels and the C++ kernels on one 16-bit pool: the same bits written, the same
    attention to float32 rounding."""
    from tests.unit.test_paged_attention import MIXED, _configs
    from textmill import kernels
    from textmill.runner.kernel_attention import KernelPagedAttention
    from textmill.runner.kv_cache import KVCache

    ops = kernels.load("layer")
    assert ops is not None, "the C++ kernels did not build (see the log)"
    cache, batch, full = _setup(MIXED, num_layers=1, seed=8)
    mc, cc = _configs(1)
    pools = [KVCache(mc, cc, kv_dtype=kv_dtype) for _ in range(2)]
    for pool in pools:
        pool.kv[0].copy_(cache.kv[0])
    q, k, v = _flat(full, 0)
    kw = dict(scale=D**-0.5, sliding_window=window, logit_softcap=softcap)
    eager = PagedAttention(pools[0], batch.attn).attend(0, q, k, v, **kw)
    kernel = KernelPagedAttention(pools[1], batch.attn, ops).attend(0, q, k, v, **kw)
    assert torch.equal(pools[0].kv[0], pools[1].kv[0])
    assert kernel.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(kernel, eager, atol=1e-5, rtol=1e-5)
