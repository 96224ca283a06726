"""The hybrids (Qwen3.5, LFM2, Granite 4.0-H, Nemotron-H and their mixtures of experts) through the
ModelRunner: each running request keeps its recurrent layers' state in a slot of its own
(runner/recurrent_state.py), carried from chunk to chunk and step to step, taken afresh after a
preemption and given back when it finishes. Chunked prompts, mixed batches, prompt log-probabilities
and greedy tokens are checked against one dense pass of the same model, on eager torch (float
weights) and on the C++ kernel forward (the file's Q8_0 blocks)."""
from __future__ import annotations

import pytest
import torch

from tests.parity.one_sequence import OneSequence
from tests.parity.tiny_hybrids import FAMILIES, tiny_file
from tests.unit.test_gemma4_runner import _check, _seqs
from tests.unit.test_model_runner import BLOCK, _prompt, drive
from textmill.config import CacheConfig
from textmill.loader import load_model
from textmill.runner import ModelRunner
from textmill.runner import qlinear
from textmill.sampling_params import SamplingParams

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=tuple(FAMILIES))
def q8_file(request, tmp_path_factory):
    return tiny_file(request.param, tmp_path_factory.mktemp(request.param))


def _runner(path, kernels: bool, slots: int = 4) -> ModelRunner:
    loaded = load_model(path, codes=kernels)
    return ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=BLOCK, num_blocks=48), kernels=kernels,
                       file_weights=loaded if kernels else None, state_slots=slots)


def test_states_on_eager_torch(q8_file):
    runner = _runner(q8_file, kernels=False)
    c = runner.model_config
    # a state, not KV; Nemotron-H's MLP layers neither; Falcon-H1's layers both
    assert all((kv is None) == (not c.has_kv(i)) for i, kv in enumerate(runner.kv_cache.kv))
    assert c.parallel_mixers or all(not c.has_kv(i) for i in c.recurrent_layers)
    assert not runner.chunks_match_steps  # no guessed tokens: a state cannot take back a rejected one
    _check(drive(runner, _seqs(runner.model_config.vocab_size), budget=5),
           OneSequence(load_model(q8_file).model), atol=1e-4)


@pytest.mark.skipif(not qlinear.available(), reason="textmill's C++ kernels are not built here")
def test_states_on_the_kernels(q8_file):
    """The file's blocks on the kernel forward (runner/hybrid_forward.py), paged, chunked and batched, give each request
    bitwise what it gets alone one token a step, and the float model's values within the 8-bit
    activations' rounding (this tiny random model: 0.12 nats on average, up to ~0.7; its mixture of
    experts more, below)."""
    runner = _runner(q8_file, kernels=True)
    assert type(runner.forward).__name__ == "HybridKernelForward"
    if runner.model_config.num_experts:  # each layer's experts stacked for the grouped kernels (runner/moe.py)
        assert all(type(b.mlp).__name__ == "KernelMoE" for i, b in enumerate(runner.model.layers)
                   if hasattr(b, "mlp") and i not in runner.model_config.dense_layers)
    vocab = runner.model_config.vocab_size
    mixed = drive(runner, _seqs(vocab), budget=5)
    for seq in _seqs(vocab):
        seq.arrive = 0
        alone = drive(_runner(q8_file, kernels=True), [seq], budget=1)[seq.rid]
        assert alone.tokens == mixed[seq.rid].tokens
        assert [p.logprob for p in alone.logprobs] == [p.logprob for p in mixed[seq.rid].logprobs]
    # A mixture's tokens may choose other experts than the float model's do (here 0.43 nats on average
    # and up to ~2.6; with the float experts in their place 0.32 on average): the rest of its path is
    # as rounded as the dense model's, the experts' choice not smooth.
    _check(mixed, OneSequence(load_model(q8_file).model), atol=3.0 if runner.model_config.num_experts else 0.75)


def test_preempted_request_starts_from_a_fresh_state(q8_file):
    """A request preempted mid-generation is recomputed from position 0 into a zeroed slot and
    gives the tokens it gives unpreempted; finished requests give their slots back, so two slots
    serve three requests one after another."""
    vocab = load_model(q8_file).config.vocab_size
    plain = drive(_runner(q8_file, kernels=False), _seqs(vocab), budget=5)
    expected = {rid: s.tokens for rid, s in plain.items()}
    again = drive(_runner(q8_file, kernels=False), _seqs(vocab), budget=5, preempt_at={9: "long"})
    assert {rid: s.tokens for rid, s in again.items()} == expected
    runner = _runner(q8_file, kernels=False, slots=2)
    for s in _seqs(runner.model_config.vocab_size):
        s.arrive = 0
        assert drive(runner, [s], budget=5)[s.rid].tokens == expected[s.rid]
    assert len(runner.states._free) == 2


@pytest.mark.skipif(not qlinear.available(), reason="textmill's C++ kernels are not built here")
def test_guessed_tokens_leave_the_states_of_one_token_steps(q8_file):
    """Two requests decode side by side, one token a step, then the same again with guesses: one
    request's all right, the other's right then wrong. The rejected guesses' rows went through the
    recurrent layers too; the runner puts those states back and replays the kept rows, so every
    later token and log-prob is plain decoding's, bit for bit."""
    from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput

    vocab = load_model(q8_file).config.vocab_size
    prompts = {"a": _prompt(9, 5, vocab), "b": _prompt(6, 6, vocab)}
    params = SamplingParams(temperature=0.0, max_tokens=40, logprobs=1)

    def run(guess_at: int | None) -> dict[str, list]:
        runner = _runner(q8_file, kernels=True)
        assert runner.chunks_match_steps
        tokens = {r: list(p) for r, p in prompts.items()}
        lps = {r: [] for r in prompts}
        blocks = {"a": tuple(range(0, 8)), "b": tuple(range(8, 16))}  # room for 32 tokens each
        out = runner.execute(SchedulerOutput(tuple(NewRequestData(r, params) for r in prompts), tuple(
            ScheduledChunk(r, tuple(p), 0, blocks[r], sample=True) for r, p in prompts.items()), (), ()))
        for step in range(12):
            for r in prompts:
                tokens[r].append(out.sampled[r].token_id)
                lps[r].append(out.sampled[r].logprob)
            chunks = []
            for r, t in tokens.items():
                draft = ()
                if step == guess_at:  # a's next three as plain decoding gives them; b's first right, then wrong
                    right = expected[r][len(t):len(t) + 3]
                    draft = tuple(right) if r == "a" else (right[0], (right[1] + 1) % vocab, right[2])
                chunks.append(ScheduledChunk(r, (t[-1], *draft), len(t) - 1, (), sample=True,
                                             block_offset=len(blocks[r]), draft=draft))
            out = runner.execute(SchedulerOutput((), tuple(chunks), (), ()))
            for r in prompts:
                for entry in out.accepted.get(r, ()):
                    tokens[r].append(entry.token_id)
                    lps[r].append(entry.logprob)
        return {r: (tokens[r][:len(prompts[r]) + 12], lps[r][:12]) for r in prompts}

    expected = {r: t for r, (t, _) in run(None).items()}
    plain = run(None)
    guessed = run(3)
    assert guessed == plain
