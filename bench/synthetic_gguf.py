"""A random-weight GGUF with the shapes and tensor types of a real model, for speed runs.

Speed does not depend on the weights' values, only on shapes and block types, so the bench
can measure a 1B-class Llama without downloading one. The file is a Llama with the block
types of llama.cpp's Q4_K_M recipe: Q4_K everywhere, Q6_K for attn_v and ffn_down in the
"more bits" layers (the first and last eighth, and every third one between), a Q6_K output
head, F32 norms. Block bytes are written directly: random codes, with scales chosen so that
each weight matrix has a standard deviation of about 1/sqrt(fan-in) and mean ~0, so
activations stay O(1) through the layers (no NaN or inf in float32 or llama.cpp's f16 KV).
The tokenizer (tokenizer.* metadata) is copied from another GGUF, by default the bundled
SmolLM2's 49,152-token one, and the vocabulary size follows it, unless the spec asks for a
larger one: then unused tokens (llama.cpp's type 5, never produced by the merges) pad the
table, so that both servers load a head and an embedding of that many rows.

Two files: synthetic-1b (a Llama, d=2048, 16 layers) and synthetic-qwen3 (the shapes of Qwen3-0.6B:
d=1024, 28 layers, 16/8 heads of 128, QK norms, a tied 151,936-row embedding, Q6_K as llama.cpp's
Q4_K_M keeps a tied embedding). synthetic-8b has Llama 3 8B's shapes, for the other end of the sizes
people use; synthetic-gemma2 has Gemma 2 2B's, synthetic-phi3 Phi-3-mini's, synthetic-olmo2 OLMo 2
1B's, synthetic-qwen3moe a quarter of Qwen3-30B-A3B's layers (its mixture of experts), synthetic-gptoss
a third of gpt-oss-20b's (MXFP4 experts, Q8_0 elsewhere), synthetic-erniemoe 8 of ERNIE-4.5-21B-A3B's
28 layers (a router's selection bias, a shared expert, a dense first layer).

Files are cached under ~/.cache/textmill-bench (TEXTMILL_BENCH_CACHE overrides), named by their parameters:

    python bench/synthetic_gguf.py                 # prints the path of synthetic-1b, building it once
    python bench/synthetic_gguf.py --qwen3         # the same for synthetic-qwen3 (--8b, --gemma2, --phi3,
                                                   # --olmo2, --qwen3moe, --gptoss, --erniemoe: theirs)
    python bench/synthetic_gguf.py --layers 2 --out /tmp/tiny.gguf
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, RopeScalingType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from textmill.loader.gguf_file import read_metadata  # noqa: E402  (numpy only)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_blocks import F32, MXFP4, Q4_K, Q6_K, Q8_0, tensor_bytes  # noqa: E402
FORMAT_VERSION = 1  # bump when the bytes written for the same parameters change


@dataclass(frozen=True)
class SyntheticSpec:
    """The shapes of the model; the vocabulary comes from the tokenizer file."""

    name: str = "synthetic-1b"
    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    context: int = 8192
    rope_base: float = 500000.0
    seed: int = 0
    # "llama", "qwen3" (per-head q and k norms, no permutation), "qwen3moe", "gemma2", "phi3", "olmo2",
    # "exaone4" or "gpt-oss"
    arch: str = "llama"
    key_length: int | None = None  # head_dim when it is not hidden / heads
    vocab: int | None = None  # pad the tokenizer's table to this many tokens
    tied: bool = False  # no output.weight: the embedding is the head
    # A mixture of experts (arch "qwen3moe"): each layer's MLP is `experts` experts of
    # `expert_ffn`, `experts_used` a token, behind a float router (ffn is then unused).
    experts: int = 0
    experts_used: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0  # a shared expert this wide beside the routed ones (ERNIE 4.5 MoE: two of 1536)
    dense_lead: int = 0  # the first layers keep a dense MLP (ERNIE 4.5 MoE: one)

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.heads


SYNTHETIC_1B = SyntheticSpec()
SYNTHETIC_QWEN3 = SyntheticSpec(name="synthetic-qwen3", hidden=1024, layers=28, heads=16, kv_heads=8, ffn=3072,
                                context=40960, rope_base=1000000.0, arch="qwen3", key_length=128,
                                vocab=151936, tied=True, seed=1)
# Gemma 2 2B's shapes: head_dim 256 (q is 2048 wide against d = 2304), every other layer on a
# 4096-token window, soft-capped scores (50) and logits (30), four norms a layer, a tied
# 256,000-row Q6_K embedding (SmolLM2's tokenizer padded, as for Qwen3).
SYNTHETIC_GEMMA2 = SyntheticSpec(name="synthetic-gemma2", hidden=2304, layers=26, heads=8, kv_heads=4, ffn=9216,
                                 context=8192, rope_base=10000.0, arch="gemma2", key_length=256, vocab=256000,
                                 tied=True, seed=3)
# Phi-3-mini's shapes: 32 heads of 96 with no grouping (K/V as wide as Q), fused qkv and
# gate-and-up tensors (Q6_K in the "more bits" layers, as llama.cpp's Q4_K_M gives attn_qkv
# more bits), SmolLM2's 49,152-token vocabulary (Phi-3's is 32,064).
# (Its name lacks "phi3" and "phi-3": llama.cpp then looks for Phi-3's own special tokens.)
SYNTHETIC_PHI3 = SyntheticSpec(name="synthetic-phi-mini", hidden=3072, layers=32, heads=32, kv_heads=32, ffn=8192,
                               context=4096, rope_base=10000.0, arch="phi3", seed=4)
# OLMo 2 1B's shapes (OLMo-2-0425-1B): 16 heads of 128 with no grouping, norms on each
# attention and MLP output instead of the inputs, q and k normed over all heads, an untied
# head over a 100,352-token vocabulary (SmolLM2's tokenizer padded).
SYNTHETIC_OLMO2 = SyntheticSpec(name="synthetic-olmo2", hidden=2048, layers=16, heads=16, kv_heads=16, ffn=8192,
                                context=4096, rope_base=500000.0, arch="olmo2", vocab=100352, seed=5)
# Qwen3-30B-A3B's layers (d = 2048, 32/4 heads of 128, per-head QK norms; 128 experts of 768,
# 8 a token, a float router; an untied 151,936-row Q6_K head), 12 of its 48: a quarter of its
# depth (4.5 GiB), the most downloaded mixture of experts at a size the bench can write.
SYNTHETIC_QWEN3MOE = SyntheticSpec(name="synthetic-qwen3moe", hidden=2048, layers=12, heads=32, kv_heads=4, ffn=6144,
                                   context=40960, rope_base=1000000.0, arch="qwen3moe", key_length=128,
                                   vocab=151936, seed=6, experts=128, experts_used=8, expert_ffn=768)
# gpt-oss-20b's layers (d = 2880, 64/8 heads of 64 with biases and sinks, every other layer on a
# 128-token window, YaRN; 32 experts of 2880, 4 a token, in MXFP4 with biases; attention, the
# embedding and the untied 201,088-row head in Q8_0, as the released file holds them: 2880 is no
# whole number of 256-value k-quant blocks), 8 of its 24: 4.8 GB.
SYNTHETIC_GPTOSS = SyntheticSpec(name="synthetic-gptoss", hidden=2880, layers=8, heads=64, kv_heads=8, ffn=2880,
                                 context=131072, rope_base=150000.0, arch="gpt-oss", key_length=64,
                                 vocab=201088, seed=7, experts=32, experts_used=4, expert_ffn=2880)
# ERNIE-4.5-21B-A3B's layers (d = 2560, 20/4 heads of 128; a dense first layer, then 64 experts
# of 1536, 6 a token by a biased softmax, beside a shared expert of 3072; a tied 103,424-row
# Q6_K embedding), 8 of its 28: 3.3 GB.
SYNTHETIC_ERNIEMOE = SyntheticSpec(name="synthetic-erniemoe", hidden=2560, layers=8, heads=20, kv_heads=4,
                                   ffn=12288, context=131072, rope_base=500000.0, arch="ernie4_5-moe",
                                   key_length=128, vocab=103424, tied=True, seed=8, experts=64, experts_used=6,
                                   expert_ffn=1536, shared_ffn=3072, dense_lead=1)
# Llama 3 8B's shapes (128,256-token vocabulary, GQA 32/8, ffn 14336): the largest size people
# run on a CPU. 4.6 GiB; not in the default matrix (`--models synthetic-8b`).
SYNTHETIC_8B = SyntheticSpec(name="synthetic-8b", hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336,
                             context=8192, rope_base=500000.0, vocab=128256, seed=2)


def cache_dir() -> Path:
    return Path(os.environ.get("TEXTMILL_BENCH_CACHE", Path.home() / ".cache" / "textmill-bench"))


def default_tokenizer_source() -> Path:
    from textmill.loader.bundled import bundled_model_path
    return bundled_model_path()


# Fields added after files were cached: left out of the key at these defaults, so that the
# files written before them keep their names.
_LATER_DEFAULTS = {"shared_ffn": 0, "dense_lead": 0}


def cache_key(spec: SyntheticSpec, tokenizer_source: Path) -> str:
    fields = {k: v for k, v in asdict(spec).items() if k not in _LATER_DEFAULTS or v != _LATER_DEFAULTS[k]}
    ident = json.dumps({**fields, "format": FORMAT_VERSION, "tokenizer": tokenizer_source.name,
                        "tokenizer_bytes": tokenizer_source.stat().st_size}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:10]


def synthetic_path(spec: SyntheticSpec = SYNTHETIC_1B, tokenizer_source: Path | None = None,
                   directory: Path | None = None, write=None, version: int | None = None) -> Path:
    """The cached file for these parameters, written first if it is missing (by `write`: another file's
    writer, whose `version` then names the bytes it writes; default write_synthetic)."""
    source = tokenizer_source or default_tokenizer_source()
    tag = f"-v{version}" if version is not None else ""
    path = (directory or cache_dir()) / f"{spec.name}{tag}-{cache_key(spec, source)}.gguf"
    if not path.is_file():
        (write or write_synthetic)(spec, source, path)
    return path


# --- the tensor plan ------------------------------------------------------------------------


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits(): the layers whose attn_v/ffn_down Q4_K_M keeps in Q6_K."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, (rows, cols) in numpy order = (out, in), block type) in llama.cpp's file order."""
    d, q, kv, f = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.ffn
    if spec.arch == "gpt-oss":
        return _gpt_oss_plan(spec, vocab)
    plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [
        ("token_embd.weight", (vocab, d), Q6_K if spec.tied else Q4_K)]
    for i in range(spec.layers):
        wide = Q6_K if more_bits(i, spec.layers) else Q4_K
        post_norms = spec.arch in ("olmo2", "exaone4")  # no norm on a layer's inputs, one on its outputs
        if not post_norms:
            plan += [(f"blk.{i}.attn_norm.weight", (d,), F32)]
        if spec.arch in ("qwen3", "qwen3moe"):
            plan += [(f"blk.{i}.attn_q_norm.weight", (spec.head_dim,), F32),
                     (f"blk.{i}.attn_k_norm.weight", (spec.head_dim,), F32)]
        if spec.arch == "phi3":  # q, k and v in one tensor; gate and up in one of twice the width
            plan += [(f"blk.{i}.attn_qkv.weight", (q + 2 * kv, d), wide),
                     (f"blk.{i}.attn_output.weight", (d, q), Q4_K),
                     (f"blk.{i}.ffn_norm.weight", (d,), F32),
                     (f"blk.{i}.ffn_up.weight", (2 * f, d), Q4_K),
                     (f"blk.{i}.ffn_down.weight", (d, f), wide)]
            continue
        plan += [(f"blk.{i}.attn_q.weight", (q, d), Q4_K),
                 (f"blk.{i}.attn_k.weight", (kv, d), Q4_K),
                 (f"blk.{i}.attn_v.weight", (kv, d), wide),
                 (f"blk.{i}.attn_output.weight", (d, q), Q4_K)]
        if post_norms:  # q and k normed over all heads (OLMo 2) or each head alone (EXAONE 4.0)
            whole = spec.arch == "olmo2"
            plan += [(f"blk.{i}.attn_q_norm.weight", (q if whole else spec.head_dim,), F32),
                     (f"blk.{i}.attn_k_norm.weight", (kv if whole else spec.head_dim,), F32)]
        if spec.arch == "gemma2" or post_norms:  # norms after attention and after the MLP
            plan += [(f"blk.{i}.post_attention_norm.weight", (d,), F32)]
        if not post_norms:
            plan += [(f"blk.{i}.ffn_norm.weight", (d,), F32)]
        if spec.experts and i >= spec.dense_lead:  # the router, then each projection's experts stacked
            e, fe, fs = spec.experts, spec.expert_ffn, spec.shared_ffn
            plan += [(f"blk.{i}.ffn_gate_inp.weight", (e, d), F32)]
            if spec.arch == "ernie4_5-moe":  # the router's selection bias
                plan += [(f"blk.{i}.exp_probs_b.bias", (e,), F32)]
            plan += [(f"blk.{i}.ffn_gate_exps.weight", (e, fe, d), Q4_K),
                     (f"blk.{i}.ffn_up_exps.weight", (e, fe, d), Q4_K),
                     (f"blk.{i}.ffn_down_exps.weight", (e, d, fe), wide)]
            if fs:
                plan += [(f"blk.{i}.ffn_gate_shexp.weight", (fs, d), Q4_K),
                         (f"blk.{i}.ffn_up_shexp.weight", (fs, d), Q4_K),
                         (f"blk.{i}.ffn_down_shexp.weight", (d, fs), wide)]
            continue
        plan += [(f"blk.{i}.ffn_gate.weight", (f, d), Q4_K),
                 (f"blk.{i}.ffn_up.weight", (f, d), Q4_K),
                 (f"blk.{i}.ffn_down.weight", (d, f), wide)]
        if spec.arch == "gemma2" or post_norms:
            plan += [(f"blk.{i}.post_ffw_norm.weight", (d,), F32)]
    plan.append(("output_norm.weight", (d,), F32))
    return plan if spec.tied else plan + [("output.weight", (vocab, d), Q6_K)]


# --- the file ---------------------------------------------------------------------------------


def _gpt_oss_plan(spec: SyntheticSpec, vocab: int) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """gpt-oss's tensors, as conversion/gpt_oss.py orders them: F32 biases and sinks beside Q8_0
    attention, a float router, MXFP4 expert stacks."""
    d, q, kv = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    e, fe = spec.experts, spec.expert_ffn
    plan = [("token_embd.weight", (vocab, d), Q8_0)]
    for i in range(spec.layers):
        plan += [(f"blk.{i}.attn_norm.weight", (d,), F32)]
        for name, rows, cols in (("attn_q", q, d), ("attn_k", kv, d), ("attn_v", kv, d), ("attn_output", d, q)):
            plan += [(f"blk.{i}.{name}.weight", (rows, cols), Q8_0), (f"blk.{i}.{name}.bias", (rows,), F32)]
        plan += [(f"blk.{i}.attn_sinks.weight", (spec.heads,), F32), (f"blk.{i}.post_attention_norm.weight", (d,), F32),
                 (f"blk.{i}.ffn_gate_inp.weight", (e, d), F32), (f"blk.{i}.ffn_gate_inp.bias", (e,), F32)]
        for name, rows, cols in (("gate", fe, d), ("up", fe, d), ("down", d, fe)):
            plan += [(f"blk.{i}.ffn_{name}_exps.weight", (e, rows, cols), MXFP4),
                     (f"blk.{i}.ffn_{name}_exps.bias", (e, rows), F32)]  # small random values, as a router's
    return plan + [("output_norm.weight", (d,), F32), ("output.weight", (vocab, d), Q8_0)]


def _value_type(value: object) -> GGUFValueType:
    """The GGUF type llama.cpp's converters write for a tokenizer value of this Python type
    (ids UINT32, token types INT32, scores FLOAT32)."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    raise TypeError(f"no GGUF type for {type(value).__name__}")


def tokenizer_fields(source: Path) -> Iterator[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """Every tokenizer.* key of `source`: (key, value, type, array element type).

    Read with textmill's lean reader (gguf's GGUFReader takes seconds over 49k strings);
    it keeps values, not types, so the types are llama.cpp's for such values."""
    for key, value in read_metadata(source).items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, list):
            sub = _value_type(value[0]) if value else GGUFValueType.UINT32
            if sub == GGUFValueType.UINT32:
                sub = GGUFValueType.INT32  # token_type and other int arrays are INT32
            yield key, value, GGUFValueType.ARRAY, sub
        else:
            yield key, value, _value_type(value), None


def padded(fields: list[tuple[str, object, GGUFValueType, GGUFValueType | None]], vocab: int | None
           ) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """The tokenizer fields with the token table (and its per-token arrays) padded to `vocab`
    entries by unused tokens; unchanged when `vocab` is None."""
    tokens = next(v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens")
    if vocab is None:
        return fields
    if vocab < len(tokens):
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the {vocab} asked for")
    extra = vocab - len(tokens)
    fill = {"tokenizer.ggml.tokens": [f"<|synthetic_unused_{i}|>" for i in range(extra)],
            "tokenizer.ggml.token_type": [5] * extra,  # LLAMA_TOKEN_TYPE_UNUSED
            "tokenizer.ggml.scores": [0.0] * extra}
    return [(k, list(v) + fill[k] if k in fill and isinstance(v, list) and len(v) == len(tokens) else v, t, sub)
            for k, v, t, sub in fields]


def begin_file(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> tuple[GGUFWriter, list, int, Path]:
    """A writer on a temporary name (a half-written file is never cached), the keys all files begin with."""
    fields = padded(list(tokenizer_fields(tokenizer_source)), spec.vocab)
    vocab = len(next(v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    w = GGUFWriter(tmp, spec.arch)
    w.add_name(f"{spec.name} (random weights, textmill bench)")
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.layers)
    return w, fields, vocab, tmp


def write_synthetic(spec: SyntheticSpec, tokenizer_source: Path, path: Path) -> Path:
    w, fields, vocab, tmp = begin_file(spec, tokenizer_source, path)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_rope_dimension_count(spec.head_dim)
    if spec.key_length:
        w.add_key_length(spec.key_length)
        w.add_value_length(spec.key_length)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    if spec.experts:
        w.add_expert_count(spec.experts)
        w.add_expert_used_count(spec.experts_used)
        w.add_expert_feed_forward_length(spec.expert_ffn)
    if spec.arch == "ernie4_5-moe":  # conversion/ernie.py's keys
        w.add_expert_shared_count(spec.shared_ffn // spec.expert_ffn)
        w.add_expert_shared_feed_forward_length(spec.shared_ffn)
        w.add_leading_dense_block_count(spec.dense_lead)
        w.add_interleave_moe_layer_step(1)
    if spec.arch == "gpt-oss":  # conversion/gpt_oss.py's keys, gpt-oss-20b's values
        w.add_sliding_window(128)
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(32.0)
        w.add_rope_scaling_orig_ctx_len(4096)
    if spec.arch == "gemma2":  # what convert_hf_to_gguf.py writes for Gemma 2 (norms are stored as 1 + w)
        w.add_sliding_window(4096)
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    w.add_vocab_size(vocab)
    w.add_file_type(38 if spec.arch == "gpt-oss" else 15)  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE or _Q4_K_M
    w.add_quantization_version(2)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    return write_tensors(w, tensor_plan(spec, vocab), np.random.default_rng(spec.seed), tmp, path)


def write_tensors(w: GGUFWriter, plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType]],
                  rng: np.random.Generator, tmp: Path, path: Path,
                  values: Callable[[str, tuple, np.random.Generator], np.ndarray] | None = None) -> Path:
    """The plan's tensors after the metadata `w` holds, one in memory at a time, then the file
    moved to `path`. `values`: a file's own float32 tensors (None: tensor_bytes' for all)."""
    for name, shape, qtype in plan:
        if qtype == F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            row_bytes = shape[-1] // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]
            rows = int(np.prod(shape[:-1]))
            w.add_tensor_info(name, (*shape[:-1], row_bytes), np.dtype(np.uint8), rows * row_bytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, qtype in plan:
        w.write_tensor_data(values(name, shape, rng) if values and qtype == F32 else tensor_bytes(rng, shape, qtype))
    w.close()
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    d = SYNTHETIC_1B
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in ("hidden", "layers", "heads", "kv_heads", "ffn", "context", "seed"):
        p.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(d, f))
    p.add_argument("--name", default=d.name)
    named = {"qwen3": SYNTHETIC_QWEN3, "8b": SYNTHETIC_8B, "gemma2": SYNTHETIC_GEMMA2, "phi3": SYNTHETIC_PHI3,
             "olmo2": SYNTHETIC_OLMO2, "qwen3moe": SYNTHETIC_QWEN3MOE, "gptoss": SYNTHETIC_GPTOSS,
             "erniemoe": SYNTHETIC_ERNIEMOE}
    for flag, spec in named.items():
        p.add_argument(f"--{flag}", dest=f"spec_{flag}", action="store_true",
                       help=f"the {spec.name} file (other shape flags ignored)")
    p.add_argument("--tokenizer-from", type=Path, default=None,
                   help="GGUF whose tokenizer.* to copy (default: SmolLM2)")
    p.add_argument("--out", type=Path, default=None, help="write here (always) instead of the cache")
    a = p.parse_args(argv)
    spec = SyntheticSpec(name=a.name, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                         ffn=a.ffn, context=a.context, seed=a.seed)
    source = a.tokenizer_from or default_tokenizer_source()
    spec = next((s for flag, s in named.items() if getattr(a, f"spec_{flag}")), spec)
    print(write_synthetic(spec, source, a.out) if a.out else synthetic_path(spec, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
