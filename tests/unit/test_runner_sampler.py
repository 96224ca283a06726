"""Sampler fast paths: no copy of the logits unless something edits them, and the batched
logit-bias tensors reused across steps without going stale."""
from __future__ import annotations

import torch

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
