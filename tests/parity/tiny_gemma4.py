"""A tiny random-weight Gemma 4 (the dense text model) and its GGUF file as llama.cpp's
converter writes one (conversion/gemma.py, Gemma4Model on Gemma3Model on TextModel).

The model switches on what the E2B/E4B and 31B checkpoints use: sliding layers with their
own head width and RoPE base beside full-attention layers with a wider head and proportional
RoPE (a quarter of each head turned); per-layer embeddings (PLE); the last layers reusing the
K/V of an earlier layer, with an MLP twice as wide; a learned scalar on each layer's output;
unit-free RMS norms on V; attention scores unscaled (q and k are RMS-normed instead); a final
logit soft-cap. `k_eq_v=True` is a 31B-like variant instead: full layers with one KV head and
no v_proj (V is k_proj's output), and neither PLE nor KV sharing.

The layer pattern is periodic (two sliding, one full) and the shared layers start right
after a full layer that follows a sliding one: llama.cpp hard-codes the shared layers'
source as "the last layer with a cache (full) or the one before it (sliding)"
(llama-model.cpp, the Gemma 3n/4 `reuse` callback), while transformers takes the last
earlier layer of the same type; the two agree only on such layouts, as on the real E2B/E4B.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as T
from tokenizers import Tokenizer

from tests.parity.tiny_gguf import _write_vocab, finish_file
from tests.parity.tiny_models import MAX_POSITIONS, SLIDING_WINDOW, VOCAB_SIZE

HIDDEN, FFN, HEADS, KV_HEADS = 64, 128, 4, 2
HEAD_DIM, GLOBAL_HEAD_DIM, GLOBAL_KV_HEADS = 16, 32, 1
LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention") * 3
KV_SHARED_LAYERS = 3  # layers 6, 7 (sliding) reuse layer 4's K/V, layer 8 (full) reuses layer 5's
PLE_SIZE = 8
# Real Gemma 4 caps at 30 over logits in the tens; this tiny model's logits stay within about 5, where 30 would
# move its log-probs by 0.02 and 6 moves them by 0.4.
FINAL_SOFTCAP = 6.0
ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}


def gemma4_config(*, k_eq_v: bool = False, ple_size: int = PLE_SIZE):
    """Gemma4TextConfig of the tiny model. transformers honours num_global_key_value_heads only
    with attention_k_eq_v (configuration_gemma4.py): without it the full layers keep
    num_key_value_heads, as E2B/E4B do."""
    import transformers as tf

    extra = (dict(attention_k_eq_v=True, num_global_key_value_heads=GLOBAL_KV_HEADS, num_kv_shared_layers=0,
                  hidden_size_per_layer_input=0, use_double_wide_mlp=False) if k_eq_v else
             dict(attention_k_eq_v=False, num_kv_shared_layers=KV_SHARED_LAYERS, hidden_size_per_layer_input=ple_size,
                  use_double_wide_mlp=True))
    return tf.Gemma4TextConfig(
        vocab_size=VOCAB_SIZE, vocab_size_per_layer_input=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=len(LAYER_TYPES), num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, global_head_dim=GLOBAL_HEAD_DIM, layer_types=list(LAYER_TYPES),
        sliding_window=SLIDING_WINDOW, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6,
        final_logit_softcapping=FINAL_SOFTCAP, rope_parameters={k: dict(v) for k, v in ROPE.items()},
        tie_word_embeddings=True, eos_token_id=0, bos_token_id=None, pad_token_id=None, **extra)


def tiny_gemma4_hf(*, k_eq_v: bool = False, seed: int = 0, ple_size: int = PLE_SIZE):
    """A random Gemma4ForCausalLM, float32, eval mode, eager attention. `ple_size`: the per-layer
    inputs' width (32: every linear a whole number of 32-value groups, all on the 8-bit kernels).

    Gemma 4's RMSNorm multiplies by its weight as stored (no 1 + w), so every norm weight is
    1 + N(0, 0.2): a loader that adds or drops a 1 is far off. The other weights get N(0, 0.15)
    on top of transformers' init (greedy decoding then has clear winners); each layer_scalar
    (a buffer, 1 at init) is drawn from U(0.5, 1.5)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(gemma4_config(k_eq_v=k_eq_v, ple_size=ple_size), dtype=torch.float32,
                                                attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) * 0.15)
        for layer in model.model.layers:
            layer.layer_scalar.copy_(0.5 + torch.rand_like(layer.layer_scalar))
    return model.eval().requires_grad_(False)


def _converter_hparams(config) -> dict:
    """What the converter reads: config.json as save_pretrained writes it. transformers 5.x
    folds global_head_dim (and, with k_eq_v, num_global_key_value_heads) into per_layer_config
    for the full layers, which Gemma4Model.set_gguf_parameters reads back."""
    return config.to_dict()


def _full_layer_value(hparams: dict, global_key: str, key: str):
    """Gemma4Model's lookup: the global_* hparam, else the first full layer's per_layer_config."""
    if (value := hparams.get(global_key)) is not None:
        return value
    for index, layer in (hparams.get("per_layer_config") or {}).items():
        if hparams["layer_types"][int(index)] == "full_attention" and key in layer:
            return layer[key]
    return None


def _write_metadata(w: GGUFWriter, config, file_type: int) -> None:
    """The keys Gemma4Model.set_gguf_parameters leaves in the file, each once with its last
    value (the converter writes several twice; the writer keeps the later one)."""
    h = _converter_hparams(config)
    n_layer, swa = h["num_hidden_layers"], [t == "sliding_attention" for t in h["layer_types"]]
    head_dim_full = _full_layer_value(h, "global_head_dim", "head_dim")
    w.add_block_count(n_layer)
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    n_ff, shared = h["intermediate_size"], h["num_kv_shared_layers"]
    if h.get("use_double_wide_mlp"):  # the shared layers' MLP is twice as wide: one width a layer
        w.add_feed_forward_length([n_ff if il < n_layer - shared else 2 * n_ff for il in range(n_layer)])
    else:
        w.add_feed_forward_length(n_ff)
    w.add_head_count(h["num_attention_heads"])
    kv_full = _full_layer_value(h, "num_global_key_value_heads", "num_key_value_heads")
    if kv_full is not None:  # only where the full layers' count is stated (k_eq_v): one a layer
        w.add_head_count_kv([h["num_key_value_heads"] if s else kv_full for s in swa])
    else:
        w.add_head_count_kv(h["num_key_value_heads"])
    rope = h["rope_parameters"]
    # "proportional" is no GGUF scaling type (TextModel logs "Unknown RoPE type"): no scaling keys
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    w.add_key_length(head_dim_full)
    w.add_value_length(head_dim_full)
    w.add_file_type(file_type)
    if h.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(h["final_logit_softcapping"])
    w.add_sliding_window(h["sliding_window"])
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(h.get("hidden_size_per_layer_input") or 0)
    w.add_sliding_window_pattern(swa)
    w.add_key_length_swa(h["head_dim"])
    w.add_value_length_swa(h["head_dim"])
    # Full layers: the whole head, with rope_freqs' 1e30 entries stopping the unturned angles.
    # Sliding layers: the converter multiplies by rope_parameters' top-level partial_rotary_factor,
    # which the per-type dict never has: the whole head.
    w.add_rope_dimension_count(head_dim_full)
    w.add_rope_dimension_count_swa(h["head_dim"])


def proportional_rope_freqs(config) -> np.ndarray:
    """Gemma4Model.generate_extra_tensors: ggml's NeoX RoPE turns the first n_rot angles of each
    half-head, where proportional RoPE wants the first partial_rotary_factor of them turned and
    the rest still; a frequency factor of 1e30 makes those angles 0 (used by full layers only)."""
    head_dim = _full_layer_value(_converter_hparams(config), "global_head_dim", "head_dim")
    n_rot = int(head_dim * config.rope_parameters["full_attention"]["partial_rotary_factor"] / 2)
    return np.array([1.0] * n_rot + [1e30] * (head_dim // 2 - n_rot), dtype=np.float32)


def _file_type(gguf_name: str, values: np.ndarray, q8_0: bool) -> T:
    """The converter's choice (prepare_tensors) for --outtype f32 or q8_0: 1-D tensors and norms
    F32; other weights Q8_0, or F16 where a row is not a whole number of 32-value blocks
    (QuantError -> "falling back to F16")."""
    if not q8_0 or values.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return T.F32
    return T.Q8_0 if values.shape[-1] % 32 == 0 else T.F16


def _gguf_tensors(hf_model) -> dict[str, np.ndarray]:
    """HF state -> {GGUF name: float32 array}, named by gguf-py's TensorNameMap as the converter
    does: layer_scalar gets ".weight" first (Gemma4Model.filter_tensors) and becomes
    layer_output_scale; the tied lm_head is not in the file; nothing is permuted or shifted
    (Gemma 4's norm_shift is 0, Gemma rows are NeoX-ordered already)."""
    config = hf_model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, config.num_hidden_layers)
    out = {"rope_freqs.weight": proportional_rope_freqs(config)}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("layer_scalar"):
            name += ".weight"
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise KeyError(f"no GGUF name for {name}")
        out[target] = tensor.float().numpy()
    return out


def round_to_file(hf_model) -> None:
    """Each weight the Q8_0 file stores quantized (or as F16) set, in place, to the value read
    back from it, so the source model and the file compute the same function."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, hf_model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            rows = p.data.numpy()
            qtype = _file_type(target, rows, q8_0=True)
            if qtype != T.F32:
                back = quants.dequantize(quants.quantize(rows, qtype), qtype).reshape(rows.shape)
                p.data.copy_(torch.from_numpy(back.astype(np.float32)))


def write_gemma4_gguf(path: Path, hf_model, tokenizer: Tokenizer, *, q8_0: bool = False,
                      name: str = "tiny-gemma4", extra: dict[str, np.ndarray] | None = None,
                      without: str | None = None) -> Path:
    """The model as a "gemma4" GGUF: float32, or with `q8_0` as `--outtype q8_0` writes it (call
    round_to_file on the model first to compare it with the file). The vocabulary is the tiny
    tests' byte-level BPE (tiny_gguf._write_vocab), not Gemma's: the tokenizer is not what
    this file tests. `extra`: more float32 tensors (GGUF name: values), as a converter copies
    from a checkpoint that holds them (a shared layer's own k and v); `without`: leave out the
    tensors whose names end so (an older converter's file without layer_output_scale)."""
    w = GGUFWriter(path, "gemma4")
    w.add_type("model")
    w.add_name(name)
    _write_metadata(w, hf_model.config, gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(w, tokenizer)
    tensors = {k: v for k, v in {**_gguf_tensors(hf_model), **(extra or {})}.items()
               if without is None or not k.endswith(without)}
    finish_file(w, tensors, lambda target, values: _file_type(target, values, q8_0))
    return path
