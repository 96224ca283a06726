"""Sampler fast paths: no copy of the logits unless something edits them, the batched
logit-bias tensors reused across steps without going stale, and whole-row work in blocks
through one reused scratch buffer."""
from __future__ import annotations

import pytest
import torch

from textmill import kernels
from textmill.runner.sampler import Sampler
from textmill.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0)


def test_unedited_logits_are_not_copied_and_edited_ones_are_left_intact():
    s = Sampler(8)
    s.add_request("plain", SamplingParams(**GREEDY))
    s.add_request("biased", SamplingParams(**GREEDY, logit_bias=((3, 100.0),)))
    logits = torch.randn(2, 8)
    before = logits.clone()
    out = s.sample(logits, ["plain", "biased"])
    assert out.token_ids.tolist() == [int(before[0].argmax()), 3]
    assert torch.equal(logits, before)


def test_in_place_edits_the_callers_logits_unless_a_row_reads_them_raw():
    s = Sampler(8)
    s.add_request("quiet", SamplingParams(**GREEDY))
    s.add_request("biased", SamplingParams(**GREEDY, logit_bias=((3, 100.0),)))
    s.add_request("reader", SamplingParams(**GREEDY, logprobs=1))
    logits = torch.randn(2, 8)
    before = logits.clone()
    assert s.sample(logits, ["quiet", "biased"], in_place=True).token_ids.tolist() == [int(before[0].argmax()), 3]
    assert logits[1, 3] == before[1, 3] + 100.0 and torch.equal(logits[0], before[0])  # no copy made
    logits = before.clone()
    out = s.sample(logits, ["reader", "biased"], in_place=True)
    assert out.token_ids.tolist() == [int(before[0].argmax()), 3]
    assert torch.equal(logits, before)  # "reader"'s logprobs are raw: the bias went to a copy
    assert out.logprobs[0] == torch.log_softmax(before[0], -1).max()


def test_bias_follows_the_batch_order_and_request_id_reuse():
    s = Sampler(8)
    s.add_request("a", SamplingParams(**GREEDY, logit_bias=((1, 100.0),)))
    s.add_request("b", SamplingParams(**GREEDY, logit_bias=((6, 100.0),)))
    logits = torch.zeros(2, 8)
    for _ in range(2):  # the second step reuses the cached bias tensors
        assert s.sample(logits, ["a", "b"]).token_ids.tolist() == [1, 6]
    assert s.sample(logits, ["b", "a"]).token_ids.tolist() == [6, 1]
    assert s.sample(logits[:1], ["b"]).token_ids.tolist() == [6]
    s.remove_request("a")
    s.add_request("a", SamplingParams(**GREEDY, logit_bias=((4, 100.0),)))  # same id, new bias
    assert s.sample(logits, ["a", "b"]).token_ids.tolist() == [4, 6]
    s.remove_request("a")
    s.add_request("a", SamplingParams(**GREEDY))
    assert s.sample(logits, ["a", "b"]).token_ids.tolist() == [0, 6]


def test_greedy_ties_pick_the_first_maximum():
    s = Sampler(16)
    s.add_request("t", SamplingParams(**GREEDY))
    logits = torch.zeros(1, 16)
    logits[0, [5, 9, 12]] = 2.0
    assert s.sample(logits, ["t"]).token_ids.tolist() == [5]


def test_batches_beyond_one_scratch_block_match_rows_alone():
    """150 rows go through the scratch buffer in blocks of 64: every row's token and logprobs
    are what it gets alone, and the logprobs are log_softmax's, bit for bit."""
    vocab, n = 40, 150
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(3)) * 3
    kinds = [SamplingParams(**GREEDY, logprobs=2), SamplingParams(temperature=0.7, seed=1, logprobs=1),
             SamplingParams(temperature=1.0, top_p=0.8, seed=2, logprobs=3),
             SamplingParams(temperature=1.3, top_k=4, seed=3)]
    params = {f"r{i}": kinds[i % len(kinds)] for i in range(n)}
    batch = Sampler(vocab)
    for rid, p in params.items():
        batch.add_request(rid, p)
    out = batch.sample(logits, list(params))
    raw = torch.log_softmax(logits, -1)
    asked = torch.tensor([p.logprobs is not None for p in params.values()])  # the others get NaN
    assert torch.equal(out.logprobs[asked], raw.gather(1, out.token_ids[:, None])[:, 0][asked])
    assert torch.isnan(out.logprobs[~asked]).all()
    assert torch.equal(out.top_logprobs[asked], raw.topk(3).values[asked])
    assert out.top_ids[asked].tolist() == raw.topk(3).indices[asked].tolist()
    for i, (rid, p) in enumerate(params.items()):
        alone = Sampler(vocab)
        alone.add_request(rid, p)
        assert alone.sample(logits[i : i + 1], [rid]).token_ids.tolist() == out.token_ids[i : i + 1].tolist()
    prompt = batch.prompt_logprobs(logits, torch.arange(n) % vocab, 2)
    assert torch.equal(prompt.logprobs, raw[torch.arange(n), torch.arange(n) % vocab])
    assert torch.equal(prompt.top_logprobs, raw.topk(2).values)
    empty = batch.prompt_logprobs(logits[:0], torch.zeros(0, dtype=torch.int64), 2)
    assert empty.logprobs.shape == (0,) and empty.top_ids.shape == (0, 2)


def test_log_softmax_only_for_rows_that_read_it():
    """Plain rows get NaN and no alternatives; rows with logprobs or best_of ranking get the
    numbers they would get alone, so a batch's mix changes nothing for them."""
    s = Sampler(50)
    s.add_request("plain", SamplingParams(**GREEDY))
    s.add_request("lp", SamplingParams(**GREEDY, logprobs=3))
    s.add_request("ranked", SamplingParams(temperature=0.7, seed=5, rank_by_logprob=True))
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = s.sample(logits, ["plain", "lp", "ranked"])
    assert torch.isnan(out.logprobs[0]) and not torch.isnan(out.logprobs[1:]).any()
    full = torch.log_softmax(logits, dim=-1)
    assert torch.equal(out.logprobs[1:], full[[1, 2], out.token_ids[1:]])
    assert out.top_ids.shape == (3, 3) and torch.equal(out.top_ids[1], torch.topk(full[1], 3).indices)
    alone = Sampler(50)
    alone.add_request("lp", SamplingParams(**GREEDY, logprobs=3))
    solo = alone.sample(logits[1:2], ["lp"])
    assert torch.equal(solo.logprobs, out.logprobs[1:2]) and torch.equal(solo.top_logprobs, out.top_logprobs[1:2])
    none = Sampler(50)
    none.add_request("plain", SamplingParams(**GREEDY))
    only = none.sample(logits[:1], ["plain"])
    assert torch.isnan(only.logprobs).all() and only.top_ids.shape == (1, 0)


@pytest.mark.parametrize("path", ["numpy", "kernels"])
def test_greedy_tokens_pick_the_first_maximum_and_nan_as_torch_max_does(path):
    from textmill.runner.sampling_ops import greedy_tokens

    ops = None
    if path == "kernels":
        ops = kernels.load("layer")
        assert ops is not None, "the C++ kernels did not build"
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [nan, 5.0, nan, 1.0], [1.0, nan, 7.0, 7.0], [-inf] * 4,
                      [2.0, inf, inf, 1.0]])
    assert greedy_tokens(x, ops).tolist() == torch.max(x, dim=-1).indices.tolist() == [1, 0, 1, 0, 1]
    wide = torch.randn(5, 70_001, generator=torch.Generator().manual_seed(1)).round(decimals=1)  # many ties
    assert torch.equal(greedy_tokens(wide, ops), torch.max(wide, dim=-1).indices)
    assert greedy_tokens(wide[:, ::2], ops).dtype == torch.int64  # a strided view works too
    assert torch.equal(greedy_tokens(wide[:, ::2], ops), torch.max(wide[:, ::2], dim=-1).indices)
    # The kernels cut rows into chunks of 16,384 over the threads: ties and NaNs at and across
    # chunk and vector edges, a row of one value, rows shorter than a vector.
    g = torch.Generator().manual_seed(2)
    for width in (1, 15, 16, 17, 16_383, 16_384, 16_385, 49_152, 262_144):
        rows = torch.randn(6, width, generator=g).round(decimals=1)
        rows[1] = rows[1].max()  # every value the maximum: index 0
        if width > 20:
            rows[2, [width // 2, width - 1]] = nan  # first NaN wins, wherever the maximum is
            rows[3, [16_383 % width, 16_384 % width]] = 99.0  # a tie across a chunk edge
            rows[4, -1] = nan  # a NaN in the last (tail) values only
        rows[5] = -inf
        assert torch.equal(greedy_tokens(rows, ops), torch.max(rows, dim=-1).indices), width
