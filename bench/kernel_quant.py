"""Micro-benchmark: QLinear's q4 / q8 kernels against float32 F.linear (MKL), SmolLM2 shapes.

    .venv/bin/python bench/kernel_quant.py                 # all shapes, M in 1 4 16 64 256, 1 and 2 threads
    .venv/bin/python bench/kernel_quant.py --quick         # fewer rounds
    .venv/bin/python bench/kernel_quant.py --shapes down head --m 1 16 --threads 1

Method: for each shape and M, the three variants run in rounds, interleaved (f32, q4, q8,
f32, ...), each a few calls per round; a cell is the minimum over rounds of the mean call
time, in microseconds, and its ratio to float32 (< 1: faster). Every variant cycles
through enough copies of its weights to exceed --cache-mb (default 64 MB, 8x this
machine's L3), so weights come from memory as in a real decode step, where the model's
100+ MB of weights never stay in cache. `others%` is the CPU share that other processes
took during the row (cpuwatch.py): on 2 shared cores anything above a few percent
inflates that row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuwatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from textmill.kernels import load  # noqa: E402

# SmolLM2-135M: hidden 576, 9 q + 3 kv heads of 64, MLP 1536, vocab 49152 (K -> N)
SHAPES = {
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "head": (576, 49152),
}


def copies_for(nbytes: int, cache_bytes: int) -> int:
    return max(1, -(-cache_bytes // nbytes))


def make_variants(ext, k: int, n: int, m: int, cache_bytes: int):
    w = torch.randn(n, k) * 0.05
    x = torch.randn(m, k)
    f32 = [w.clone() for _ in range(copies_for(w.numel() * 4, cache_bytes))]
    p4 = ext.q4_pack(w)
    q4 = [p4.clone() for _ in range(copies_for(p4.numel(), cache_bytes))]
    p8 = ext.q8_pack(w)
    q8 = [p8.clone() for _ in range(copies_for(p8.numel(), cache_bytes))]
    state = {"f32": 0, "q4": 0, "q8": 0}

    def nxt(name, pool):
        state[name] = (state[name] + 1) % len(pool)
        return pool[state[name]]

    return {
        "f32": lambda: F.linear(x, nxt("f32", f32)),
        "q4": lambda: ext.q4_linear(x, nxt("q4", q4), n),
        "q8": lambda: ext.q8_linear(x, nxt("q8", q8), n),
    }


def measure(variants: dict, budget_s: float, rounds: int) -> dict[str, float]:
    for fn in variants.values():  # warm-up: first-touch, thread pool
        fn()
    # calls per round: about budget_s / rounds / #variants of the slowest variant
    t = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()
        t[name] = time.perf_counter() - t0
    calls = max(1, int(budget_s / rounds / len(variants) / max(t.values())))
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    return {name: v * 1e6 for name, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--cache-mb", type=float, default=64.0)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=1.5, help="seconds per cell (all rounds, all variants)")
    ap.add_argument("--quick", action="store_true", help="5 rounds, 0.5 s per cell")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.budget = 5, 0.5
    ext = load("quant")
    if ext is None:
        sys.exit("the quant C++ extension did not build (see the warning above)")
    cache_bytes = int(args.cache_mb * 2**20)
    print(f"quant kernels: {ext.isa()}; torch {torch.__version__}; weights cycled over >= {args.cache_mb:g} MB per variant")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread{'s' if threads > 1 else ''}: microseconds per call (ratio to float32)")
        print(f"{'shape':<8} {'K->N':>11} {'M':>4} {'f32':>10} {'q4':>10} {'':>6} {'q8':>10} {'':>6} {'others%':>8}")
        for shape in args.shapes:
            k, n = SHAPES[shape]
            for m in args.m:
                before = cpuwatch.snapshot()
                r = measure(make_variants(ext, k, n, m, cache_bytes), args.budget, args.rounds)
                others = cpuwatch.others_share(before, cpuwatch.snapshot())
                print(f"{shape:<8} {f'{k}->{n}':>11} {m:>4} {r['f32']:>10.0f} {r['q4']:>10.0f} "
                      f"{r['q4'] / r['f32']:>6.2f} {r['q8']:>10.0f} {r['q8'] / r['f32']:>6.2f} {100 * others:>7.0f}%",
                      flush=True)


if __name__ == "__main__":
    main()
