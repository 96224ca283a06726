"""A random-weight GGUF with Gemma 4 E2B's shapes, for speed runs (bench/synthetic_gguf.py's method).

Gemma 4 E2B as its GGUF files hold it (llama.cpp's conversion/gemma.py Gemma4Model): d = 1536,
35 layers, every fifth global; 8 query heads and one KV head, 256 wide in the sliding layers and
512 in the global ones (whose RoPE turns a quarter of the angles: the rope_freqs tensor); a
512-token window; the last 20 layers read the cache of the last earlier layer of their kind and
have a double-wide MLP (6144, 12288); per-layer embeddings of 256 a layer (a 262,144 x 8,960
table: more weights than the rest of the model, of which a token reads one row); a tied 262,144-row
embedding; final logits soft-capped at 30. The shapes are the ones the converter's keys describe
for E2B as far as this bench knows them without a download (hidden 1536 is its audio tower's
output width); speed depends on shapes and block types, not values.

Types as llama.cpp's Q4_K_M recipe gives them: Q4_K, Q6_K for attn_v and ffn_down in the "more
bits" layers, the tied embedding Q6_K, the per-layer table Q4_K, F32 norms and scalars.

    python bench/synthetic_gemma4.py            # prints the path of synthetic-gemma4, building it once
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_blocks import F32, Q4_K, Q6_K  # noqa: E402
from synthetic_gguf import SyntheticSpec, begin_file, more_bits, synthetic_path, write_tensors  # noqa: E402

# The spec's fields as synthetic_gguf names them (its cache key), Gemma 4's own below.
SYNTHETIC_GEMMA4 = SyntheticSpec(name="synthetic-gemma4", hidden=1536, layers=35, heads=8, kv_heads=1, ffn=6144,
                                 context=131072, rope_base=1000000.0, arch="gemma4", key_length=256,
                                 vocab=262144, tied=True, seed=9)


@dataclass(frozen=True)
class Gemma4Shape:
    global_every: int = 5  # layer i is global when (i + 1) % 5 == 0
    global_head_dim: int = 512
    window: int = 512
    shared_kv_layers: int = 20
    per_layer: int = 256
    local_rope_base: float = 10000.0
    rotary_fraction: float = 0.25  # of a global head's angles

    def sliding(self, layer: int) -> bool:
        return (layer + 1) % self.global_every != 0


SHAPE = Gemma4Shape()
FORMAT = 2  # bump when the bytes written change: part of the cached file's name


def synthetic_gemma4_path(spec: SyntheticSpec = SYNTHETIC_GEMMA4, tokenizer_source: Path | None = None) -> Path:
    return synthetic_path(spec, tokenizer_source, write=write_gemma4, version=FORMAT)


def tensor_plan(spec: SyntheticSpec, vocab: int, shape: Gemma4Shape = SHAPE
                ) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, numpy shape (out, in), block type), in the converter's order."""
    d, n, P = spec.hidden, spec.layers, shape.per_layer
    first_shared = n - shape.shared_kv_layers
    plan = [("token_embd.weight", (vocab, d), Q6_K), ("rope_freqs.weight", (shape.global_head_dim // 2,), F32),
            ("per_layer_token_embd.weight", (vocab, n * P), Q4_K), ("per_layer_model_proj.weight", (n * P, d), Q4_K),
            ("per_layer_proj_norm.weight", (P,), F32)]
    for i in range(n):
        hd = spec.head_dim if shape.sliding(i) else shape.global_head_dim
        q, kv = spec.heads * hd, spec.kv_heads * hd
        ffn = spec.ffn * (2 if i >= first_shared else 1)
        wide = Q6_K if more_bits(i, n) else Q4_K
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32), (f"blk.{i}.attn_q.weight", (q, d), Q4_K)]
        if i < first_shared:  # a shared layer has no K/V of its own
            plan += [(f"blk.{i}.attn_k.weight", (kv, d), Q4_K), (f"blk.{i}.attn_v.weight", (kv, d), wide),
                     (f"blk.{i}.attn_k_norm.weight", (hd,), F32)]
        plan += [(f"blk.{i}.attn_output.weight", (d, q), Q4_K), (f"blk.{i}.attn_q_norm.weight", (hd,), F32),
                 (f"blk.{i}.post_attention_norm.weight", (d,), F32), (f"blk.{i}.ffn_norm.weight", (d,), F32),
                 (f"blk.{i}.ffn_gate.weight", (ffn, d), Q4_K), (f"blk.{i}.ffn_up.weight", (ffn, d), Q4_K),
                 (f"blk.{i}.ffn_down.weight", (d, ffn), wide), (f"blk.{i}.post_ffw_norm.weight", (d,), F32),
                 (f"blk.{i}.inp_gate.weight", (P, d), Q4_K), (f"blk.{i}.proj.weight", (d, P), Q4_K),
                 (f"blk.{i}.post_norm.weight", (d,), F32), (f"blk.{i}.layer_output_scale.weight", (1,), F32)]
    return plan + [("output_norm.weight", (d,), F32)]


def _f32(spec_shape: Gemma4Shape, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1 (Gemma 4 multiplies by them as they are), layer scalars near 1, the
    proportional RoPE's divisors as the converter writes them."""
    if name == "rope_freqs.weight":
        turned = int(spec_shape.global_head_dim * spec_shape.rotary_fraction / 2)
        return np.array([1.0] * turned + [1e30] * (shape[0] - turned), dtype=np.float32)
    # q and k are unit-RMS per head and scores are not scaled by 1/sqrt(D) (attention scale 1): norm
    # weights of 1 would make scores of ~sqrt(D), a near one-hot softmax that any rounding flips.
    # Weights of D ** -1/4 keep them O(1), as trained norms do.
    center = shape[0] ** -0.25 if name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")) else 1.0
    return (center * (1.0 + 0.05 * rng.standard_normal(shape))).astype(np.float32)


def write_gemma4(spec: SyntheticSpec, tokenizer_source: Path, path: Path, shape: Gemma4Shape = SHAPE) -> Path:
    w, fields, vocab, tmp = begin_file(spec, tokenizer_source, path)
    n = spec.layers
    first_shared = n - shape.shared_kv_layers
    w.add_feed_forward_length([spec.ffn * (2 if i >= first_shared else 1) for i in range(n)])
    w.add_head_count(spec.heads)
    w.add_head_count_kv([spec.kv_heads] * n)
    w.add_key_length(shape.global_head_dim)
    w.add_value_length(shape.global_head_dim)
    w.add_key_length_swa(spec.head_dim)
    w.add_value_length_swa(spec.head_dim)
    w.add_rope_dimension_count(shape.global_head_dim)
    w.add_rope_dimension_count_swa(spec.head_dim)
    w.add_rope_freq_base(spec.rope_base)
    w.add_rope_freq_base_swa(shape.local_rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(shape.window)
    w.add_sliding_window_pattern([shape.sliding(i) for i in range(n)])
    w.add_shared_kv_layers(shape.shared_kv_layers)
    w.add_embedding_length_per_layer_input(shape.per_layer)
    w.add_final_logit_softcapping(30.0)
    w.add_vocab_size(vocab)
    w.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.add_quantization_version(2)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    return write_tensors(w, tensor_plan(spec, vocab, shape), np.random.default_rng(spec.seed), tmp, path,
                         functools.partial(_f32, shape))


if __name__ == "__main__":
    print(synthetic_gemma4_path())
