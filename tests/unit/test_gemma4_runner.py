"""Gemma 4 through the ModelRunner: its shared layers read an earlier layer's pool, and run only
for the rows whose output a step reads (Gemma4ForCausalLM.forward's `keep`, over
AttentionMetadata.for_rows). Chunked prompts, mixed batches, prompt log-probabilities and greedy
tokens are checked against one dense pass of the same model, on eager torch (float weights) and on
the C++ kernels (the file's Q8_0 blocks)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tests.parity.dense_attention import DenseAttention
from tests.parity.tiny_gemma4 import round_to_file, tiny_gemma4_hf, write_gemma4_gguf
from tests.parity.tiny_models import train_tokenizer
from tests.unit.test_model_runner import BLOCK, Seq, _prompt, drive
from textmill.config import CacheConfig
from textmill.loader import load_model
from textmill.runner import ModelRunner
from textmill.runner import qlinear
from textmill.sampling_params import SamplingParams

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    hf = tiny_gemma4_hf(ple_size=32)  # every linear quantized: float ones go through MKL, row count-dependent
    round_to_file(hf)
    return write_gemma4_gguf(tmp_path_factory.mktemp("g4") / "tiny-gemma4.gguf", hf, train_tokenizer(), q8_0=True)


def _dense_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """One dense pass: `model` is called as (ids, positions, ctx), so a wrapped one serves too."""
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), DenseAttention())
        return torch.log_softmax(model.logits(hidden), -1)


def _seqs(vocab: int) -> list[Seq]:
    greedy = dict(temperature=0.0, max_tokens=6, logprobs=2)
    return [Seq("long", _prompt(23, 1, vocab), SamplingParams(**greedy, prompt_logprobs=1)),
            Seq("short", _prompt(3, 2, vocab), SamplingParams(**greedy)),
            Seq("late", _prompt(14, 3, vocab), SamplingParams(**greedy), arrive=2)]


def _check(results: dict[str, Seq], reference, atol: float) -> None:
    """Each request's tokens are the dense pass's argmax after its own prefix, its log-probs that
    pass's (chunked prompts past the 8-token window, decode rows beside prefill rows)."""
    for s in results.values():
        dense = _dense_logprobs(reference, s.tokens[:-1])
        generated = s.tokens[len(s.prompt):]
        top = dense[len(s.prompt) - 1:]
        # greedy: each token is the reference's first or within rounding of it
        for i, token in enumerate(generated):
            assert float(top[i].max() - top[i, token]) <= atol, (s.rid, i)
            assert s.logprobs[i].logprob == pytest.approx(float(top[i, token]), abs=atol)
    long = results["long"]
    dense = _dense_logprobs(reference, long.prompt)
    got = torch.tensor([p.logprob for p in long.prompt_logprobs])
    expected = dense[torch.arange(len(long.prompt) - 1), torch.tensor(long.prompt[1:])]
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_shared_layers_on_eager_torch(q8_file):
    loaded = load_model(q8_file)
    runner = ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=BLOCK, num_blocks=48), kernels=False)
    assert runner.kv_cache.kv[-1] is runner.kv_cache.kv[loaded.config.kv_source(loaded.config.num_layers - 1)]
    _check(drive(runner, _seqs(loaded.config.vocab_size), budget=5), loaded.model, atol=1e-4)


def _kernel_runner(path) -> ModelRunner:
    loaded = load_model(path, codes=True)
    return ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=BLOCK, num_blocks=48),
                       file_weights=loaded, kv_dtype=torch.float16)


@pytest.mark.skipif(not qlinear.available(), reason="textmill's C++ kernels are not built here")
def test_shared_layers_on_the_kernels(q8_file):
    """The file's blocks on the kernel forward (runner/gemma4_forward.py), paged, chunked and
    batched, give each request bitwise what it gets alone one token a step (so guessed tokens
    can be checked in one step), and the float model's values within the 8-bit activations'
    rounding (this tiny random model: up to ~0.4 nats, as llama.cpp's Q8_0 path, tiny_gemma4.py)."""
    runner = _kernel_runner(q8_file)
    assert type(runner.forward).__name__ == "Gemma4KernelForward" and runner.chunks_match_steps
    assert type(runner.model.embed_tokens_per_layer).__name__ == "RowEmbedding"  # read from the file
    vocab = runner.model_config.vocab_size
    mixed = drive(runner, _seqs(vocab), budget=5)
    for seq in _seqs(vocab):
        seq.arrive = 0
        alone = drive(_kernel_runner(q8_file), [seq], budget=1)[seq.rid]
        assert alone.tokens == mixed[seq.rid].tokens
        assert [(p.token_id, p.logprob, p.top) for p in alone.logprobs] == \
            [(p.token_id, p.logprob, p.top) for p in mixed[seq.rid].logprobs]
        assert [p.logprob for p in alone.prompt_logprobs] == [p.logprob for p in mixed[seq.rid].prompt_logprobs]
    _check(mixed, load_model(q8_file).model, atol=0.5)


@pytest.mark.parametrize("kernels", [False, True], ids=["eager", "kernels"])
def test_rows_kept_are_the_full_pass_rows(q8_file, kernels):
    """forward(..., keep) gives the full forward's rows: the shared layers see each kept row as a
    one-token query at its own position (rows in any order: decodes, then prompt ends)."""
    if kernels and not qlinear.available():
        pytest.skip("textmill's C++ kernels are not built here")
    loaded = load_model(q8_file, codes=kernels)
    runner = ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=BLOCK, num_blocks=48),
                         kernels=kernels, file_weights=loaded if kernels else None)
    seqs = _seqs(loaded.config.vocab_size)
    for s in seqs:
        s.arrive = 0
    calls = []
    real = runner.forward

    def spy(ids, positions, ctx, keep=None):
        full = real(ids, positions, ctx)
        kept = real(ids, positions, ctx, keep=keep)
        calls.append(keep.numel())
        if kernels:  # every row on its own: a kept row's one-token query is the chunk's row, bitwise
            assert torch.equal(kept, full.index_select(0, keep))
        else:  # eager attention sums a row's keys in another order as a one-token query
            torch.testing.assert_close(kept, full.index_select(0, keep), rtol=0, atol=2e-5)
        return kept

    if kernels:  # the runner keeps rows on a kernel forward: a subclass whose call is the spy
        real.__class__ = type("Spy", (type(real),), {"__call__": lambda self, *a, **kw: spy(*a, **kw)})
        real = types.MethodType(type(real).__mro__[1].__call__, real)
    else:
        runner.forward = types.MethodType(lambda model, *args, **kw: spy(*args, **kw), runner.model)
    drive(runner, seqs, budget=7)
    assert calls and max(calls) > 1  # a step with several kept rows (prompt log-probs, decodes)


def test_the_config_and_a_shared_layers_own_kv_tensors(tmp_path):
    """The Gemma 4 fields as the tiny file states them; a file that also holds the shared layers'
    own k/v projections and k norm (converters copy them from checkpoints that have them; neither
    llama.cpp nor transformers uses them) loads to the same model, on both paths."""
    hf = tiny_gemma4_hf()
    plain = write_gemma4_gguf(tmp_path / "plain.gguf", hf, train_tokenizer())
    c = load_model(plain).config
    first_shared = c.num_layers - c.kv_shared_layers
    assert (c.head_dim, c.global_head_dim, c.kv_shared_layers, c.per_layer_input_size) == (16, 32, 3, 8)
    assert c.layer_intermediate_sizes[first_shared:] == (2 * c.intermediate_size,) * c.kv_shared_layers
    assert [c.kv_source(i) for i in range(first_shared, c.num_layers)] == [4, 4, 5]
    rng = np.random.default_rng(0)
    extra = {f"blk.{i}.{name}.weight": rng.standard_normal(shape).astype(np.float32)
             for i in range(first_shared, c.num_layers)
             for name, shape in (("attn_k", (c.num_kv_heads * 16, c.hidden_size)),
                                 ("attn_v", (c.num_kv_heads * 16, c.hidden_size)), ("attn_k_norm", (16,)))}
    with_kv = write_gemma4_gguf(tmp_path / "with-kv.gguf", hf, train_tokenizer(), extra=extra)
    ids = torch.tensor(_prompt(12, 4, c.vocab_size))
    for codes in (False, True) if qlinear.available() else (False,):
        a, b = load_model(plain, codes=codes), load_model(with_kv, codes=codes)
        assert set(a.codes) == set(b.codes)
        if not codes:
            torch.testing.assert_close(_dense_logprobs(a.model, ids.tolist()), _dense_logprobs(b.model, ids.tolist()),
                                       rtol=0, atol=0)


def test_a_file_without_layer_scalars_scales_by_one(tmp_path):
    """llama.cpp reads layer_output_scale where a file has it (older converters wrote none): a file
    without them is the model with every layer scalar 1, on both paths."""
    hf = tiny_gemma4_hf(ple_size=32)
    round_to_file(hf)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.layer_scalar.fill_(1.0)
    tok = train_tokenizer()
    plain = write_gemma4_gguf(tmp_path / "plain.gguf", hf, tok, q8_0=True)
    bare = write_gemma4_gguf(tmp_path / "bare.gguf", hf, tok, q8_0=True, without="layer_output_scale.weight")
    assert load_model(plain).config.layer_scalars and not load_model(bare).config.layer_scalars
    ids = _prompt(12, 5, load_model(bare).config.vocab_size)
    dense = [_dense_logprobs(load_model(path).model, ids) for path in (plain, bare)]
    torch.testing.assert_close(dense[1], dense[0], rtol=0, atol=0)
    if qlinear.available():
        greedy = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1)
        results = [drive(_kernel_runner(path), [Seq("a", ids, greedy)], budget=5)["a"] for path in (plain, bare)]
        assert [p.logprob for p in results[0].logprobs] == [p.logprob for p in results[1].logprobs]


@pytest.mark.skipif(not qlinear.available(), reason="textmill's C++ kernels are not built here")
@pytest.mark.parametrize("k_eq_v", [False, True], ids=["e2b-like", "v-from-k"])
def test_the_kernel_forward_on_float_weights_is_the_model(tmp_path, k_eq_v):
    """Float32 weights on the kernel forward (fused float linears; layer.cpp's norms, RoPE, paged
    attention): the model's own values to float rounding, the 31B's V-from-k layers included."""
    path = write_gemma4_gguf(tmp_path / "f32.gguf", tiny_gemma4_hf(k_eq_v=k_eq_v), train_tokenizer())
    loaded = load_model(path)
    runner = ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=BLOCK, num_blocks=48),
                         kv_dtype=torch.float32)
    assert type(runner.forward).__name__ == "Gemma4KernelForward"
    _check(drive(runner, _seqs(loaded.config.vocab_size), budget=5), load_model(path).model, atol=2e-4)
