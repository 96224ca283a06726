"""The runner on textmill's C++ kernels (float32 CPU) against the eager reference path.

Same model, same scheduled steps (a small scheduler from test_model_runner: chunked prefill,
mixed decode + prefill batches, blocks from a shuffled pool), run once with kernels=False
(eager torch: models/llama.py with runner/kv_cache.py's gather + SDPA) and once with the
kernels: the Llama family through runner/kernel_forward.py, any other model through
runner/kernel_attention.py. float32 either way, so the two agree to rounding.
"""
from __future__ import annotations

import pytest
import torch

from textmill import kernels
from textmill.config import CacheConfig
from textmill.models import llama
from textmill.models.olmo2 import Olmo2ForCausalLM
from textmill.models.qwen2 import Qwen2ForCausalLM
from textmill.models.qwen3 import Qwen3ForCausalLM
from textmill.runner import ModelRunner
from textmill.runner.kernel_attention import KernelPagedAttention
from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.runner.kernel_forward import KernelForward
from textmill.runner.qlinear import SideBySide
from textmill.sampling_params import SamplingParams
from tests.unit.test_model_runner import BLOCK, Seq, ToyLM, _prompt, drive, toy_config


@pytest.fixture(scope="module", autouse=True)
def _kernels_build():
    # CI builds the kernels (make install); a machine that cannot is a failure here, not a skip.
    assert kernels.load("layer") is not None, "the C++ kernels did not build (see the log)"


# Granite's multipliers, none neutral (head_dim 8: the default scale would be 0.354).
GRANITE = dict(embedding_multiplier=2.5, residual_multiplier=0.5, attention_scale=0.3, logit_scale=0.7)


def _random_llama(cls=llama.LlamaForCausalLM, seed: int = 0, **kw):
    cfg = toy_config(architecture="llama", tie_word_embeddings=kw.pop("tied", False), **kw)
    torch.manual_seed(seed)
    model = cls(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        if p.dim() > 1:
            p.normal_(0, 0.3)
        elif p.dim() == 1 and p.shape[0] != cfg.hidden_size:
            p.normal_(0, 0.1)  # biases (qwen2)
    return model, cfg


# OLMo 3: a window in layer 0 of each 2 (plain RoPE on its own base), YaRN-like divisors and
# a cos/sin factor in the other.
OLMO3 = dict(sliding_window=5, sliding_window_pattern=2, rope_local_theta=500.0, rope_freq_factors=(1.0, 1.5, 3.0, 4.0),
             rope_attention_factor=1.14)


def _random_olmo2(seed: int = 0, whole: bool = True, **kw):
    """OLMo 2: norms on the attention's and MLP's outputs, q and k normed over all heads
    (EXAONE 4.0, `whole` False: each head alone); every norm weight near 1, each value its own
    (so a norm taken over the wrong span, or skipped, shows)."""
    model, cfg = _random_llama(Olmo2ForCausalLM, seed=seed, qk_norm=True, qk_norm_whole=whole, **kw)
    for b in model.layers:
        for norm in (b.self_attn.q_norm, b.self_attn.k_norm, b.post_attention_layernorm, b.post_feedforward_layernorm):
            norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
    return model, cfg


def _random_glm4(seed: int = 0):
    """GLM-4: all four norms a layer (weights near 1, each its own, so a norm skipped or swapped
    shows), q/k/v biases, RoPE on half of each head."""
    from textmill.models.glm4 import Glm4ForCausalLM

    model, cfg = _random_llama(Glm4ForCausalLM, seed=seed, attention_bias=True, rotary_dim=4)
    for b in model.layers:
        for norm in (b.input_layernorm, b.post_self_attn_layernorm, b.post_attention_layernorm, b.post_mlp_layernorm):
            norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
    return model, cfg


def _runner(model, cfg, kernels_on: bool, quantization: str = "none") -> ModelRunner:
    return ModelRunner(model, cfg, CacheConfig(block_size=BLOCK, num_blocks=64), dtype=torch.float32,
                       quantization=quantization, kernels=kernels_on)


def _workload():
    greedy = dict(temperature=0.0, max_tokens=6, logprobs=2)
    return [
        Seq("long", _prompt(17, 1), SamplingParams(**greedy, prompt_logprobs=1)),
        Seq("short", _prompt(2, 2), SamplingParams(**greedy)),
        Seq("late", _prompt(9, 3), SamplingParams(**greedy, prompt_logprobs=0), arrive=2),
        Seq("seeded", _prompt(5, 4), SamplingParams(temperature=0.9, seed=11, max_tokens=6, logprobs=0)),
    ]


def _compare(eager: dict[str, Seq], fast: dict[str, Seq], tol: float) -> None:
    for rid, e in eager.items():
        f = fast[rid]
        assert f.tokens == e.tokens, rid
        got = torch.tensor([lp.logprob for lp in f.logprobs])
        want = torch.tensor([lp.logprob for lp in e.logprobs])
        torch.testing.assert_close(got, want, atol=tol, rtol=0)
        if e.prompt_logprobs:
            got = torch.tensor([p.logprob for p in f.prompt_logprobs])
            want = torch.tensor([p.logprob for p in e.prompt_logprobs])
            torch.testing.assert_close(got, want, atol=tol, rtol=0)


@pytest.mark.parametrize("variant", ["llama", "tied", "qwen2", "qwen3", "window", "mha", "partial", "nope",
                                     "granite", "olmo2", "exaone4", "olmo3", "glm4"])
def test_llama_family_kernel_forward_matches_eager(variant):
    # partial: Phi-4-mini's RoPE on the first half of each head, LongRoPE's scaled cos/sin;
    # nope: SmolLM3's layer without RoPE (here the second of two); granite: its multipliers
    kw = {"tied": dict(tied=True), "window": dict(sliding_window=5), "mha": dict(num_kv_heads=4),
          "nope": dict(no_rope_layers=(1,), tied=True), "granite": GRANITE,
          "partial": dict(rotary_dim=4, rope_attention_factor=1.19, rope_freq_factors=(1.0, 3.0)),
          "qwen2": dict(attention_bias=True), "qwen3": dict(qk_norm=True, tied=True)}.get(variant, {})
    cls = {"qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}.get(variant, llama.LlamaForCausalLM)

    def build():
        if variant in ("olmo2", "exaone4", "olmo3"):
            return _random_olmo2(whole=variant != "exaone4", **(OLMO3 if variant == "olmo3" else {}))
        if variant == "glm4":
            return _random_glm4()
        model, cfg = _random_llama(cls, **dict(kw))
        if variant == "qwen3":  # QK norm weights near 1, each dimension its own
            for b in model.layers:
                for norm in (b.self_attn.q_norm, b.self_attn.k_norm):
                    norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
        return model, cfg

    eager_model, cfg = build()
    eager = drive(_runner(eager_model, cfg, False), _workload(), budget=7)
    model, _ = build()
    runner = _runner(model, cfg, True)
    assert isinstance(runner.forward, KernelForward), "the Llama family takes the kernel forward"
    _compare(eager, drive(runner, _workload(), budget=7), tol=1e-4)


# Gemma 2: no QK norm, one RoPE base, both soft-caps (small, so that they bend these scores).
GEMMA2 = dict(architecture="gemma2", qk_norm=False, rope_local_theta=None, rope_theta=10000.0,
              attn_logit_softcap=1.5, final_logit_softcap=4.0)
# Gemma 1: Gemma 2 without output norms, local layers or soft-caps.
GEMMA1 = dict(architecture="gemma", qk_norm=False, post_norms=False, sliding_window=None, sliding_window_pattern=None,
              rope_local_theta=None, rope_theta=10000.0)


def _random_gemma(seed: int = 0, **kw):
    from textmill.models.gemma3 import Gemma3ForCausalLM

    base = dict(architecture="gemma3", hidden_act="gelu_tanh", sliding_window=4, sliding_window_pattern=2,
                rope_local_theta=10000.0, rope_theta=1e6, query_pre_attn_scalar=6.0, norm_eps=1e-6,
                tie_word_embeddings=True, qk_norm=True)
    cfg = toy_config(**(base | kw))
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.3 if p.dim() > 1 else 0.2)  # norms too: Gemma's are 1 + w
    return model, cfg


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "gemma"])
def test_gemma_kernel_forward_matches_eager(family):
    """(1 + w) norms, GeGLU, local and global RoPE, a sliding window; Gemma 3's QK norm,
    Gemma 2's soft-capped attention scores and logits; Gemma 1 without output norms."""
    from textmill.runner.kernel_forward import GemmaKernelForward

    kw = {"gemma2": GEMMA2, "gemma": GEMMA1}.get(family, {})
    eager_model, cfg = _random_gemma(**kw)
    eager = drive(_runner(eager_model, cfg, False), _workload(), budget=7)
    runner = _runner(_random_gemma(**kw)[0], cfg, True)
    assert isinstance(runner.forward, GemmaKernelForward)
    _compare(eager, drive(runner, _workload(), budget=7), tol=1e-4)


def test_other_models_use_kernel_attention_and_match_eager():
    cfg = toy_config()
    eager = drive(_runner(ToyLM(cfg, seed=5).eval(), cfg, False), _workload(), budget=5)
    runner = _runner(ToyLM(cfg, seed=5).eval(), cfg, True)
    assert runner.ops is not None and not isinstance(runner.forward, KernelForward)
    seen = []
    original = KernelPagedAttention.attend

    def spy(self, *a, **k):
        seen.append(1)
        return original(self, *a, **k)

    KernelPagedAttention.attend = spy
    try:
        fast = drive(runner, _workload(), budget=5)
    finally:
        KernelPagedAttention.attend = original
    assert seen, "ToyLM attended through the kernel context"
    _compare(eager, fast, tol=1e-4)


def test_batch_composition_does_not_change_results():
    """Each sequence alone gives the same tokens and logprobs as in the mixed batch."""
    model, cfg = _random_llama(seed=3)
    runner = _runner(model, cfg, True)
    together = drive(runner, _workload(), budget=9)
    for s in _workload():
        alone = drive(_runner(_random_llama(seed=3)[0], cfg, True), [Seq(s.rid, s.prompt, s.params)], budget=9)
        assert alone[s.rid].tokens == together[s.rid].tokens
        assert [lp.logprob for lp in alone[s.rid].logprobs] == pytest.approx(
            [lp.logprob for lp in together[s.rid].logprobs], abs=1e-5)


def test_int8_kv_cache_results_do_not_depend_on_the_batch():
    """The int8 pool through the runner (rope_kv_write quantizes, paged_attention reads the
    codes and scales): each sequence alone gives what it gives in the mixed batch, and
    greedy decoding follows the float16 pool's tokens on this model."""
    model, cfg = _random_llama(seed=3)

    def runner(kv_dtype, seed=3):
        return ModelRunner(_random_llama(seed=seed)[0], cfg, CacheConfig(block_size=BLOCK, num_blocks=64),
                           dtype=torch.float32, kernels=True, kv_dtype=kv_dtype)

    assert runner(torch.int8).kv_cache.kv[0].shape[-1] == cfg.head_dim + 4
    together = drive(runner(torch.int8), _workload(), budget=9)
    for s in _workload():
        alone = drive(runner(torch.int8), [Seq(s.rid, s.prompt, s.params)], budget=9)
        assert alone[s.rid].tokens == together[s.rid].tokens
        # abs 1e-5: the float32 linears (MKL) round differently by batch size, as in the test above
        assert [lp.logprob for lp in alone[s.rid].logprobs] == pytest.approx(
            [lp.logprob for lp in together[s.rid].logprobs], abs=1e-5)
    half = drive(runner(torch.float16), _workload(), budget=9)
    for rid, seq in half.items():
        if rid == "seeded":  # a sampled draw can flip on any rounding; the greedy ones hold
            continue
        assert together[rid].tokens == seq.tokens, rid
        got = torch.tensor([lp.logprob for lp in together[rid].logprobs])
        torch.testing.assert_close(got, torch.tensor([lp.logprob for lp in seq.logprobs]), atol=0.05, rtol=0)


def test_no_kernels_keeps_the_eager_path():
    model, cfg = _random_llama()
    runner = _runner(model, cfg, False)
    assert runner.ops is None and runner.forward == model.forward
    assert runner.linears == "nn.Linear"


@pytest.mark.slow
def test_bundled_model_on_the_kernels_tracks_the_eager_float32_reference():
    """docs/performance.md's drift table: prompt logprobs of ~480 tokens of English."""
    from pathlib import Path

    from textmill.loader import load_model
    from textmill.loader.bundled import bundled_model_path
    from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput
    from textmill.tokenizer import load_gguf_tokenizer

    path = bundled_model_path()
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    tokens = load_gguf_tokenizer(path).encode(text)[:480]

    def run(quantization, kernels_on, kv_dtype=None):
        codes = quantization == "codes"  # the default path: the file's own blocks
        loaded = load_model(path, dtype=torch.float32, codes=codes)
        runner = ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=16, num_blocks=32),
                             dtype=torch.float32, quantization="none" if codes else quantization,
                             kernels=kernels_on, file_weights=loaded if codes else None, kv_dtype=kv_dtype)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        chunk = ScheduledChunk("x", tuple(tokens), 0, tuple(range(31)), True, tuple(tokens[1:]))
        out = runner.execute(SchedulerOutput((NewRequestData("x", params),), (chunk,)))
        return torch.tensor([p.logprob for p in out.prompt_logprobs["x"]])

    ref = run("none", False)
    assert (run("none", True) - ref).abs().max() < 1e-3
    # Measured 0.057 (int4) and 0.068 (int8) on an earlier README, 0.064 and 0.064 on that of
    # 2026-12-02: the activations' int8 rounding and the head's.
    for quantization, bound in (("codes", 0.08), ("int4", 0.08), ("int8", 0.1)):
        drift = (run(quantization, True) - ref).abs().mean()
        assert drift < bound, f"{quantization}: mean |dlogprob| {drift:.4f}"
    # The KV pools on the default path against a float32 pool: measured 0.058 (float16, the
    # default) and 0.073 (int8) on the README of 2026-12-04 (perplexity: docs/performance.md).
    exact = run("codes", True, torch.float32)
    for kv_dtype, bound in ((torch.float16, 0.08), (torch.int8, 0.1)):
        drift = (run("codes", True, kv_dtype) - exact).abs().mean()
        assert drift < bound, f"{kv_dtype} KV: mean |dlogprob| {drift:.4f}"


@pytest.mark.parametrize("family, quantization", [("llama", "int4"), ("gemma3", "int8"), ("llama", "none")])
def test_the_last_layer_finishes_only_the_kept_rows(family, quantization):
    """keep: the rows whose logits a step reads, in their order; the others stop at the last
    layer's attention (their k and v are in the cache all the same). On the quantized
    kernels (every GGUF file's path) rows are independent: bitwise. Float32 weights go
    through MKL, whose sums depend on the row count: within rounding."""
    from textmill.runner.batch import build_batch

    model, cfg = _random_gemma() if family == "gemma3" else _random_llama()
    runner = _runner(model, cfg, True, quantization=quantization)
    chunks = (ScheduledChunk("a", tuple(_prompt(9, 1)), 0, (0, 1, 2), sample=True),
              ScheduledChunk("b", tuple(_prompt(6, 2)), 0, (3, 4), sample=False))
    scheduled = SchedulerOutput((), chunks)
    runner.block_tables.update(scheduled)
    batch = build_batch(scheduled, runner.block_tables, "cpu")
    ctx = KernelPagedAttention(runner.kv_cache, batch.attn, runner.ops)
    with torch.inference_mode():
        full = runner.forward(batch.input_ids, batch.positions, ctx)
        cache = [kv.clone() for kv in runner.kv_cache.kv]
        for keep in ([8], [3, 8, 0], list(range(15)), []):
            got = runner.forward(batch.input_ids, batch.positions, ctx, keep=torch.tensor(keep, dtype=torch.long))
            if quantization == "none":
                torch.testing.assert_close(got, full[keep], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(got, full[keep]), keep
            assert all(torch.equal(a, b) for a, b in zip(cache, runner.kv_cache.kv))  # the same k and v


def _exactly(a: dict[str, Seq], b: dict[str, Seq]) -> None:
    for rid, x in a.items():
        y = b[rid]
        assert x.tokens == y.tokens, rid
        assert [lp.logprob for lp in x.logprobs] == [lp.logprob for lp in y.logprobs], rid
        assert [lp.top for lp in x.logprobs] == [lp.top for lp in y.logprobs], rid
        assert [p.logprob for p in x.prompt_logprobs] == [p.logprob for p in y.prompt_logprobs], rid


_FAMILIES = {
    "llama": lambda: _random_llama(seed=7),
    "qwen2": lambda: _random_llama(Qwen2ForCausalLM, seed=7, attention_bias=True),
    "qwen3": lambda: _random_llama(Qwen3ForCausalLM, seed=7, qk_norm=True, tied=True),
    "window": lambda: _random_llama(seed=7, sliding_window=5),
    "partial": lambda: _random_llama(seed=7, rotary_dim=4, rope_attention_factor=1.19, rope_freq_factors=(1.0, 3.0)),
    "nope": lambda: _random_llama(seed=7, no_rope_layers=(0,)),
    "granite": lambda: _random_llama(seed=7, **GRANITE),
    "olmo2": lambda: _random_olmo2(seed=7),
    "glm4": lambda: _random_glm4(seed=7),
    "exaone4": lambda: _random_olmo2(seed=7, whole=False),
    "olmo3": lambda: _random_olmo2(seed=7, **OLMO3),
    "gemma3": lambda: _random_gemma(seed=7),
    "gemma2": lambda: _random_gemma(seed=7, **GEMMA2),
    "gemma": lambda: _random_gemma(seed=7, **GEMMA1),
}


class _Recorder:
    """Forward, recording what each step asked of it: attention groups, and kept rows of all."""

    def __init__(self, inner):
        self.inner, self.groups, self.kept = inner, [], []

    def run(self, y, h, rows, rope, kv, slot_mapping, groups, block_size, keep=None):
        self.groups.append(len(groups))
        self.kept.append((y.shape[0] if keep is None else keep.numel(), y.shape[0]))
        return self.inner.run(y, h, rows, rope, kv, slot_mapping, groups, block_size, keep)


def _one_call_against_the_loop(build) -> None:
    """Drive the workload through Forward and through layer(); results equal to the bit, and
    the steps did meet two attention groups (decode beside prefill) and partly kept rows."""
    fast, slow = build(), build()
    assert fast.forward.one_call is not None, "every linear here is one Forward calls"
    recorder = fast.forward.one_call = _Recorder(fast.forward.one_call)
    slow.forward.one_call = None
    _exactly(drive(fast, _workload(), budget=7), drive(slow, _workload(), budget=7))
    assert max(recorder.groups) == 2
    assert any(k < n for k, n in recorder.kept)


@pytest.mark.parametrize("quantization", ["none", "int4", "int8"])
@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_the_one_call_forward_is_bitwise_the_layer_loop(family, quantization):
    """kernels/csrc/layer.cpp's Forward makes kernel_forward.layer()'s calls from C++: the
    same tokens and the same logprobs to the bit, over chunked prefill, mixed decode and
    prefill steps (two attention groups), sliding windows, soft-caps and the last layer's
    kept rows; with float32 linears (MKL) and quantized ones."""
    _one_call_against_the_loop(lambda: _runner(*_FAMILIES[family](), True, quantization=quantization))


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_one_call_forward_is_bitwise_the_layer_loop_on_each_kv_pool(family, kv_dtype):
    def build() -> ModelRunner:
        model, cfg = _FAMILIES[family]()
        return ModelRunner(model, cfg, CacheConfig(block_size=BLOCK, num_blocks=64), dtype=torch.float32,
                           quantization="int4", kernels=True, kv_dtype=kv_dtype)

    _one_call_against_the_loop(build)


def test_the_one_call_forward_is_bitwise_the_layer_loop_on_every_block_type(tmp_path):
    """A file with every GGUF type (test_file_weights): every kernel form, forms side by side."""
    from textmill.loader import load_model
    from tests.unit.test_file_weights import _write

    path = tmp_path / "every-type.gguf"
    _write(path, "qwen3")

    def build() -> ModelRunner:
        loaded = load_model(path, codes=True)
        r = ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=BLOCK, num_blocks=64), file_weights=loaded)
        assert isinstance(r.forward.layers[0].self_attn.qkv_proj, SideBySide)  # forms side by side
        return r

    _one_call_against_the_loop(build)


def test_a_linear_forward_cannot_call_keeps_the_layers_in_python():
    model, cfg = _random_llama(seed=7)
    inner = model.layers[1].mlp.down_proj

    class Wrapped(torch.nn.Module):  # any module the C++ side does not know
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model.layers[1].mlp.down_proj = Wrapped()
    runner = _runner(model, cfg, True, quantization="none")
    assert isinstance(runner.forward, KernelForward) and runner.forward.one_call is None
    eager_model, _ = _random_llama(seed=7)
    _compare(drive(_runner(eager_model, cfg, False), _workload(), budget=7), drive(runner, _workload(), budget=7),
             tol=1e-4)
