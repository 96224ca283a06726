"""One decode stream is bound by reading the weights: how close does textmill come, and where is the ceiling?

At one stream every weight is read once per token, so tokens/s <= read bandwidth / bytes
read per token. This measures, in one run on this machine:

1. the machine's read ceiling: a plain streaming read (512-bit or 256-bit loads, OpenMP,
   nothing computed) over a buffer far larger than the caches, at 1 and at all threads;
2. what textmill's quantized kernels move at one activation row (q4_linear / q8_linear on
   Gemma 3's head shape and a 1B-class MLP shape): packed bytes / time;
3. per model of the matrix, the bytes one token reads in textmill's packed form and in the
   file's own types (what llama.cpp reads), and the tokens/s each would reach at the
   ceiling: the most one stream can do, whoever runs it.

    python bench/bandwidth.py                       # bundled SmolLM2, Gemma 3, synthetic 1B
    python bench/bandwidth.py --model ~/my.gguf

Results: bench/results/bandwidth-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from stamp import code_stamp, machine_label, machine_stamp  # noqa: E402

from textmill.kernels import load  # noqa: E402

# A read loop the compiler cannot drop: the OR of every 64-byte line ends up in the result.
READ_SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
int64_t stream_read(const torch::Tensor& buf, int64_t threads) {
  const auto* p = buf.data_ptr<uint8_t>();
  const int64_t n = buf.numel() / 256 * 256;
  int64_t out = 0;
  #pragma omp parallel for num_threads(threads) reduction(|:out) schedule(static)
  for (int64_t i = 0; i < n; i += 256) {
#if defined(__AVX512F__)
    __m512i a = _mm512_or_si512(_mm512_load_si512(p + i), _mm512_load_si512(p + i + 64));
    __m512i b = _mm512_or_si512(_mm512_load_si512(p + i + 128), _mm512_load_si512(p + i + 192));
    out |= _mm512_reduce_or_epi64(_mm512_or_si512(a, b));
#else
    __m256i a = _mm256_setzero_si256();
    for (int j = 0; j < 256; j += 32) a = _mm256_or_si256(a, _mm256_load_si256((const __m256i*)(p + i + j)));
    out |= _mm256_extract_epi64(a, 0) | _mm256_extract_epi64(a, 1) | _mm256_extract_epi64(a, 2) | _mm256_extract_epi64(a, 3);
#endif
  }
  return out;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("stream_read", &stream_read); }
"""

# Bits per weight a token reads: the file's types (llama.cpp computes on them as stored) and
# textmill's packed forms (kernels/csrc/quant.cpp: q4 = 4-bit codes + f16 scale and min per
# 32; q5 = q4 + a plane of top bits; q6 = 6-bit codes + f16 scale per 16; q3 = 3-bit codes +
# f16 scale per 16; q2 = 2-bit codes + f16 scale and min per 16; iq2 = 4-bit indices + f16 scale per 16; q4k/q5k/q6k =
# the k-quants' own scales (8 bits a group or half, halves a super-block); iq4, mxfp4 = 4-bit indices
# + f16 scale per 32; q8 = 8-bit codes + f16 scale per 32; what each file type is packed to:
# loader/group_codes.py's table).
FILE_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q4_0": 4.5, "Q4_1": 5, "Q5_0": 5.5, "Q5_1": 6, "Q8_0": 8.5,
             "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "IQ4_NL": 4.5,
             "IQ4_XS": 4.25, "IQ2_XXS": 2.0625, "IQ2_XS": 2.3125, "IQ2_S": 2.5625, "IQ3_XXS": 3.0625,
             "IQ3_S": 3.4375, "IQ1_S": 1.5625, "IQ1_M": 1.75, "MXFP4": 4.25}
_FORM_BITS = {"q2": 4.0, "q3": 4.0, "q4": 5.0, "q5": 6.0, "q6": 7.0, "iq4": 4.5, "mxfp4": 4.5, "iq2": 5.0,
              "q8": 8.5, "q4k": 4.625, "q5k": 5.625, "q6k": 6.5625}
_FORM_OF = {"Q4_0": "q4", "Q4_1": "q4", "Q4_K": "q4k", "Q5_0": "q5", "Q5_1": "q5", "Q5_K": "q5k", "Q6_K": "q6k",
            "Q3_K": "q3", "Q2_K": "q2", "IQ4_NL": "iq4", "IQ4_XS": "iq4", "IQ3_S": "q4", "IQ1_S": "q4", "IQ3_XXS": "q6", "IQ1_M": "q6",
            "IQ2_XXS": "iq2", "IQ2_XS": "iq2", "IQ2_S": "iq2", "MXFP4": "mxfp4"}
PACKED_BITS = {t: _FORM_BITS[_FORM_OF.get(t, "q8")] for t in FILE_BITS}


def read_ceiling(ext, gib: float, threads: int, rounds: int) -> float:
    buf = torch.empty(int(gib * 2**30), dtype=torch.uint8)
    buf.fill_(1)  # touch every page before timing
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        ext.stream_read(buf, threads)
        best = min(best, time.perf_counter() - t)
    return buf.numel() / best / 1e9


def kernel_rate(quant, mode: str, n: int, k: int, rounds: int) -> float:
    """GB/s of packed weights one activation row streams through; enough copies of the
    matrix to pass 512 MB, so that no round finds its weights in the caches."""
    first = getattr(quant, f"{mode}_pack")(torch.randn(n, k) * 0.02)
    size = first.numel() * first.element_size()
    copies = [first] + [first.clone() for _ in range(max(0, -(-(512 << 20) // size) - 1))]
    x = torch.randn(1, k)
    run = getattr(quant, f"{mode}_linear")
    run(x, first, n)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for packed in copies:
            run(x, packed, n)
        best = min(best, (time.perf_counter() - t) / len(copies))
    return size / best / 1e9


def token_bytes(path: Path) -> dict:
    """Bytes of the matmul weights one token reads (the embedding table only where it is
    also the head: a lookup reads one row), in the file's types and in textmill's packing."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    file_b = packed_b = 0.0
    for t in reader.tensors:
        if len(t.shape) < 2 or (t.name == "token_embd.weight" and not tied):
            continue
        kind = t.tensor_type.name
        n = int(t.n_elements)
        file_b += n * FILE_BITS.get(kind, 32) / 8
        packed_b += n * PACKED_BITS.get(kind, 8.5) / 8
    return {"file_mb": file_b / 1e6, "textmill_mb": packed_b / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3", "synthetic-1b"])
    ap.add_argument("--model", action="append", default=[], help="also a GGUF file of your own")
    ap.add_argument("--gib", type=float, default=1.0, help="size of the read buffer")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from torch.utils import cpp_extension

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch:
        ext = cpp_extension.load_inline("textmill_bw_probe", cpp_sources=[READ_SRC], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                        extra_ldflags=["-fopenmp"], build_directory=scratch)
        ceiling = {n: read_ceiling(ext, args.gib, n, args.rounds) for n in sorted({1, threads})}
    quant = load("quant")
    kernels = {f"{mode} {n}x{k}": kernel_rate(quant, mode, n, k, args.rounds)
               for mode in ("q8", "q4") for n, k in ((262144, 640), (8192, 2048))}
    from models import resolve  # bench/models.py: the matrix's files

    files = [(key, resolve(key)) for key in args.models] + [(Path(p).name, Path(p)) for p in args.model]
    peak = max(ceiling.values())
    rows = []
    for key, path in files:
        b = token_bytes(path)
        rows.append({"model": key, **b, "ceiling_tok_s_textmill": peak * 1e3 / b["textmill_mb"],
                     "ceiling_tok_s_file": peak * 1e3 / b["file_mb"]})
    print("read ceiling, GB/s: " + ", ".join(f"{n} thread(s) {v:.1f}" for n, v in ceiling.items()))
    print("| kernel, one row | GB/s | of the ceiling |")
    print("|---|---:|---:|")
    for name, v in kernels.items():
        print(f"| {name} | {v:.1f} | {v / peak:.0%} |")
    print("| model | MB/token textmill | MB/token file types | tok/s ceiling textmill | tok/s ceiling file types |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['textmill_mb']:.0f} | {r['file_mb']:.0f} | {r['ceiling_tok_s_textmill']:.0f} | {r['ceiling_tok_s_file']:.0f} |")
    out = ROOT / "bench" / "results" / f"bandwidth-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"code": code_stamp(), "machine": machine_stamp(), "threads": threads,
                               "read_ceiling_gb_s": ceiling, "kernels_gb_s": kernels, "models": rows}, indent=1))
    print(f"{machine_label(machine_stamp())}; {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
