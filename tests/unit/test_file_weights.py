"""A GGUF with every block type textmill reads, run on the kernels from the file's own blocks
(load_model(codes=True), runner/file_weights.py) against the eager float32 reference on the
dequantized file: the same model, up to the kernels' int8 activations and the 8-bit rounding
of the types that have no exact kernel form."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter

from textmill import kernels
from textmill.config import CacheConfig
from textmill.loader import load_model
from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput
from textmill.runner import ModelRunner
from textmill.runner.file_weights import file_decoder
from textmill.runner.kernel_forward import KernelForward
from textmill.runner.qlinear import QLinear, SideBySide
from textmill.sampling_params import SamplingParams
from tests.unit.test_dequant import F16_FIELDS, iq1_m_blocks

C, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 5, 4, 2, 320
D = C // HEADS
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# One type per linear, across the layers: every type of DESIGN.md's list appears.
TYPES = [T.Q4_K, T.Q4_K, T.Q6_K, T.Q4_0, T.Q5_K, T.Q5_K, T.Q3_K,  # layer 0: a Q4_K_M-like layer (a Q3_K down)
         T.Q4_1, T.Q5_0, T.Q8_0, T.Q5_1, T.Q2_K, T.Q6_K, T.F16,  # layer 1: the rest
         T.IQ4_XS, T.IQ4_XS, T.IQ4_NL, T.IQ4_XS, T.IQ4_XS, T.MXFP4, T.IQ4_NL,  # layer 2: an IQ4_XS file's (an MXFP4 up)
         T.IQ4_XS, T.IQ4_NL, T.IQ3_S, T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS,  # layer 3: the IQ types with grids
         T.IQ1_S, T.IQ3_S, T.Q4_K, T.IQ1_M, T.IQ3_XXS, T.Q6_K, T.IQ1_S]  # layer 4: ... beside k-quants of their form


def _shape(name: str) -> tuple[int, int]:  # (out, in), torch order
    return {"attn_q": (C, C), "attn_k": (KV_HEADS * D, C), "attn_v": (KV_HEADS * D, C), "attn_output": (C, C),
            "ffn_gate": (FFN, C), "ffn_up": (FFN, C), "ffn_down": (C, FFN)}[name]


def _blocks(qtype: T, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if qtype == T.F16:
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    nb = shape[0] * shape[1] // block_size
    if qtype == T.IQ1_M:  # its d is spread over four scale words
        return iq1_m_blocks(rng, nb, 0.04 / block_size).reshape(shape[0], -1)
    raw = rng.integers(0, 256, size=(nb, type_size), dtype=np.uint8)
    if qtype == T.MXFP4:  # its scale 2^(e - 128) from a byte: weights up to 12 * 2^-12..2^-8
        raw[:, 0] = rng.integers(116, 121, nb)
    for offset in F16_FIELDS[qtype]:  # small, finite scales; everything else random bits
        raw[:, offset:offset + 2] = (rng.uniform(-1, 1, nb) * 0.04 / block_size).astype(np.float16).view(
            np.uint8).reshape(nb, 2)
    if qtype == T.Q8_0:
        raw[:, 2:] = np.clip(raw[:, 2:].view(np.int8), -127, 127).view(np.uint8)  # as llama.cpp writes
    return raw.reshape(shape[0], -1)


def _write(path, arch: str) -> None:
    """`arch` "qwen3" adds each layer's q and k norms (the kernels apply them in rope_kv_write)."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), arch)
    for key, value in (("embedding_length", C), ("block_count", LAYERS), ("feed_forward_length", FFN),
                       ("attention.head_count", HEADS), ("attention.head_count_kv", KV_HEADS),
                       ("context_length", 256), ("attention.key_length", D)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_tensor("token_embd.weight", _blocks(T.Q8_0, (VOCAB, C), rng), raw_dtype=T.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(C, dtype=np.float32))
    w.add_tensor("output.weight", _blocks(T.Q6_K, (VOCAB, C), rng), raw_dtype=T.Q6_K)
    types = iter(TYPES)
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(C)).astype(np.float32))
        if arch == "qwen3":
            for norm in ("attn_q_norm", "attn_k_norm"):
                w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.3 * rng.standard_normal(D)).astype(np.float32))
        for name in LINEARS:
            qtype = next(types)
            data = _blocks(qtype, _shape(name), rng)
            w.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=None if qtype == T.F16 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _prompt_logprobs(runner: ModelRunner, tokens: list[int]) -> torch.Tensor:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    chunk = ScheduledChunk("x", tuple(tokens), 0, tuple(range(len(tokens) // 16 + 1)), True, tuple(tokens[1:]))
    out = runner.execute(SchedulerOutput((NewRequestData("x", params),), (chunk,)))
    return torch.tensor([p.logprob for p in out.prompt_logprobs["x"]])


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def gguf_path(request, tmp_path_factory):
    assert kernels.load("quant") is not None, "the C++ kernels did not build"
    path = tmp_path_factory.mktemp("gguf") / f"every-type-{request.param}.gguf"
    _write(path, request.param)
    return path


def test_every_block_type_runs_from_its_own_blocks_and_tracks_the_float_reference(gguf_path):
    tokens = random.Random(0).choices(range(VOCAB), k=40)
    ref_model = load_model(gguf_path, dtype=torch.float32)
    ref = _prompt_logprobs(ModelRunner(ref_model.model, ref_model.config, CacheConfig(16, 8), kernels=False), tokens)
    loaded = load_model(gguf_path, codes=True)
    assert loaded.config.qk_norm == ("qwen3" in gguf_path.name)
    assert {c.source for c in loaded.codes.values()} >= {t.name for t in TYPES} - {"F16"}
    runner = ModelRunner(loaded.model, loaded.config, CacheConfig(16, 8), file_weights=loaded)
    assert isinstance(runner.forward, KernelForward)
    layer0, layer1, layer2, layer3, layer4 = loaded.model.layers
    assert isinstance(layer0.self_attn.qkv_proj, SideBySide)  # Q4_K q/k (one matmul) beside a Q6_K v
    assert [p.mode for p in layer0.self_attn.qkv_proj.parts] == ["q4k", "q6k"]  # the k-quants' own forms
    assert layer0.self_attn.qkv_proj.parts[0].out_features == C + KV_HEADS * D
    assert isinstance(layer0.mlp.gate_up_proj, QLinear)  # Q5_K gate and up: one 5-bit matmul
    assert layer0.mlp.gate_up_proj.mode == "q5k"
    assert layer0.mlp.down_proj.mode == "q3" and loaded.model.lm_head.mode == "q6k"  # Q3_K, Q6_K
    assert [p.mode for p in layer1.self_attn.qkv_proj.parts] == ["q4", "q5", "q8"]  # Q4_1, Q5_0, Q8_0
    assert layer1.self_attn.o_proj.mode == "q5"  # Q5_1
    # a Q2_K gate (its 2-bit form) beside a Q6_K up
    assert [p.mode for p in layer1.mlp.gate_up_proj.parts] == ["q2", "q6k"]
    # IQ4_XS beside IQ4_NL: one matmul on the file's 4-bit indices
    assert layer2.self_attn.qkv_proj.mode == "iq4" and layer2.mlp.down_proj.mode == "iq4"
    # an IQ4_XS gate beside an MXFP4 up: each on its own table's 4-bit indices, one call
    assert [p.mode for p in layer2.mlp.gate_up_proj.parts] == ["iq4", "mxfp4"]
    # IQ4_XS q and IQ4_NL k as one iq4 matmul beside the IQ3_S v's 4-bit codes, an IQ3_XXS o
    # in 6 bits, the IQ2 types as indices into their six values (IQ2_S and IQ2_XS: one matmul)
    assert [p.mode for p in layer3.self_attn.qkv_proj.parts] == ["iq4", "q4"]
    assert layer3.self_attn.o_proj.mode == "q6"
    assert layer3.mlp.gate_up_proj.mode == "iq2" and layer3.mlp.down_proj.mode == "iq2"
    # IQ1_S and IQ3_S beside a Q4_K: one 4-bit matmul; IQ3_XXS beside a Q6_K: one 6-bit one
    assert layer4.self_attn.qkv_proj.mode == "q4" and layer4.mlp.gate_up_proj.mode == "q6"
    assert layer4.self_attn.o_proj.mode == "q6" and layer4.mlp.down_proj.mode == "q4"  # IQ1_M, IQ1_S
    got = _prompt_logprobs(runner, tokens)
    assert torch.isfinite(got).all()
    # Random weights: logprobs spread over several nats; the kernels move them by far less.
    assert ref.std() > 0.5
    assert (got - ref).abs().mean() < 0.04 * ref.std()
    assert torch.corrcoef(torch.stack([got, ref]))[0, 1] > 0.995


def test_the_float_path_decodes_whole_tensors_in_cpp_to_numpys_values(gguf_path):
    """load_model's float path (--no-kernels, CUDA) takes the kernels' block decoder where
    it is built: the same values as numpy's, bit for bit, for every block type."""
    decode = file_decoder()
    assert decode is not None
    decoded: list[str] = []

    def counting(rows):
        out = decode(rows)
        if out is not None:
            decoded.append(rows.qtype.name)
        return out

    by_numpy = load_model(gguf_path).model.state_dict()
    by_cpp = load_model(gguf_path, decode=counting).model.state_dict()
    assert set(decoded) == ({t.name for t in TYPES} | {"Q8_0", "Q6_K"}) - {"F16"}  # F16 and F32 stay numpy's
    assert by_cpp.keys() == by_numpy.keys()
    for name, value in by_numpy.items():
        assert torch.equal(by_cpp[name], value), name
    bf16 = load_model(gguf_path, dtype=torch.bfloat16, decode=decode).model.state_dict()
    assert all(torch.equal(bf16[n], v.to(torch.bfloat16)) for n, v in by_numpy.items())


def _write_phi3(path) -> None:
    """Phi-3's layout: q, k and v in one attn_qkv, gate and up in one ffn_up of twice the width."""
    rng = np.random.default_rng(1)
    w = GGUFWriter(str(path), "phi3")
    for key, value in (("embedding_length", C), ("block_count", 2), ("feed_forward_length", FFN),
                       ("attention.head_count", HEADS), ("attention.head_count_kv", KV_HEADS),
                       ("context_length", 256)):
        w.add_uint32(f"phi3.{key}", value)
    w.add_float32("phi3.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("phi3.rope.freq_base", 10000.0)
    w.add_tensor("token_embd.weight", _blocks(T.Q8_0, (VOCAB, C), rng), raw_dtype=T.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(C, dtype=np.float32))
    w.add_tensor("output.weight", _blocks(T.Q6_K, (VOCAB, C), rng), raw_dtype=T.Q6_K)
    for i, (qkv, up) in enumerate(((T.Q4_K, T.Q4_K), (T.Q8_0, T.Q5_K))):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(C)).astype(np.float32))
        for name, qtype, shape in (("attn_qkv", qkv, (C + 2 * KV_HEADS * D, C)), ("attn_output", T.Q4_K, (C, C)),
                                   ("ffn_up", up, (2 * FFN, C)), ("ffn_down", T.Q6_K, (C, FFN))):
            w.add_tensor(f"blk.{i}.{name}.weight", _blocks(qtype, shape, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_phi3_fused_tensors_split_into_parts_and_run_from_their_blocks(tmp_path):
    """Phi-3's attn_qkv and gate-and-up ffn_up are split by rows into the model's parts (the
    mapped bytes, no copy), which the runner stacks again into one matmul each."""
    path = tmp_path / "phi3.gguf"
    _write_phi3(path)
    tokens = random.Random(1).choices(range(VOCAB), k=30)
    ref_model = load_model(path)
    assert ref_model.config.architecture == "phi3" and ref_model.config.sliding_window is None
    ref = _prompt_logprobs(ModelRunner(ref_model.model, ref_model.config, CacheConfig(16, 8), kernels=False), tokens)
    loaded = load_model(path, codes=True)
    assert {n.rsplit(".", 2)[-2] for n in loaded.codes} >= {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    runner = ModelRunner(loaded.model, loaded.config, CacheConfig(16, 8), file_weights=loaded)
    assert isinstance(runner.forward, KernelForward)
    layer0, layer1 = loaded.model.layers
    assert layer0.self_attn.qkv_proj.mode == "q4k" and layer0.mlp.gate_up_proj.mode == "q4k"
    assert layer1.self_attn.qkv_proj.mode == "q8" and layer1.mlp.gate_up_proj.mode == "q5k"
    got = _prompt_logprobs(runner, tokens)
    assert ref.std() > 0.5
    assert (got - ref).abs().mean() < 0.04 * ref.std()
    # The parts are the fused tensor's rows: q_proj is the first C rows of attn_qkv.
    from gguf.quants import dequantize
    from textmill.loader.gguf_file import GGUFFile
    qkv = next(t for t in GGUFFile(path).tensors if t.name == "blk.1.attn_qkv.weight")
    whole = torch.from_numpy(dequantize(qkv.data, qkv.qtype).reshape(qkv.shape))
    attn = ref_model.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, whole[:C]) and torch.equal(attn.k_proj.weight, whole[C:C + KV_HEADS * D])
    assert torch.equal(attn.v_proj.weight, whole[C + KV_HEADS * D:])
    up = next(t for t in GGUFFile(path).tensors if t.name == "blk.1.ffn_up.weight")  # [gate; up]
    whole = torch.from_numpy(dequantize(up.data, up.qtype).reshape(up.shape))
    mlp = ref_model.model.layers[1].mlp
    assert torch.equal(mlp.gate_proj.weight, whole[:FFN]) and torch.equal(mlp.up_proj.weight, whole[FFN:])
