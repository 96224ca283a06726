"""bench/synthetic_gguf.py: a small file of the synthetic kind, read back by textmill's loader."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import synthetic_blocks as sb  # noqa: E402
import synthetic_gguf as sg  # noqa: E402

from textmill.loader.dequant import dequantize  # noqa: E402
from textmill.loader.gguf import read_config  # noqa: E402
from textmill.loader.gguf_file import GGUFFile  # noqa: E402
from textmill.tokenizer import load_gguf_tokenizer  # noqa: E402

TINY = sg.SyntheticSpec(name="tiny", hidden=256, layers=3, heads=4, kv_heads=2, ffn=512, context=2048)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return sg.synthetic_path(TINY, directory=tmp_path_factory.mktemp("synthetic"))


def test_textmill_reads_the_shapes(tiny):
    cfg = read_config(GGUFFile(tiny))
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == \
        ("llama", 256, 3, 4, 2)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.max_position_embeddings) == (64, 512, 2048)
    assert cfg.vocab_size == 49152  # the copied SmolLM2 vocabulary
    assert not cfg.tie_word_embeddings  # its own output head


def test_q4_k_m_tensor_types(tiny):
    types = {t.name: t.qtype.name for t in GGUFFile(tiny).tensors}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    # 3 layers: use_more_bits holds only for layer 2 (i >= 7*3//8 = 2)
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    assert types["blk.2.attn_q.weight"] == "Q4_K"


def test_more_bits_is_llama_cpps_rule():
    assert [i for i in range(16) if sg.more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    # Gemma 3 270M's Q4_K_M file keeps ffn_down in Q6_K in exactly these of its 18 layers.
    assert [i for i in range(18) if sg.more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


def test_weights_are_sane(tiny):
    for t in GGUFFile(tiny).tensors:
        if t.qtype.name == "F32":
            continue
        w = dequantize(t.data, t.qtype).reshape(t.shape)
        assert np.isfinite(w).all(), t.name
        target = 1 / np.sqrt(t.shape[1])
        assert abs(w.mean()) < 0.05 * target, t.name
        assert 0.8 * target < w.std() < 1.2 * target, t.name


def test_q4k_scale_packing_round_trips():
    rng = np.random.default_rng(1)
    sc = rng.integers(0, 64, (5, 8), dtype=np.uint8)
    m = rng.integers(0, 64, (5, 8), dtype=np.uint8)
    blocks = np.zeros((5, 144), np.uint8)
    blocks[:, 0:2] = sb._f16_bytes(np.ones(5))  # d = 1
    blocks[:, 2:4] = sb._f16_bytes(np.ones(5))  # dmin = 1
    blocks[:, 4:16] = sb.pack_q4k_scales(sc, m)  # all codes 0: each value is -m of its 32-group
    w = dequantize(blocks.reshape(-1), sg.Q4_K).reshape(5, 8, 32)
    assert np.array_equal(w[:, :, 0], -m.astype(np.float32))
    blocks[:, 16:] = 0x11  # all codes 1: d*sc - dmin*m
    w = dequantize(blocks.reshape(-1), sg.Q4_K).reshape(5, 8, 32)
    assert np.array_equal(w[:, :, 0], sc.astype(np.float32) - m)


def test_tokenizer_and_ending_ids_are_smollm2s(tiny):
    tok = load_gguf_tokenizer(tiny)
    assert tok.eos_token_ids == {0, 2}
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_cached_file_is_not_rewritten(tiny):
    before = tiny.stat().st_mtime_ns
    assert sg.synthetic_path(TINY, directory=tiny.parent) == tiny
    assert tiny.stat().st_mtime_ns == before
    assert tiny.name.startswith("tiny-") and tiny.suffix == ".gguf"


TINY_QWEN3 = sg.SyntheticSpec(name="tiny-qwen3", hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, context=2048,
                              arch="qwen3", key_length=128, vocab=50000, tied=True)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    return sg.synthetic_path(TINY_QWEN3, directory=tmp_path_factory.mktemp("synthetic-qwen3"))


def test_a_qwen3_file_with_a_padded_vocabulary(tiny_qwen3):
    cfg = read_config(GGUFFile(tiny_qwen3))
    assert (cfg.architecture, cfg.qk_norm, cfg.head_dim, cfg.num_heads) == ("qwen3", True, 128, 4)
    assert cfg.vocab_size == 50000 and cfg.tie_word_embeddings
    types = {t.name: t.qtype.name for t in GGUFFile(tiny_qwen3).tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == "Q6_K"
    assert types["blk.1.attn_q_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q4_K"
    tok = load_gguf_tokenizer(tiny_qwen3)
    assert tok.vocab_size == 50000 and tok.eos_token_ids == {0, 2}
    assert tok.decode(tok.encode("Hello world")) == "Hello world"  # the padding is never produced


def test_the_qwen3_file_runs_on_the_kernels(tiny_qwen3):
    import torch

    from textmill.config import CacheConfig
    from textmill.loader import load_model
    from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput
    from textmill.runner import ModelRunner
    from textmill.runner.kernel_forward import KernelForward
    from textmill.sampling_params import SamplingParams

    loaded = load_model(tiny_qwen3, codes=True)
    runner = ModelRunner(loaded.model, loaded.config, CacheConfig(16, 8), file_weights=loaded)
    assert isinstance(runner.forward, KernelForward)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    chunk = ScheduledChunk("x", tuple(range(100, 120)), 0, (0, 1), True)
    out = runner.execute(SchedulerOutput((NewRequestData("x", params),), (chunk,)))
    got = out.sampled["x"]
    assert 0 <= got.token_id < 50000 and torch.isfinite(torch.tensor(got.logprob))


@pytest.mark.parametrize("arch", ["gemma2", "phi3", "olmo2"])
def test_gemma2_and_phi3_files_as_llama_cpp_lays_them_out(arch, tmp_path):
    """Gemma 2: four norms a layer, soft-caps and a window; Phi-3: fused qkv and gate-up
    tensors, which textmill splits and the kernels stack again; OLMo 2: norms on the outputs
    only, q and k norms as wide as all their heads."""
    import torch

    from textmill.config import CacheConfig
    from textmill.loader import load_model
    from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput
    from textmill.runner import ModelRunner
    from textmill.runner.kernel_forward import GemmaKernelForward, KernelForward
    from textmill.sampling_params import SamplingParams

    spec = sg.SyntheticSpec(name=f"tiny-{arch}", hidden=256, layers=2, heads=4, kv_heads=2 if arch == "gemma2" else 4,
                            ffn=512, context=2048, arch=arch, key_length=128 if arch == "gemma2" else None,
                            tied=arch == "gemma2")
    path = sg.synthetic_path(spec, directory=tmp_path)
    types = {t.name: (t.qtype.name, t.shape) for t in GGUFFile(path).tensors}
    cfg = read_config(GGUFFile(path))
    if arch == "gemma2":
        assert types["blk.0.post_ffw_norm.weight"][0] == "F32" and "output.weight" not in types
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.sliding_window) == (50.0, 30.0, 4096)
    elif arch == "phi3":
        assert types["blk.0.attn_qkv.weight"][1] == (3 * 256, 256) and types["blk.0.ffn_up.weight"][1] == (1024, 256)
        assert "blk.0.attn_q.weight" not in types and cfg.head_dim == 64
    else:
        assert types["blk.0.attn_q_norm.weight"][1] == (256,) and "blk.0.attn_norm.weight" not in types
        assert cfg.architecture == "olmo2"
    loaded = load_model(path, codes=True)
    runner = ModelRunner(loaded.model, loaded.config, CacheConfig(16, 8), file_weights=loaded)
    assert isinstance(runner.forward, GemmaKernelForward if arch == "gemma2" else KernelForward)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    chunk = ScheduledChunk("x", tuple(range(100, 120)), 0, (0, 1), True)
    got = runner.execute(SchedulerOutput((NewRequestData("x", params),), (chunk,))).sampled["x"]
    assert 0 <= got.token_id < cfg.vocab_size and torch.isfinite(torch.tensor(got.logprob))


def test_requant_q8_0_writes_ggmls_bytes():
    """bench/requant_gguf.py's Q8_0 (the synthetic-1b-q8 file's layers) is ggml's rule: the
    bytes of the gguf package's reference quantizer, an all-zero group included, and
    textmill's loader reads them back within half a step plus the scale's rounding to a half
    (up to 127 x 2^-11 of a step at the largest code)."""
    from gguf import GGMLQuantizationType, quants
    from requant_gguf import quantize_q8_0

    w = (np.random.default_rng(0).standard_normal((8, 96)) * 0.05).astype(np.float32)
    w[0, :32] = 0
    blocks = quantize_q8_0(w)
    assert np.array_equal(blocks, quants.quantize(w, GGMLQuantizationType.Q8_0))
    back = dequantize(blocks, GGMLQuantizationType.Q8_0).reshape(w.shape)
    step = np.abs(w).reshape(-1, 32).max(-1) / 127
    assert (np.abs(back - w).reshape(-1, 32) <= step[:, None] * (0.5 + 127 / 2048) + 1e-7).all()


def test_a_gemma4_file_and_the_benchs_kv_sizing(tmp_path):
    """synthetic_gemma4 (a few layers of E2B's kind): textmill reads the Gemma 4 shapes, and the
    bench's KV bytes a token (what it buys textmill's pool with) are the pool's own."""
    import dataclasses

    import models
    import synthetic_gemma4 as sg4
    import torch

    from textmill.config import CacheConfig
    from textmill.runner.kv_cache import KVCache

    spec = dataclasses.replace(sg4.SYNTHETIC_GEMMA4, hidden=256, layers=10, ffn=512, vocab=None, key_length=64)
    shape = sg4.Gemma4Shape(shared_kv_layers=4, per_layer=256, global_head_dim=128)
    path = sg4.write_gemma4(spec, sg.default_tokenizer_source(), tmp_path / "g4.gguf", shape)
    config = read_config(GGUFFile(path))
    assert (config.architecture, config.head_dim, config.global_head_dim, config.kv_shared_layers) == (
        "gemma4", 64, 128, 4)
    assert config.layer_intermediate_sizes == (512,) * 6 + (1024,) * 4 and config.per_layer_input_size == 256
    per_block = KVCache.bytes_per_block(config, CacheConfig(block_size=16), torch.float32, torch.float16)
    # layers 0-5 keep a cache: five sliding (one KV head of 64) and layer 4, global (one of 128)
    assert models.read_info(path).kv_bytes_per_token(2) * 16 == per_block == 16 * 2 * 2 * (5 * 64 + 1 * 128)


def test_a_qwen35_file_and_the_benchs_kv_sizing(tmp_path):
    """synthetic_qwen35 (a few layers of 0.8B's kind): textmill reads the hybrid's shapes, runs it,
    and the bench's KV bytes a token are the pool's own (the attention layers' alone)."""
    import dataclasses

    import models
    import synthetic_hybrids as sq
    import torch

    from textmill.config import CacheConfig
    from textmill.loader import load_model
    from textmill.runner.kv_cache import KVCache

    spec = dataclasses.replace(sq.SYNTHETIC_QWEN35, hidden=256, layers=8, ffn=512, vocab=None)
    path = sq.write_qwen35(spec, sg.default_tokenizer_source(), tmp_path / "q35.gguf")
    config = read_config(GGUFFile(path))
    assert (config.architecture, config.head_dim, config.rotary_dim, config.recurrent_layers) == (
        "qwen35", 256, 64, (0, 1, 2, 4, 5, 6))
    s = config.linear_attention
    assert (s.key_heads, s.value_heads, s.key_dim, s.value_dim, s.conv_kernel) == (16, 16, 128, 128, 4)
    per_block = KVCache.bytes_per_block(config, CacheConfig(block_size=16), torch.float32, torch.float16)
    assert models.read_info(path).kv_bytes_per_token(2) * 16 == per_block == 16 * 2 * 2 * (2 * 2 * 256)
    loaded = load_model(path)  # the file's tensors all land where the model has them
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_an_lfm2_file_and_the_benchs_kv_sizing(tmp_path):
    """synthetic_hybrids' LFM2 (a few layers of 1.2B's kind): textmill reads the hybrid's shapes and
    the bench's KV bytes a token are the pool's own (its attention layers' alone)."""
    import dataclasses

    import models
    import synthetic_hybrids as sh
    import torch

    from textmill.config import CacheConfig
    from textmill.runner.kv_cache import KVCache

    spec = dataclasses.replace(sh.SYNTHETIC_LFM2, hidden=256, layers=6, heads=4, kv_heads=2, ffn=512, vocab=None)
    path = sh.write_lfm2(spec, sg.default_tokenizer_source(), tmp_path / "lfm2.gguf")
    config = read_config(GGUFFile(path))
    assert (config.architecture, config.recurrent_layers, config.short_conv) == ("lfm2", (0, 1, 3, 4), 3)
    per_block = KVCache.bytes_per_block(config, CacheConfig(block_size=16), torch.float32, torch.float16)
    assert models.read_info(path).kv_bytes_per_token(2) * 16 == per_block == 16 * 2 * 2 * (2 * 2 * 64)


@pytest.mark.parametrize("arch", ["qwen35moe", "lfm2moe"])
def test_the_hybrids_mixture_files_and_the_benchs_kv_sizing(arch, tmp_path):
    """synthetic_hybrids' mixtures of experts (a few layers of Qwen3.5-35B-A3B's and LFM2-8B-A1B's
    kinds): textmill reads their experts (a gated shared expert; a biased sigmoid router after dense
    layers), loads every tensor, and the bench's KV bytes a token are the pool's own."""
    import dataclasses

    import models
    import synthetic_hybrids as sh
    import torch

    from textmill.config import CacheConfig
    from textmill.loader import load_model
    from textmill.runner.kv_cache import KVCache

    small = dict(hidden=256, experts=8, experts_used=2, expert_ffn=256, vocab=None)
    if arch == "qwen35moe":
        spec = dataclasses.replace(sh.SYNTHETIC_QWEN35MOE, layers=4, shared_ffn=256, **small)
        path = sh.write_qwen35(spec, sg.default_tokenizer_source(), tmp_path / "q35moe.gguf")
    else:
        spec = dataclasses.replace(sh.SYNTHETIC_LFM2MOE, layers=4, heads=4, kv_heads=2, ffn=512, **small)
        path = sh.write_lfm2(spec, sg.default_tokenizer_source(), tmp_path / "lfm2moe.gguf")
    config = read_config(GGUFFile(path))
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 256)
    if arch == "qwen35moe":
        assert (config.shared_expert_gate, config.dense_layers, config.linear_attention.value_heads) == (True, (), 32)
    else:
        assert (config.router_sigmoid, config.router_selection_bias, config.dense_layers) == (True, True, (0, 1))
    per_block = KVCache.bytes_per_block(config, CacheConfig(block_size=16), torch.float32, torch.float16)
    assert models.read_info(path).kv_bytes_per_token(2) * 16 == per_block
    loaded = load_model(path)
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_a_glm4_file(tmp_path):
    """synthetic_glm4 (a few layers of GLM-4-9B's kind): textmill reads its shapes (half of each head
    turned, q/k/v biases), its Q5_0/Q8_0 ffn_down (rows of no whole number of super-blocks) and every
    tensor lands in the model."""
    import dataclasses

    import synthetic_glm4 as sgl

    from textmill.loader import load_model

    spec = dataclasses.replace(sgl.SYNTHETIC_GLM4, hidden=256, layers=2, heads=4, key_length=64, ffn=800, vocab=None)
    path = sgl.write_glm4(spec, sg.default_tokenizer_source(), tmp_path / "glm4.gguf")
    config = read_config(GGUFFile(path))
    assert (config.architecture, config.rotary_dim, config.attention_bias, config.intermediate_size) == (
        "glm4", 32, True, 800)
    types = {t.name: t.qtype.name for t in GGUFFile(path).tensors}
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q5_0", "Q8_0")  # 1: "more bits"
    loaded = load_model(path)
    assert not any(p.is_meta for p in loaded.model.parameters())


@pytest.mark.parametrize("name", ["granitehybrid", "granitehybridmoe"])
def test_the_granite_files_and_the_benchs_kv_sizing(name, tmp_path):
    """synthetic_mamba2's Granite (a few layers of Granite 4.0-H's kinds, dense and with experts): textmill reads
    the Mamba-2 layers' shape, Granite's multipliers and NoPE, the experts beside an ungated shared one;
    every tensor lands in the model, and the bench's KV bytes a token are the pool's own (the attention
    layers' alone)."""
    import dataclasses

    import models
    import synthetic_mamba2 as sgr
    import torch

    from textmill.config import CacheConfig
    from textmill.loader import load_model
    from textmill.runner.kv_cache import KVCache

    small = dict(hidden=256, layers=12, heads=4, kv_heads=2, key_length=64, vocab=None)
    if name == "granitehybridmoe":
        small |= dict(experts=8, experts_used=2, expert_ffn=256, shared_ffn=256, ffn=256)
    spec = dataclasses.replace(sgr.SPECS[name], **small)
    path = sgr.write_mamba2(spec, sg.default_tokenizer_source(), tmp_path / f"{name}.gguf")
    config = read_config(GGUFFile(path))
    assert (config.architecture, config.recurrent_layers, config.no_rope_layers) == (
        "granitehybrid", tuple(i for i in range(12) if i not in (5,)), tuple(range(12)))
    s = config.linear_attention
    assert (s.key_heads, s.value_heads, s.key_dim, s.value_dim, s.tiled_heads) == (1, 48, 128, 64, False)
    assert (config.attention_scale, config.logit_scale) == (1 / 128, 6.0)
    if name == "granitehybridmoe":
        shared = (config.shared_expert_intermediate_size, config.shared_expert_gate)
        assert config.num_experts == 8 and shared == (256, False)
    else:
        assert config.intermediate_size == spec.ffn and not config.num_experts
    per_block = KVCache.bytes_per_block(config, CacheConfig(block_size=16), torch.float32, torch.float16)
    assert models.read_info(path).kv_bytes_per_token(2) * 16 == per_block == 16 * 2 * 2 * (2 * 64)
    loaded = load_model(path)
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_a_nemotronh_moe_file(tmp_path):
    """synthetic_mamba2's Nemotron 3 Nano (a few layers): its experts' keys (the weights' scale, the
    shared expert by its up tensor, the sigmoid router's bias) and every tensor in the model."""
    import dataclasses

    import synthetic_mamba2 as sm

    from textmill.loader import load_model

    spec = dataclasses.replace(sm.SYNTHETIC_NEMOTRONH_MOE, hidden=256, heads=4, key_length=64, ffn=256, experts=8,
                               expert_ffn=256, shared_ffn=512, vocab=None)
    path = sm.write_mamba2(spec, sg.default_tokenizer_source(), tmp_path / "nemotronhmoe.gguf")
    config = read_config(GGUFFile(path))
    assert (config.architecture, config.recurrent_layers, config.mlp_only_layers) == (
        "nemotron_h", (0, 2, 4, 7), (1, 3, 6))
    assert (config.num_experts, config.router_scale, config.router_sigmoid, config.router_selection_bias) == (
        8, 2.5, True, True)
    assert config.shared_expert_intermediate_size == 512 and not config.shared_expert_gate
    loaded = load_model(path)
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_a_nemotronh_file(tmp_path):
    """synthetic_mamba2's Nemotron-H (a few layers of Nano 9B v2's pattern): textmill reads the per-layer
    arrays (a mixer, an MLP or attention in each layer), llama.cpp's Q5_0/Q8_0 fallbacks for rows of no
    whole number of super-blocks, and every tensor lands in the model; only the attention layer keeps KV."""
    import dataclasses

    import models
    import synthetic_mamba2 as sm
    import torch

    from textmill.config import CacheConfig
    from textmill.loader import load_model
    from textmill.runner.kv_cache import KVCache

    spec = dataclasses.replace(sm.SYNTHETIC_NEMOTRONH, hidden=320, heads=4, kv_heads=2, key_length=64, ffn=640,
                               vocab=None)
    path = sm.write_mamba2(spec, sg.default_tokenizer_source(), tmp_path / "nemotronh.gguf")
    config = read_config(GGUFFile(path))
    assert (config.architecture, config.hidden_act, config.recurrent_layers, config.mlp_only_layers) == (
        "nemotron_h", "relu2", (0, 2, 4, 6, 7, 9, 11), (1, 3, 5, 8, 10, 13))
    assert (config.linear_attention.key_heads, config.linear_attention.value_dim) == (8, 80)
    types = {t.name: t.qtype.name for t in GGUFFile(path).tensors}
    assert (types["blk.1.ffn_up.weight"], types["blk.0.ssm_out.weight"], types["output.weight"]) == (
        "Q5_0", "Q4_K", "Q8_0")  # rows of 320 (fallback), 10,240 (whole super-blocks), 320
    per_block = KVCache.bytes_per_block(config, CacheConfig(block_size=16), torch.float32, torch.float16)
    assert models.read_info(path).kv_bytes_per_token(2) * 16 == per_block == 16 * 2 * 2 * (2 * 64)
    loaded = load_model(path)
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_a_falconh1_file(tmp_path):
    """synthetic_mamba2's Falcon-H1 (a few layers of the 1.5B class): attention with RoPE beside a Mamba-2
    mixer in every layer, no gated norm, the pre-MLP norm without .weight; every tensor lands in the
    model and every layer keeps KV."""
    import dataclasses

    import models
    import synthetic_mamba2 as sm
    import torch

    from textmill.config import CacheConfig
    from textmill.loader import load_model
    from textmill.runner.kv_cache import KVCache

    spec = dataclasses.replace(sm.SYNTHETIC_FALCONH1, hidden=256, layers=3, heads=4, key_length=64, ffn=512,
                               vocab=None)
    path = sm.write_mamba2(spec, sg.default_tokenizer_source(), tmp_path / "falconh1.gguf")
    config = read_config(GGUFFile(path))
    assert (config.architecture, config.recurrent_layers, config.parallel_mixers) == ("falcon_h1", (0, 1, 2), True)
    assert not config.linear_attention.gated_norm and config.linear_attention.key_dim == 256
    per_block = KVCache.bytes_per_block(config, CacheConfig(block_size=16), torch.float32, torch.float16)
    assert models.read_info(path).kv_bytes_per_token(2) * 16 == per_block == 16 * 2 * 2 * (3 * 2 * 64)
    loaded = load_model(path)
    assert not any(p.is_meta for p in loaded.model.parameters())
