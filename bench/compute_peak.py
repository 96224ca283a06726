"""The machine's multiply-add peak, and how much of it the quantized matmul kernels reach.

Batched decode and prefill are bound by multiply-adds, not by reading weights: this puts a
number on the ceiling. It times two tight loops of independent 512-bit instructions (or
256-bit where the CPU has no AVX-512), compiled here with -march=native:

- vpdpbusd: the int8 multiply-add every 4- to 8-bit kernel is built on (4 per 32-bit lane);
- vfmadd: float32 FMA, what paged attention and the float paths run on;
- the kernels' mix: 8 vpdpbusd and 4 vfmadd, the float steps a q4 block ends with per
  output vector (convert, scale, two FMAs: quant.cpp's Q4Block::finish) after its 8 integer
  multiply-adds. Where the float and the integer multiply-adds issue on the same ports (a
  2-vCPU Ice Lake: one 512-bit port), this mix is the most a per-32-scale kernel can reach;
  where they have ports of their own, it is the int8 peak again;

on 1 and on all threads (one loop per thread, no shared data), then q4_linear and
q8_linear (weights packed from float, as QLinear does) at the given shapes and rows, as
GMAC/s and as a share of the vpdpbusd peak on the same number of threads. Weights of the
default shapes (a 1B's gate/up and down) fit in L3 only partly: this measures the
kernels' arithmetic, as in batched decode, where each weight tile serves every row.

    python bench/compute_peak.py
    python bench/compute_peak.py --shapes 11264x2048 --rows 16 64 256 --threads 1

Results: bench/results/compute_peak-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from stamp import write_result  # noqa: E402

from textmill.kernels import load  # noqa: E402

# Ten independent accumulators per thread (the mix: 8 integer and 4 float), more than the
# instructions' latency (4-5 cycles) times their throughput, so the loop measures throughput.
# x and y pass through an empty asm every iteration, and x again after every dot: the no-VNNI
# AVX2 dot (maddubs, madd) reads only them, and the compiler would otherwise hoist it out of
# the loop, or compute it once for all ten chains and time the adds alone (on Zen 3 a "peak"
# of 257 G multiply-adds a thread where the real one is 98). The empty asm on each
# accumulator keeps the compiler from collapsing the chains.
SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstring>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
using IV = __m512i; using FV = __m512;
static inline IV dp(IV a, IV x, IV y) { return _mm512_dpbusd_epi32(a, x, y); }
static inline IV iset(int v) { return _mm512_set1_epi32(v); }
static inline FV fm(FV a, FV x, FV y) { return _mm512_fmadd_ps(a, x, y); }
static inline FV fset(float v) { return _mm512_set1_ps(v); }
static const int LANES = 16; static const char* ISA = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
using IV = __m256i; using FV = __m256;
#if defined(__AVXVNNI__)
static inline IV dp(IV a, IV x, IV y) { return _mm256_dpbusd_avx_epi32(a, x, y); }
static const char* ISA = "avx2+avx-vnni";
#else  // no VNNI: maddubs + madd + add, the AVX2 kernels' own sequence
static inline IV dp(IV a, IV x, IV y) {
  return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1)));
}
static const char* ISA = "avx2 (maddubs)";
#endif
static inline IV iset(int v) { return _mm256_set1_epi32(v); }
static inline FV fm(FV a, FV x, FV y) { return _mm256_fmadd_ps(a, x, y); }
static inline FV fset(float v) { return _mm256_set1_ps(v); }
static const int LANES = 8;
#endif

#define TEN(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9)

#define EIGHT(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define FOUR(X) X(0) X(1) X(2) X(3)

enum Loop { kDot, kFma, kMix };

// Instructions per second over `threads` threads, each running `iters` x 10 of them (the
// mix: int8 dot instructions, iters x 8 of them beside iters x 4 FMAs).
template <Loop L>
static double rate(int64_t iters, int threads) {
  auto t0 = std::chrono::steady_clock::now();
  double sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    if constexpr (L == kMix) {
      IV x = iset(0x03030303), y = iset(0x05050505);
      const FV u = fset(0.999f), w = fset(0.001f);
#define DECL(i) IV a##i = iset(i);
      EIGHT(DECL)
#undef DECL
#define DECL(i) FV c##i = fset(float(i));
      FOUR(DECL)
#undef DECL
      for (int64_t n = 0; n < iters; ++n) {
        asm volatile("" : "+v"(x), "+v"(y));  // not loop-invariant: no hoisted multiply
#define STEP(i) a##i = dp(a##i, x, y); asm volatile("" : "+v"(a##i), "+v"(x));
        EIGHT(STEP)
#undef STEP
#define STEP(i) c##i = fm(c##i, u, w); asm volatile("" : "+v"(c##i));
        FOUR(STEP)
#undef STEP
      }
#define ADD(i) { int32_t v; std::memcpy(&v, &a##i, 4); sink += v; }
      EIGHT(ADD)
#undef ADD
#define ADD(i) { float v; std::memcpy(&v, &c##i, 4); sink += v; }
      FOUR(ADD)
#undef ADD
    } else if constexpr (L == kDot) {
      IV x = iset(0x03030303), y = iset(0x05050505);
#define DECL(i) IV a##i = iset(i);
      TEN(DECL)
#undef DECL
      for (int64_t n = 0; n < iters; ++n) {
        asm volatile("" : "+v"(x), "+v"(y));  // not loop-invariant: no hoisted multiply
#define STEP(i) a##i = dp(a##i, x, y); asm volatile("" : "+v"(a##i), "+v"(x));
        TEN(STEP)
#undef STEP
      }
#define ADD(i) { int32_t v; std::memcpy(&v, &a##i, 4); sink += v; }
      TEN(ADD)
#undef ADD
    } else {
      FV x = fset(0.999f), y = fset(0.001f);
#define DECL(i) FV a##i = fset(float(i));
      TEN(DECL)
#undef DECL
      for (int64_t n = 0; n < iters; ++n) {
        asm volatile("" : "+v"(x), "+v"(y));  // not loop-invariant: no hoisted multiply
#define STEP(i) a##i = fm(a##i, x, y); asm volatile("" : "+v"(a##i));
        TEN(STEP)
#undef STEP
      }
#define ADD(i) { float v; std::memcpy(&v, &a##i, 4); sink += v; }
      TEN(ADD)
#undef ADD
    }
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (sink == 12345.678) std::printf(" ");  // keep the results alive
  return (L == kMix ? 8.0 : 10.0) * iters * threads / s;
}

std::vector<double> peak(int64_t iters, int64_t threads) {
  return {rate<kDot>(iters, threads), rate<kFma>(iters, threads), double(LANES), rate<kMix>(iters, threads)};
}
std::string isa() { return ISA; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("peak", &peak, "[int8 dot instr/s, fma instr/s, 32-bit lanes, int8 dot instr/s beside half as many FMAs]");
  m.def("isa", &isa);
}
"""


def build():
    """The loops above, built once into textmill's kernel cache (rebuilt when SOURCE changes)."""
    from torch.utils import cpp_extension

    from textmill.kernels.build import _cache_root

    build_dir = _cache_root() / "compute-peak"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load_inline(name="textmill_compute_peak", cpp_sources=[SOURCE], functions=None,
                                     extra_cflags=["-O2", "-march=native", "-fopenmp"],
                                     extra_ldflags=["-fopenmp"], build_directory=str(build_dir))


def kernel_rate(ext, mode: str, n: int, k: int, m: int, rounds: int) -> float:
    g = torch.Generator().manual_seed(n + k + m)
    packed = getattr(ext, f"{mode}_pack")(torch.randn(n, k, generator=g) * 0.02)
    x = torch.randn(m, k, generator=g)
    linear = getattr(ext, f"{mode}_linear")
    linear(x, packed, n)
    reps = max(1, int(2e9 // (n * k * m)))
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            linear(x, packed, n)
        best = min(best, (time.perf_counter() - t) / reps)
    return n * k * m / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shapes", nargs="+", default=["11264x2048", "2048x5632"], help="N x K of the weights")
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--modes", nargs="+", default=["q4", "q8"],
                    choices=["q2", "q3", "q4", "q5", "q6", "q8", "iq4", "mxfp4", "iq2", "q4k", "q5k", "q6k"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    peak_ext, quant = build(), load("quant")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak_ext.peak(2_000_000, threads)  # warm the clocks up
        dot, fma, lanes, mix = max((peak_ext.peak(20_000_000, threads) for _ in range(3)), key=lambda r: r[0])
        dot_gmac, fma_gflop = dot * lanes * 4 / 1e9, fma * lanes / 1e9
        rows.append({"threads": threads, "what": f"int8 dot peak ({peak_ext.isa()})", "gmac_s": dot_gmac, "share": 1.0})
        rows.append({"threads": threads, "what": "float32 FMA peak", "gmac_s": fma_gflop, "share": None})
        rows.append({"threads": threads, "what": "int8 dot beside 4 FMAs per 8 (the kernels' mix)",
                     "gmac_s": mix * lanes * 4 / 1e9, "share": mix * lanes * 4 / 1e9 / dot_gmac})
        for mode in args.modes:
            for shape in args.shapes:
                n, k = map(int, shape.split("x"))
                for m in args.rows:
                    rate = kernel_rate(quant, mode, n, k, m, args.rounds)
                    rows.append({"threads": threads, "what": f"{mode}_linear {n}x{k}, {m} rows", "gmac_s": rate,
                                 "share": rate / dot_gmac})
    print("| threads | what | G multiply-adds/s | share of the int8 peak |")
    print("|---:|---|---:|---:|")
    for r in rows:
        share = "" if r["share"] is None else f"{100 * r['share']:.0f}%"
        print(f"| {r['threads']} | {r['what']} | {r['gmac_s']:.0f} | {share} |")
    write_result("compute_peak", {"results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
