"""ModelRunner end to end on small random models: chunked prefill, mixed batches, preemption.

A small scheduler in this file drives the runner the way the engine does (token budget per
step, chunked prompts, paged blocks from a shuffled pool); every result is checked against
a dense single-sequence forward pass of the same model.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from textmill.config import CacheConfig, ModelConfig
from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput
from textmill.runner import ModelRunner
from textmill.sampling_params import SamplingParams

BLOCK = 4


# ---------------------------------------------------------------- a toy CausalLM
class ToyLM(nn.Module):
    """Learned positions (no RoPE), GQA, one global and one sliding-window layer."""

    def __init__(self, cfg: ModelConfig, windows=(None, 5), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        C, H, Hkv, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg, self.windows = cfg, windows
        self.embed = nn.Embedding(cfg.vocab_size, C)
        self.pos = nn.Embedding(cfg.max_position_embeddings, C)
        self.qkv = nn.ModuleList(nn.Linear(C, (H + 2 * Hkv) * D) for _ in windows)
        self.out = nn.ModuleList(nn.Linear(H * D, C) for _ in windows)
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C)) for _ in windows)
        self.norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size)
        nn.init.normal_(self.head.weight, std=0.5)

    def forward(self, input_ids, positions, ctx):
        cfg, n = self.cfg, input_ids.shape[0]
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = self.embed(input_ids) + self.pos(positions)  # (N, C)
        for i, window in enumerate(self.windows):
            q, k, v = self.qkv[i](x).split([H * D, Hkv * D, Hkv * D], dim=-1)
            y = ctx.attend(i, q.view(n, H, D), k.view(n, Hkv, D), v.view(n, Hkv, D),
                           scale=D**-0.5, sliding_window=window)
            x = x + self.out[i](y.reshape(n, H * D))
            x = x + self.mlp[i](x)
        return self.norm(x)

    def logits(self, hidden):
        return self.head(hidden).float()


class DenseContext:
    """The reference AttentionContext: one whole sequence, no cache."""

    def attend(self, layer, q, k, v, *, scale, sliding_window=None, logit_softcap=None, sinks=None):
        assert sinks is None, "no sinks here (gpt-oss: tests/parity/dense_attention.py)"
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        pos = torch.arange(q.shape[0])
        allowed = pos[None, :] <= pos[:, None]
        if sliding_window is not None:
            allowed &= pos[:, None] - pos[None, :] < sliding_window
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("hqk,khd->qhd", probs, v)


def toy_config(**kw) -> ModelConfig:
    base = dict(architecture="toy", vocab_size=64, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def dense_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) log_softmax of the next token at every position, one full pass."""
    with torch.inference_mode():
        ids = torch.tensor(tokens)
        hidden = model.forward(ids, torch.arange(len(tokens)), DenseContext())
        return torch.log_softmax(model.logits(hidden), -1)


def reference_greedy(model, prompt, max_new, presence=0.0, frequency=0.0) -> list[int]:
    tokens = list(prompt)
    counts = None
    for _ in range(max_new):
        lp = dense_logprobs(model, tokens)[-1]
        counts = torch.zeros_like(lp) if counts is None else counts
        token = int((lp - counts * frequency - (counts > 0).float() * presence).argmax())
        tokens.append(token)
        counts[token] += 1
    return tokens[len(prompt):]


# ---------------------------------------------------------------- a small scheduler
@dataclass
class Seq:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int = 0  # step at which it joins
    tokens: list[int] = field(default_factory=list)
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    blocks_sent: int = 0  # blocks[:blocks_sent] are in the runner's table
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    sent: bool = False

    @property
    def done(self) -> bool:
        return len(self.tokens) - len(self.prompt) >= self.params.max_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        # Scored once: a prompt recomputed after preemption is not scored again.
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt) - 1


def drive(runner: ModelRunner, seqs: list[Seq], budget: int, preempt_at: dict[int, str] | None = None,
          seed: int = 0) -> dict[str, Seq]:
    free = list(range(runner.cache_config.num_blocks))
    random.Random(seed).shuffle(free)
    finished, preempted, step = [], [], 0
    for s in seqs:
        s.tokens = list(s.prompt)
    while not all(s.done for s in seqs):
        if preempt_at and step in preempt_at:
            victim = next(s for s in seqs if s.rid == preempt_at[step])
            assert not victim.done and len(victim.tokens) > len(victim.prompt) + 1, "preempt mid-generation"
            free.extend(victim.blocks)
            victim.blocks, victim.computed, victim.blocks_sent = [], 0, 0
            preempted.append(victim.rid)
        new, chunks, left = [], [], budget
        for s in seqs:
            if s.arrive > step or s.done or left == 0:
                continue
            if not s.sent:
                new.append(NewRequestData(s.rid, s.params))
                s.sent = True
            chunks.append(_chunk(s, min(left, len(s.tokens) - s.computed), free))
            left -= len(chunks[-1].token_ids)
        out = runner.execute(SchedulerOutput(tuple(new), tuple(chunks), tuple(finished), tuple(preempted)))
        finished, preempted = [], []
        for c in chunks:
            s = next(x for x in seqs if x.rid == c.request_id)
            s.computed += len(c.token_ids)
            s.prompt_logprobs.extend(out.prompt_logprobs.get(s.rid, ()))
            if c.sample:
                s.tokens.append(out.sampled[s.rid].token_id)
                s.logprobs.append(out.sampled[s.rid])
                if s.done:
                    finished.append(s.rid)
                    free.extend(s.blocks)
        step += 1
    runner.execute(SchedulerOutput((), (), tuple(finished)))
    return {s.rid: s for s in seqs}


def _chunk(s: Seq, n: int, free: list[int]) -> ScheduledChunk:
    end = s.computed + n
    while len(s.blocks) * BLOCK < end:
        s.blocks.append(free.pop())
    targets = None
    if s.wants_prompt_logprobs and s.computed < len(s.prompt) - 1:
        targets = tuple(s.prompt[s.computed + 1 : min(end + 1, len(s.prompt))])
    offset, s.blocks_sent = s.blocks_sent, len(s.blocks)  # new blocks only, as the scheduler sends them
    return ScheduledChunk(s.rid, tuple(s.tokens[s.computed:end]), s.computed, tuple(s.blocks[offset:]),
                          sample=end == len(s.tokens), prompt_logprob_targets=targets, block_offset=offset)


def make_runner(model, cfg, num_blocks=64, dtype=torch.float32) -> ModelRunner:
    return ModelRunner(model, cfg, CacheConfig(block_size=BLOCK, num_blocks=num_blocks), dtype=dtype)


def _prompt(n: int, seed: int, vocab: int = 64) -> list[int]:
    return random.Random(seed).choices(range(vocab), k=n)


# ---------------------------------------------------------------- tests
def test_chunked_prefill_and_mixed_batches_match_full_pass():
    cfg = toy_config()
    model = ToyLM(cfg).eval()
    greedy = dict(temperature=0.0, max_tokens=7, logprobs=3)
    seqs = [
        Seq("long", _prompt(13, 1), SamplingParams(**greedy, prompt_logprobs=2)),
        Seq("short", _prompt(3, 2), SamplingParams(**greedy)),
        Seq("late", _prompt(9, 3), SamplingParams(**greedy), arrive=2),
    ]
    results = drive(make_runner(model, cfg), seqs, budget=5)
    for s in results.values():
        generated = s.tokens[len(s.prompt):]
        assert generated == reference_greedy(model, s.prompt, 7), s.rid
        dense = dense_logprobs(model, s.tokens[:-1])  # one pass over everything but the last
        assert generated == dense[len(s.prompt) - 1:].argmax(-1).tolist()
        for i, lp in enumerate(s.logprobs):
            row = dense[len(s.prompt) - 1 + i]
            assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
            assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
    long = results["long"]
    assert [p.token_id for p in long.prompt_logprobs] == long.prompt[1:]
    dense = dense_logprobs(model, long.prompt)
    for i, p in enumerate(long.prompt_logprobs):
        assert p.logprob == pytest.approx(float(dense[i, p.token_id]), abs=1e-4)
        assert [t for t, _ in p.top] == dense[i].topk(2).indices.tolist()


def test_preemption_keeps_seeded_samples_and_penalty_counts():
    cfg = toy_config()
    model = ToyLM(cfg, seed=1).eval()
    params = SamplingParams(temperature=1.0, seed=77, max_tokens=10, frequency_penalty=1.0,
                            presence_penalty=0.5)

    def run(preempt_at, others):
        seqs = [Seq("a", _prompt(6, 4), params)] + [
            Seq(f"o{i}", _prompt(5 + i, 10 + i), SamplingParams(temperature=0.8, seed=i, max_tokens=8))
            for i in range(others)
        ]
        return drive(make_runner(model, cfg), seqs, budget=6, preempt_at=preempt_at)["a"].tokens

    plain = run(None, 0)
    assert run({7: "a"}, 2) == plain
    assert run({4: "a", 9: "a"}, 3) == plain


def test_penalties_count_generated_tokens_only():
    cfg = toy_config()
    model = ToyLM(cfg, seed=2).eval()
    prompt = _prompt(8, 5)
    params = SamplingParams(temperature=0.0, max_tokens=8, presence_penalty=1.5, frequency_penalty=0.8)
    got = drive(make_runner(model, cfg), [Seq("p", prompt, params)], budget=4)["p"]
    assert got.tokens[len(prompt):] == reference_greedy(model, prompt, 8, presence=1.5, frequency=0.8)


def test_state_lifecycle_and_quiet_steps():
    cfg = toy_config()
    runner = make_runner(ToyLM(cfg).eval(), cfg)
    assert runner.execute(SchedulerOutput((), ())).sampled == {}
    params = SamplingParams(temperature=0.0)
    first = ScheduledChunk("r", (1, 2, 3), 0, (5,), sample=False)
    out = runner.execute(SchedulerOutput((NewRequestData("r", params),), (first,)))
    assert out.sampled == {} and out.prompt_logprobs == {}  # mid-prompt: nothing to sample
    assert "r" in runner.sampler
    runner.execute(SchedulerOutput((), (), finished_request_ids=("r",)))
    assert "r" not in runner.sampler


def test_kv_bytes_per_block():
    cfg = toy_config()
    cc = CacheConfig(block_size=16, num_blocks=8)
    assert ModelRunner.kv_bytes_per_block(cfg, cc, torch.bfloat16) == 2 * 2 * 16 * 2 * 8 * 2


def test_bfloat16_cache_and_model_track_float32():
    cfg = toy_config()
    model = ToyLM(cfg, seed=3).eval()
    prompt = _prompt(10, 6)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0, prompt_logprobs=0)
    r32 = drive(make_runner(model, cfg), [Seq("x", prompt, params)], budget=4)["x"]
    model16 = ToyLM(cfg, seed=3).eval().to(torch.bfloat16)
    r16 = drive(make_runner(model16, cfg, dtype=torch.bfloat16), [Seq("x", prompt, params)], budget=4)["x"]
    a = torch.tensor([p.logprob for p in r32.prompt_logprobs])
    b = torch.tensor([p.logprob for p in r16.prompt_logprobs])
    torch.testing.assert_close(b, a, atol=0.15, rtol=0.05)


def test_llama_model_through_the_runner():
    from textmill.models import llama
    cfg = toy_config(architecture="llama", tie_word_embeddings=False, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = llama.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    seqs = [Seq("a", _prompt(11, 7), SamplingParams(temperature=0.0, max_tokens=5, logprobs=1, prompt_logprobs=1)),
            Seq("b", _prompt(4, 8), SamplingParams(temperature=0.0, max_tokens=6), arrive=1)]
    results = drive(make_runner(model, cfg), seqs, budget=6)
    for s in results.values():
        assert s.tokens[len(s.prompt):] == reference_greedy(model, s.prompt, s.params.max_tokens)
    a = results["a"]
    dense = dense_logprobs(model, a.prompt)
    got = torch.tensor([p.logprob for p in a.prompt_logprobs])
    torch.testing.assert_close(got, dense[torch.arange(10), torch.tensor(a.prompt[1:])], atol=1e-4, rtol=1e-4)


def test_ids_past_the_tokenizers_table_are_never_sampled():
    """An embedding padded past the tokenizer's vocabulary (64 rows, 60 tokens): the padded
    rows get no probability, so no sampled id can fall outside the tokenizer's table."""
    cfg = toy_config()
    model = ToyLM(cfg).eval()
    with torch.no_grad():
        model.head.bias[60:] = 1e4  # the padded rows would win every draw
    runner = ModelRunner(model, cfg, CacheConfig(block_size=BLOCK, num_blocks=64), vocab_limit=60)
    seqs = [Seq("greedy", _prompt(5, 1), SamplingParams(temperature=0.0, max_tokens=5, logprobs=5)),
            Seq("sampled", _prompt(6, 2), SamplingParams(temperature=1.0, seed=3, max_tokens=5, logprobs=5))]
    for s in drive(runner, seqs, budget=8).values():
        assert all(t < 60 for t in s.tokens[len(s.prompt):]), s.rid
        assert all(tid < 60 for lp in s.logprobs for tid, _ in lp.top), s.rid


def test_a_quantized_head_reuses_one_logits_buffer_with_the_same_results():
    """On the kernels the runner hands its quantized LM head one reused (rows, V) buffer
    (runner/row_buffer.py): steps that read the logits in place (bias, penalties, prompt
    logprobs, seeded draws) give the same tokens and logprobs as fresh logits each step."""
    from textmill.models import llama
    from textmill.runner.qlinear import QLinear
    cfg = toy_config(architecture="llama", tie_word_embeddings=False, num_heads=4, num_kv_heads=2)

    def build() -> ModelRunner:
        torch.manual_seed(0)
        model = llama.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3) if p.dim() > 1 else None
        return ModelRunner(model, cfg, CacheConfig(block_size=BLOCK, num_blocks=64), quantization="int8")

    def seqs() -> list[Seq]:
        return [Seq("a", _prompt(11, 7), SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=2,
                                                        logit_bias=((3, -100.0),))),
                Seq("b", _prompt(5, 8), SamplingParams(temperature=0.8, seed=5, max_tokens=7, presence_penalty=0.5),
                    arrive=1),
                Seq("c", _prompt(3, 9), SamplingParams(temperature=0.0, max_tokens=5), arrive=2)]

    reused, fresh = build(), build()
    head = reused.model.lm_head
    if type(head) is not QLinear:
        pytest.skip("no C++ kernels here: the head stays an nn.Linear")
    assert head.output is not None
    fresh.model.lm_head.output = None
    got, want = drive(reused, seqs(), budget=6), drive(fresh, seqs(), budget=6)
    assert head.output.buffer.shape[0] >= 2  # several rows went through it
    for rid in want:
        assert got[rid].tokens == want[rid].tokens, rid
    # Only "a" reads logprobs (the others' are NaN, which never compare equal).
    assert got["a"].logprobs == want["a"].logprobs and len(want["a"].logprobs) == 6
    assert got["a"].prompt_logprobs == want["a"].prompt_logprobs and len(want["a"].prompt_logprobs) == 10
