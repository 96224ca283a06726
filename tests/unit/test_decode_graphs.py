"""Decode steps padded to fixed shapes (runner/decode_graphs.py), the path CUDA graphs replay.

On the CPU the padded steps run op by op; every result is checked against a dense
single-sequence forward pass, as test_model_runner.py checks the eager path. On a machine
with CUDA the same runs also capture and replay graphs, and must agree with eager CUDA.
"""
from __future__ import annotations

import pytest
import torch

from textmill.config import CacheConfig, DeviceConfig
from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput
from textmill.runner import ModelRunner
from textmill.runner.decode_graphs import MAX_CONTEXT, accepts, batch_bucket, blocks_bucket
from textmill.runner.plan import decide
from textmill.sampling_params import SamplingParams
from tests.unit.test_plan import FOLDER
from tests.unit.test_model_runner import (BLOCK, Seq, ToyLM, _prompt, dense_logprobs, drive, reference_greedy,
                                          toy_config)


def graph_runner(model, cfg, num_blocks=64, device="cpu", graphs=True, vocab_limit=None) -> ModelRunner:
    return ModelRunner(model, cfg, CacheConfig(block_size=BLOCK, num_blocks=num_blocks), device=device,
                       decode_graphs=graphs, vocab_limit=vocab_limit, kernels=False)


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 63, 64)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 64]
    assert [blocks_bucket(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_only_pure_decode_steps_are_accepted():
    one = ScheduledChunk("a", (5,), 7, (), sample=True)
    assert accepts(SchedulerOutput((), (one,)))
    assert not accepts(SchedulerOutput((), ()))
    assert not accepts(SchedulerOutput((), (one, ScheduledChunk("b", (1, 2), 0, (3,), sample=True))))
    assert not accepts(SchedulerOutput((), (ScheduledChunk("c", (5,), 0, (3,), sample=False),)))
    assert not accepts(SchedulerOutput((), (ScheduledChunk("d", (5,), 0, (3,), sample=True,
                                                           prompt_logprob_targets=(7,)),)))
    # Past MAX_CONTEXT a padded gather would read up to twice the keys: eager.
    assert accepts(SchedulerOutput((), (ScheduledChunk("e", (5,), MAX_CONTEXT - 1, (), sample=True),)))
    assert not accepts(SchedulerOutput((), (one, ScheduledChunk("f", (5,), MAX_CONTEXT, (), sample=True))))


def _check_against_dense(model, results, logprobs=3):
    for s in results.values():
        generated = s.tokens[len(s.prompt):]
        assert generated == reference_greedy(model, s.prompt, s.params.max_tokens), s.rid
        dense = dense_logprobs(model, s.tokens[:-1])
        for i, lp in enumerate(s.logprobs):
            row = dense[len(s.prompt) - 1 + i]
            assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
            assert [t for t, _ in lp.top] == row.topk(logprobs).indices.tolist()


def test_padded_decode_matches_a_dense_pass():
    """Three sequences (a batch padded to 4) over contexts that cross 1, 2, 4 and 8 blocks,
    on a global and a sliding-window layer, with GQA."""
    cfg = toy_config()
    model = ToyLM(cfg).eval()
    greedy = dict(temperature=0.0, max_tokens=14, logprobs=3)
    seqs = [Seq("long", _prompt(13, 1), SamplingParams(**greedy, prompt_logprobs=2)),
            Seq("short", _prompt(2, 2), SamplingParams(**greedy)),
            Seq("late", _prompt(9, 3), SamplingParams(**greedy), arrive=3)]
    runner = graph_runner(model, cfg)
    results = drive(runner, seqs, budget=5)
    _check_against_dense(model, results)
    assert runner.graphs.steps >= 10  # most steps were pure decode steps


def test_padded_decode_of_a_llama_model_with_rope():
    from textmill.models import llama
    cfg = toy_config(architecture="llama", tie_word_embeddings=False, sliding_window=6)
    torch.manual_seed(0)
    model = llama.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    seqs = [Seq(f"s{i}", _prompt(3 + 4 * i, 7 + i), SamplingParams(temperature=0.0, max_tokens=9, logprobs=2),
                arrive=i) for i in range(5)]
    runner = graph_runner(model, cfg)
    _check_against_dense(model, drive(runner, seqs, budget=8), logprobs=2)
    assert runner.graphs.steps > 0


def test_padded_decode_with_softcapped_attention():
    from textmill.models import gemma3
    cfg = toy_config(architecture="gemma3", hidden_act="gelu_tanh", sliding_window=5, sliding_window_pattern=2,
                     qk_norm=True, attn_logit_softcap=20.0, final_logit_softcap=30.0, query_pre_attn_scalar=8.0,
                     rope_local_theta=10000.0, norm_eps=1e-6)
    torch.manual_seed(1)
    model = gemma3.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)

    def run(graphs: bool):
        seqs = [Seq(f"g{i}", _prompt(4 + 5 * i, 20 + i), SamplingParams(temperature=0.0, max_tokens=8, logprobs=2))
                for i in range(3)]
        runner = graph_runner(model, cfg, graphs=graphs)
        out = drive(runner, seqs, budget=16)
        assert runner.graphs is None or runner.graphs.steps > 0
        return {rid: (s.tokens, [lp.logprob for lp in s.logprobs]) for rid, s in out.items()}

    # The dense reference has no softcap: the eager runner's softcapped attention is the reference.
    got, eager = run(True), run(False)
    for rid, (tokens, lps) in eager.items():
        assert got[rid][0] == tokens
        assert got[rid][1] == pytest.approx(lps, abs=1e-5)


def test_sampling_and_the_vocabulary_limit_agree_with_the_eager_path():
    """Seeded sampling, penalties and a vocabulary cut draw the same tokens on both paths."""
    cfg = toy_config()
    model = ToyLM(cfg, seed=4).eval()

    def run(graphs: bool) -> dict:
        params = [SamplingParams(temperature=0.9, seed=i, max_tokens=10, frequency_penalty=0.5, logprobs=2)
                  for i in range(3)]
        seqs = [Seq(f"r{i}", _prompt(3 + 2 * i, 30 + i), p) for i, p in enumerate(params)]
        out = drive(graph_runner(model, cfg, graphs=graphs, vocab_limit=60), seqs, budget=6)
        return {rid: s.tokens for rid, s in out.items()}

    got = run(True)
    assert got == run(False)
    assert all(t < 60 for tokens in got.values() for t in tokens[5:])


def test_padding_rows_never_touch_a_requests_blocks():
    """A lone sequence padded to nothing, then two padded to a batch of 2: the pool's own
    blocks hold exactly what the eager path wrote, the padding went to the scratch block."""
    cfg = toy_config()
    model = ToyLM(cfg, seed=5).eval()
    caches = []
    for graphs in (True, False):
        runner = graph_runner(model, cfg, num_blocks=16, graphs=graphs)
        seqs = [Seq("a", _prompt(5, 40), SamplingParams(temperature=0.0, max_tokens=6)),
                Seq("b", _prompt(7, 41), SamplingParams(temperature=0.0, max_tokens=6), arrive=2),
                Seq("c", _prompt(6, 42), SamplingParams(temperature=0.0, max_tokens=6), arrive=2)]
        drive(runner, seqs, budget=20)
        own = runner.kv_cache.num_blocks * BLOCK
        caches.append([kv[:own].clone() for kv in runner.kv_cache.kv])
    for with_graphs, eager in zip(*caches):
        torch.testing.assert_close(with_graphs, eager, atol=1e-5, rtol=1e-5)


def test_graphs_are_planned_on_cuda_only_and_enforce_eager_turns_them_off():
    assert not decide(FOLDER, DeviceConfig(device="cpu")).cuda_graphs
    if torch.cuda.is_available():
        assert decide(FOLDER, DeviceConfig(device="cuda")).cuda_graphs
        assert not decide(FOLDER, DeviceConfig(device="cuda", enforce_eager=True)).cuda_graphs


def _cuda_model(kind: str):
    """A small model of each attention form the graphs capture: plain GQA with a window
    (ToyLM), Llama's RoPE and QK norm (Qwen3), Gemma 3's softcap and local layers."""
    if kind == "toy":
        cfg = toy_config()
        return ToyLM(cfg, seed=6).eval(), cfg
    if kind == "qwen3":
        from textmill.models.qwen3 import Qwen3ForCausalLM
        cfg = toy_config(architecture="qwen3", qk_norm=True, sliding_window=6)
        model = Qwen3ForCausalLM(cfg).eval()
    else:
        from textmill.models import gemma3
        cfg = toy_config(architecture="gemma3", hidden_act="gelu_tanh", sliding_window=5, sliding_window_pattern=2,
                         qk_norm=True, attn_logit_softcap=20.0, final_logit_softcap=30.0, query_pre_attn_scalar=8.0,
                         rope_local_theta=10000.0, norm_eps=1e-6)
        model = gemma3.Gemma3ForCausalLM(cfg).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model, cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["toy", "qwen3", "gemma3"])
def test_cuda_graph_replays_match_eager_cuda(kind):
    model, cfg = _cuda_model(kind)
    model = model.to("cuda")

    def run(graphs: bool):
        seqs = [Seq(f"c{i}", _prompt(2 + 3 * i, 50 + i), SamplingParams(temperature=0.0, max_tokens=12, logprobs=3),
                    arrive=i) for i in range(6)]
        runner = graph_runner(model, cfg, device="cuda", graphs=graphs, vocab_limit=60)
        out = drive(runner, seqs, budget=12)
        return runner, {rid: (s.tokens, [lp.logprob for lp in s.logprobs]) for rid, s in out.items()}

    with_graphs, got = run(True)
    assert with_graphs.graphs.failed is None and with_graphs.graphs.captured > 1
    _, eager = run(False)
    for rid, (tokens, lps) in eager.items():
        assert got[rid][0] == tokens
        assert got[rid][1] == pytest.approx(lps, abs=1e-4)
