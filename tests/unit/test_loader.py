"""load_model on the bundled GGUF and on tiny GGUF files written here, plus names/registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as T

from tests.parity.dense_attention import DenseAttention
from textmill.loader import LoadedModel, load_model
from textmill.loader.bundled import bundled_model_path
from textmill.loader.names import gguf_param_name, unpermute_rope_rows
from textmill.models.llama import RotaryEmbedding, apply_rotary
from textmill.models.registry import model_class, resolve_architecture


@pytest.fixture(scope="module")
def bundled() -> LoadedModel:
    return load_model(bundled_model_path())


def test_bundled_config(bundled: LoadedModel) -> None:
    c = bundled.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == (
        "llama", 49152, 576, 1536)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.rope_theta == 100000.0
    assert c.norm_eps == pytest.approx(1e-5)
    assert c.max_position_embeddings == 8192
    assert c.tie_word_embeddings and c.rope_scaling_factor is None and c.sliding_window is None
    assert bundled.format == "gguf" and bundled.path == bundled_model_path()


def test_bundled_model_is_frozen_and_tied(bundled: LoadedModel) -> None:
    model = bundled.model
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head is None  # tied: logits read the embedding matrix
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # Dequantized Q4_1 weights are not all zero or NaN (a wrong layout would show here first).
    w = model.layers[0].mlp.up_proj.weight
    assert torch.isfinite(w).all() and w.std() > 0.01


def test_bfloat16_load_computes_in_bf16_and_returns_float32(bundled: LoadedModel) -> None:
    bf16 = load_model(bundled_model_path(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    ids = torch.tensor([504, 3575, 282, 4649, 314])
    pos = torch.arange(5)
    with torch.no_grad():
        lo = bf16.model.logits(bf16.model(ids, pos, DenseAttention()))
        hi = bundled.model.logits(bundled.model(ids, pos, DenseAttention()))
    assert lo.dtype == torch.float32 and lo.shape == (5, 49152)
    # bf16 keeps ~3 significant digits: the next-token distributions stay close (measured
    # KL ~0.001-0.004 nats), while the distribution at another position is far away.
    p_hi, p_lo = hi.log_softmax(-1), lo.log_softmax(-1)
    kl = (p_hi.exp() * (p_hi - p_lo)).sum(-1)  # (5,)
    assert kl.max() < 0.02
    kl_shifted = (p_hi.exp() * (p_hi - p_lo.roll(1, 0))).sum(-1)
    assert kl_shifted.min() > 0.5


def test_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors.*pytorch_model.bin"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="unknown model format"):
        load_model(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="dtype"):
        load_model(bundled_model_path(), dtype=torch.int8)


# --- tiny GGUF files --------------------------------------------------------------------

TINY = dict(vocab=64, hidden=32, ff=64, heads=4, kv_heads=2, head_dim=16, layers=2)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (the reference, restated)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-layout weights for a tiny untied llama whose head_dim != hidden / heads."""
    t = TINY
    q_rows, kv_rows = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    shapes = {"embed_tokens.weight": (t["vocab"], t["hidden"]), "norm.weight": (t["hidden"],),
              "lm_head.weight": (t["vocab"], t["hidden"])}
    for i in range(t["layers"]):
        p = f"layers.{i}."
        shapes |= {p + "input_layernorm.weight": (t["hidden"],),
                   p + "post_attention_layernorm.weight": (t["hidden"],),
                   p + "self_attn.q_proj.weight": (q_rows, t["hidden"]),
                   p + "self_attn.k_proj.weight": (kv_rows, t["hidden"]),
                   p + "self_attn.v_proj.weight": (kv_rows, t["hidden"]),
                   p + "self_attn.o_proj.weight": (t["hidden"], q_rows),
                   p + "mlp.gate_proj.weight": (t["ff"], t["hidden"]),
                   p + "mlp.up_proj.weight": (t["ff"], t["hidden"]),
                   p + "mlp.down_proj.weight": (t["hidden"], t["ff"])}
    return {k: rng.standard_normal(s).astype(np.float32) * 0.2 for k, s in shapes.items()}


GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def to_gguf_name(name: str) -> str:
    module = name.removesuffix(".weight")
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        return f"blk.{i}.{GGUF_NAMES[rest]}.weight"
    return GGUF_NAMES[module] + ".weight"


def write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], arch: str = "llama") -> None:
    t = TINY
    w = GGUFWriter(path, arch)
    w.add_name("tiny")
    w.add_block_count(t["layers"])
    w.add_context_length(128)
    w.add_embedding_length(t["hidden"])
    w.add_feed_forward_length(t["ff"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv_heads"])
    w.add_key_length(t["head_dim"])
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(t["vocab"])
    for name, value in weights.items():
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, t["heads"])
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, t["kv_heads"])
        if "mlp" in name:  # quantized, as real files are: exercises byte shapes
            w.add_tensor(to_gguf_name(name), quants.quantize(value, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(to_gguf_name(name), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_round_trip(tmp_path: Path) -> None:
    weights = tiny_weights(np.random.default_rng(0))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, weights)
    loaded = load_model(path)
    c = loaded.config
    assert (c.head_dim, c.num_heads, c.num_kv_heads, c.vocab_size) == (16, 4, 2, 64)
    assert (c.rope_theta, c.norm_eps, c.max_position_embeddings, c.name) == (5000.0, pytest.approx(1e-6), 128, "tiny")
    assert not c.tie_word_embeddings and loaded.model.lm_head is not None
    state = loaded.model.state_dict()
    assert set(state) == set(weights)
    for name, value in weights.items():
        if "mlp" in name:
            value = quants.dequantize(quants.quantize(value, T.Q8_0), T.Q8_0)
        # q/k come back in HF order: the loader undid the converter's permutation exactly.
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)
    with torch.no_grad():
        hidden = loaded.model(torch.tensor([1, 2, 3]), torch.arange(3), DenseAttention())
    assert loaded.model.logits(hidden).shape == (3, 64)


def test_unknown_architecture_in_gguf(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, tiny_weights(np.random.default_rng(1)), arch="notarealarch")
    with pytest.raises(ValueError, match="unsupported model architecture 'notarealarch'.*llama"):
        load_model(path)


# --- names, permutation, registry -------------------------------------------------------


def interleaved_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """ggml's llama RoPE: rotate adjacent pairs (2i, 2i+1). x: (N, H, D)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None, None].double() * inv_freq  # (N, 1, D/2)
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)
    return out.flatten(-2)


def test_unpermuted_weights_with_rotate_half_equal_gguf_weights_with_interleaved_rope() -> None:
    """The reason for unpermuting: attention scores must not change with the convention."""
    torch.manual_seed(0)
    heads, d, c, n = 3, 8, 12, 5
    w_hf = torch.randn(heads * d, c, dtype=torch.float64)
    w_gguf = torch.from_numpy(llama_cpp_permute(w_hf.numpy(), heads))
    assert torch.equal(unpermute_rope_rows(w_gguf, heads), w_hf)
    x, pos = torch.randn(n, c, dtype=torch.float64), torch.tensor([0, 1, 7, 30, 99])
    rope = RotaryEmbedding(d, 128, 10000.0)
    cos, sin = (t.double() for t in rope(pos))
    q_hf = apply_rotary((x @ w_hf.T).view(n, heads, d), cos, sin)
    q_gg = interleaved_rope((x @ w_gguf.T).view(n, heads, d), pos, 10000.0)
    scores_hf = torch.einsum("nhd,mhd->hnm", q_hf, q_hf)
    scores_gg = torch.einsum("nhd,mhd->hnm", q_gg, q_gg)
    torch.testing.assert_close(scores_hf, scores_gg, rtol=1e-5, atol=1e-5)


def test_gguf_param_names() -> None:
    assert gguf_param_name("llama", "blk.12.attn_q.weight") == "layers.12.self_attn.q_proj.weight"
    assert gguf_param_name("llama", "blk.0.ffn_norm.weight") == "layers.0.post_attention_layernorm.weight"
    assert gguf_param_name("llama", "token_embd.weight") == "embed_tokens.weight"
    assert gguf_param_name("llama", "output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="unexpected tensor 'rope_freqs.weight'"):
        gguf_param_name("llama", "rope_freqs.weight")


def test_registry() -> None:
    assert resolve_architecture("LlamaForCausalLM") == "llama"
    assert resolve_architecture("MistralForCausalLM") == "llama"
    assert model_class("llama").__name__ == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="'GPTNeoXForCausalLM'.*supported:.*LlamaForCausalLM"):
        resolve_architecture("GPTNeoXForCausalLM")


def test_the_type_table_is_gguf_pys():
    # textmill keeps its own copy (importing gguf.constants imports all of gguf-py, ~47 ms of
    # every start); it must name and size every type as gguf-py does.
    import gguf.constants

    from textmill.loader import ggml_types

    theirs = {t.name: int(t) for t in gguf.constants.GGMLQuantizationType}
    assert {t.name: int(t) for t in ggml_types.GGMLQuantizationType} == theirs
    assert {int(t): size for t, size in ggml_types.GGML_QUANT_SIZES.items()} == {
        int(t): size for t, size in gguf.constants.GGML_QUANT_SIZES.items()}


def test_loading_the_bundled_model_does_not_import_gguf_py():
    # A subprocess: this one has imported gguf-py long since (the tests write files with it).
    import subprocess
    import sys

    code = ("import sys\n"
            "from textmill.cli import build_parser, engine_config_from_args\n"
            "from textmill.wiring import build_engine\n"
            "build_engine(engine_config_from_args(build_parser().parse_args(['serve'])))\n"
            "print(sorted(m for m in sys.modules if m == 'gguf' or m.startswith('gguf.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
