"""The sampler: order of operations, seeded per-request draws, logprobs before processing."""
from __future__ import annotations

import math

import torch

from textmill.runner.sampler import Sampler, apply_penalties, sample_inverse_cdf, top_p_mask
from textmill.sampling_params import SamplingParams

V = 50


def _sampler(requests: dict[str, SamplingParams], vocab: int = V) -> Sampler:
    s = Sampler(vocab)
    for rid, params in requests.items():
        s.add_request(rid, params)
    return s


def _logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    ids = [f"g{i}" for i in range(6)]
    s = _sampler({r: SamplingParams(temperature=0.0) for r in ids})
    logits = _logits(6)
    out = s.sample(logits, ids)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_tiny_top_p_is_argmax():
    ids = [f"p{i}" for i in range(8)]
    s = _sampler({r: SamplingParams(temperature=1.5, top_p=1e-6, seed=i) for i, r in enumerate(ids)})
    logits = _logits(8, seed=1)
    for _ in range(3):
        assert s.sample(logits, ids).token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_p_zero_keeps_one_token():
    probs = torch.softmax(_logits(3), -1)
    keep = top_p_mask(probs, torch.tensor([0.0, 1e-9, 1.0]))
    assert keep[:2].sum(-1).tolist() == [1, 1]
    assert keep[0, probs[0].argmax()] and keep[1, probs[1].argmax()]
    assert keep[2].all()


def test_mixed_greedy_and_sampled_rows():
    params = {"g": SamplingParams(temperature=0.0), "s": SamplingParams(temperature=1.0, seed=5),
              "g2": SamplingParams(temperature=0.0, top_p=0.1)}
    s = _sampler(params)
    logits = _logits(3, seed=2)
    logits[1] = 0.0  # flat row: a sampled token is almost never the argmax (index 0)
    seen = set()
    for _ in range(10):
        out = s.sample(logits, ["g", "s", "g2"]).token_ids.tolist()
        assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
        seen.add(out[1])
    assert len(seen) > 3


def test_logit_bias_forces_and_bans():
    logits = _logits(1, seed=3)
    forced = 17 if logits[0].argmax() != 17 else 18
    top = int(logits[0].argmax())
    s = _sampler({
        "force": SamplingParams(temperature=1.0, seed=1, logit_bias=((forced, 100.0),)),
        "ban": SamplingParams(temperature=0.0, logit_bias=((top, -100.0),)),
        "ban_sampled": SamplingParams(temperature=2.0, seed=2, logit_bias=tuple((t, -100.0) for t in range(0, V, 2))),
    })
    for _ in range(20):
        out = s.sample(logits.repeat(3, 1), ["force", "ban", "ban_sampled"]).token_ids.tolist()
        assert out[0] == forced
        assert out[1] == int(torch.topk(logits[0], 2).indices[1])
        assert out[2] % 2 == 1


def test_penalties_formula_on_known_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    out = apply_penalties(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    # logits[j] - c[j] * frequency - (c[j] > 0) * presence
    assert out.tolist() == [[1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, -1.0 - 0.5 - 0.5]]


def test_penalties_count_generated_tokens_across_steps():
    """Greedy with penalties against a pure-Python simulation of the OpenAI formula."""
    vocab, presence, frequency = 6, 0.71, 0.37
    base = [1.03, 2.21, 1.87, 0.52, 1.99, -1.1]
    s = _sampler({"a": SamplingParams(temperature=0.0, presence_penalty=presence,
                                      frequency_penalty=frequency)}, vocab)
    counts = [0] * vocab
    for _ in range(15):
        penalized = [base[j] - counts[j] * frequency - (counts[j] > 0) * presence for j in range(vocab)]
        best, second = sorted(penalized)[-1], sorted(penalized)[-2]
        assert best - second > 1e-3  # no near-ties: the check is exact
        expect = penalized.index(best)
        got = int(s.sample(torch.tensor([base]), ["a"]).token_ids[0])
        assert got == expect
        counts[got] += 1
    assert len([c for c in counts if c]) > 2  # the penalties really moved the choice


def test_penalty_rows_are_recycled_clean():
    s = _sampler({"a": SamplingParams(temperature=0.0, frequency_penalty=2.0)}, 4)
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    assert s.sample(logits, ["a"]).token_ids.tolist() == [0]
    assert s.sample(logits, ["a"]).token_ids.tolist() == [1]  # 3 - 2 < 2
    s.remove_request("a")
    s.add_request("b", SamplingParams(temperature=0.0, frequency_penalty=2.0))
    assert s.sample(logits, ["b"]).token_ids.tolist() == [0]  # a's counts are gone


def test_same_seed_same_samples_whatever_the_batch():
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    row = _logits(1, seed=4)[0] / 3  # a spread-out distribution
    alone = _sampler({"t": target})
    solo = [int(alone.sample(row[None], ["t"]).token_ids[0]) for _ in range(12)]
    others = {f"o{i}": SamplingParams(temperature=0.7 * (i % 3), seed=i, presence_penalty=0.5 * (i % 2))
              for i in range(5)}
    crowded = _sampler({**others, "t": target})
    mixed = []
    for step in range(12):
        ids = list(others)[: 1 + step % 5] + ["t"]
        ids = ids[step % len(ids):] + ids[: step % len(ids)]  # rotate: "t" moves around
        logits = _logits(len(ids), seed=100 + step)
        logits[ids.index("t")] = row
        mixed.append(int(crowded.sample(logits, ids).token_ids[ids.index("t")]))
    assert mixed == solo
    assert len(set(solo)) > 1
    other_seed = _sampler({"t": SamplingParams(temperature=1.0, top_p=0.9, seed=99)})
    assert [int(other_seed.sample(row[None], ["t"]).token_ids[0]) for _ in range(12)] != solo


def _empirical(logits_row: torch.Tensor, params_for, n: int) -> torch.Tensor:
    ids = [f"r{i}" for i in range(n)]
    s = _sampler({r: params_for(i) for i, r in enumerate(ids)}, logits_row.shape[0])
    tokens = s.sample(logits_row.repeat(n, 1), ids).token_ids
    return torch.bincount(tokens, minlength=logits_row.shape[0]).float() / n


def test_temperature_shapes_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    n = 4000
    for temperature in (0.5, 1.0, 2.0):
        freq = _empirical(logits, lambda i: SamplingParams(temperature=temperature, seed=i), n)
        p = torch.softmax(logits / temperature, -1)
        tolerance = 4 * torch.sqrt(p * (1 - p) / n) + 1e-3
        assert ((freq - p).abs() <= tolerance).all(), (temperature, freq, p)


def test_top_p_truncates_and_renormalizes():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    n = 4000
    freq = _empirical(logits, lambda i: SamplingParams(temperature=1.0, top_p=0.7, seed=i), n)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.625) < 4 * math.sqrt(0.625 * 0.375 / n)


def test_inverse_cdf_never_picks_zero_probability():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]] * 4)
    uniform = torch.tensor([0.0, 0.2999, 0.5, 1.0 - 1e-12])
    assert sample_inverse_cdf(probs, uniform).tolist() == [1, 1, 3, 3]


def test_logprobs_are_raw_model_logprobs():
    logits = _logits(3, seed=6)
    raw = torch.log_softmax(logits, -1)
    s = _sampler({
        "hot": SamplingParams(temperature=1.9, seed=3, logprobs=5, logit_bias=((7, 40.0),)),
        "pen": SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0, logprobs=2),
        "none": SamplingParams(temperature=0.3, top_p=0.5, seed=8),
    })
    for _ in range(3):
        out = s.sample(logits, ["hot", "pen", "none"])
        torch.testing.assert_close(out.logprobs[:2], raw.gather(1, out.token_ids[:, None])[:2, 0])
        assert torch.isnan(out.logprobs[2])  # "none" asked for no logprobs: none computed
        assert out.top_ids.shape == (3, 5)
        assert out.top_ids[:2].tolist() == raw.topk(5).indices[:2].tolist()
        torch.testing.assert_close(out.top_logprobs[:2], raw.topk(5).values[:2])
    assert out.token_ids[0] == 7  # the bias chose the token, the logprob stayed raw


def test_prompt_logprobs():
    logits = _logits(4, seed=7)
    raw = torch.log_softmax(logits, -1)
    targets = torch.tensor([3, 0, 49, 10])
    out = Sampler(V).prompt_logprobs(logits, targets, 2)
    torch.testing.assert_close(out.logprobs, raw[torch.arange(4), targets])
    assert out.top_ids.tolist() == raw.topk(2).indices.tolist()
    assert Sampler(V).prompt_logprobs(logits, targets, 0).top_ids.shape == (4, 0)


# ---------------------------------------------------------------- top-p without a full sort
def _sort_top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The sort-based nucleus the sampler used before candidates (the reference)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_above < top_p[:, None]
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted) | (top_p[:, None] >= 1.0)


def _ranked_rows(vocab: int = 262_144) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Logits with a known descending order, so that a vocabulary of 262,144 needs no sort in
    the reference: -> ({kind: logits (V,)}, order (V,) the token ids from most to least likely).
    Consecutive ranks are far enough apart that no two probabilities tie after softmax."""
    order = torch.arange(vocab) * 40_503 % vocab  # odd multiplier: a permutation of 0..2^18-1
    rank = torch.arange(vocab, dtype=torch.float32)
    decreasing = {
        "peaky": -2.0 * torch.log1p(rank),  # the 0.95 nucleus lies in the first 64 candidates
        "medium": -4e-3 * rank,  # needs the second size (1024)
        "flat": -1e-4 * rank,  # ~30,000 tokens: the whole-vocabulary fallback
    }
    return {kind: torch.empty(vocab).index_put_((order,), d) for kind, d in decreasing.items()}, order


def _known_order_mask(probs: torch.Tensor, order: torch.Tensor, top_p: float) -> torch.Tensor:
    ranked = probs[order]
    keep_ranked = torch.cumsum(ranked, 0) - ranked < top_p
    keep_ranked[0] = True
    return torch.zeros_like(keep_ranked).index_put_((order,), keep_ranked)


def test_candidate_top_p_is_the_sorted_nucleus_on_a_large_vocabulary():
    rows, order = _ranked_rows()
    probs = torch.softmax(torch.stack(list(rows.values())), -1)
    keep = top_p_mask(probs, torch.full((3,), 0.95))
    for i, kind in enumerate(rows):
        assert torch.equal(keep[i], _known_order_mask(probs[i], order, 0.95)), kind
    assert keep.sum(-1).tolist()[0] < 64 < keep.sum(-1).tolist()[1] < 1024 < 16_384 < keep.sum(-1).tolist()[2]


def test_candidate_top_p_matches_the_sort_on_random_and_peaky_rows():
    logits = torch.randn(6, 4096, generator=torch.Generator().manual_seed(11))
    logits[3:] *= 8.0  # peaky rows
    probs = torch.softmax(logits, -1)
    for top_p in ([0.9] * 6, [0.0, 0.3, 0.99, 1.0, 0.5, 0.999]):
        top_p = torch.tensor(top_p)
        assert torch.equal(top_p_mask(probs, top_p), _sort_top_p_mask(probs, top_p))


def test_seeded_draws_are_the_full_vocabulary_draws():
    """The same uniform picks the same token as masking the whole row and inverting its
    CDF in vocabulary order (what the sampler did before), on every truncation path."""
    rows, order = _ranked_rows()
    kinds = ["peaky", "medium", "flat"]
    params = {f"r{i}": SamplingParams(temperature=0.8, top_p=0.95, seed=1000 + i) for i in range(len(kinds))}
    expected = []
    for kind, p in zip(kinds, params.values()):
        probs = torch.softmax(rows[kind] / 0.8, -1)
        uniform = torch.rand((), generator=torch.Generator().manual_seed(p.seed), dtype=torch.float64)
        whole_row = (probs * _known_order_mask(probs, order, 0.95))[None]
        expected += sample_inverse_cdf(whole_row, uniform.float()[None]).tolist()
    s = _sampler(params, 262_144)
    assert s.sample(torch.stack([rows[k] for k in kinds]), list(params)).token_ids.tolist() == expected
