"""vLLM's sampling extras: top_k, min_p, repetition_penalty, min_tokens."""
from __future__ import annotations

import torch

from textmill.runner.sampler import Sampler, top_k_mask, truncate
from textmill.sampling_params import InvalidParam, SamplingParams

V = 32


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_k_one_and_min_p_one_are_greedy():
    logits = _logits(8)
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, min_p=1.0)):
        sampler = Sampler(V)
        ids = [f"r{i}" for i in range(8)]
        for i, rid in enumerate(ids):
            sampler.add_request(rid, SamplingParams(**{**params.__dict__, "seed": i}))
        assert sampler.sample(logits, ids).token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_mask_keeps_k_per_row():
    probs = torch.softmax(_logits(3), -1)
    mask = top_k_mask(probs, [1, 5, V])
    assert mask.sum(-1).tolist() == [1, 5, V]
    assert bool(mask[1, probs[1].topk(5).indices].all())


def test_samples_stay_inside_top_k():
    logits = _logits(1, seed=3)
    allowed = set(logits[0].topk(3).indices.tolist())
    sampler = Sampler(V)
    sampler.add_request("r", SamplingParams(temperature=2.0, top_k=3, seed=1))
    seen = {int(sampler.sample(logits, ["r"]).token_ids[0]) for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_repetition_penalty_formula_over_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5] + [-5.0] * (V - 4)])
    sampler = Sampler(V)
    # Token 0 and 1 are in the prompt: 2.0 / 4 = 0.5 and -2.0 * 4 = -8; token 2 (1.0) now wins.
    sampler.add_request("r", SamplingParams(temperature=0, repetition_penalty=4.0), prompt_token_ids=(0, 1))
    assert int(sampler.sample(logits, ["r"]).token_ids[0]) == 2
    # Now 2 was generated too: 1.0 / 4 = 0.25 < 0.5 (token 3) -> 3 and 0 tie at 0.5; argmax takes 0.
    assert int(sampler.sample(logits, ["r"]).token_ids[0]) in (0, 3)


def test_min_tokens_bans_stop_ids_until_reached():
    logits = torch.full((1, V), -3.0)
    logits[0, 7] = 10.0  # the stop token is by far the most likely
    sampler = Sampler(V)
    sampler.add_request("r", SamplingParams(temperature=0, max_tokens=5, min_tokens=2, stop_token_ids=(7,)))
    tokens = [int(sampler.sample(logits, ["r"]).token_ids[0]) for _ in range(3)]
    assert tokens[0] != 7 and tokens[1] != 7 and tokens[2] == 7


def test_logprobs_ignore_the_extras():
    logits = _logits(1)
    sampler = Sampler(V)
    sampler.add_request("r", SamplingParams(temperature=1.0, top_k=2, min_p=0.5, repetition_penalty=1.5,
                                            logprobs=2), prompt_token_ids=(1, 2, 3))
    out = sampler.sample(logits, ["r"])
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])


def test_invalid_extras():
    for kwargs, param in (({"top_k": 0}, "top_k"), ({"min_p": 1.5}, "min_p"),
                          ({"repetition_penalty": 0.0}, "repetition_penalty"),
                          ({"max_tokens": 2, "min_tokens": 3}, "min_tokens")):
        try:
            SamplingParams(**kwargs)
        except InvalidParam as exc:
            assert exc.param == param
        else:
            raise AssertionError(kwargs)


def _full_vocab_masks(probs: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """The whole-row order the sampler documents: top-k (ties kept) -> top-p -> min-p."""
    probs = probs * top_k_mask(probs, top_k)
    ranked, order = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(ranked, -1) - ranked < torch.tensor(top_p)[:, None]
    keep[:, 0] = True
    probs = probs * torch.zeros_like(keep).scatter_(1, order, keep)
    return probs * (probs >= torch.tensor(min_p)[:, None] * probs.max(-1, keepdim=True).values)


def test_candidates_make_the_full_vocabulary_decisions():
    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(4)) * 2
    logits[4, :300] = 20.0  # 300 tied tokens on top: top-k keeps all of them
    probs = torch.softmax(logits, -1)
    top_k, top_p, min_p = [None, 5, 100, None, 2], [0.9, 1.0, 0.8, 1.0, 1.0], [0.0, 0.0, 0.05, 0.01, 0.0]
    kept = torch.zeros_like(probs)
    groups = truncate(probs, top_k, top_p, min_p)
    for group in groups:
        assert group.keep.shape[1] == 3000 or not group.keep[:, -1].any()  # decided rows only
        rows = torch.zeros_like(kept[group.rows]).scatter_(1, group.ids, group.values * group.keep)
        kept.index_copy_(0, group.rows, rows)
    assert sorted(torch.cat([g.rows for g in groups]).tolist()) == list(range(5))
    assert len(groups) > 1  # the tied row and the min-p row needed more than 100 candidates
    assert torch.equal(kept, _full_vocab_masks(probs, [k or 3000 for k in top_k], top_p, min_p))
    assert int((kept[4] > 0).sum()) == 300
