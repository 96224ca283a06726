"""A weight stored in parts of different forms (a Q4_K_M file's Q4_K q/k beside a Q6_K v):
the parts in one kernel call (linear_parts) against one call a part and a concatenation, as
the runner ran them before, side by side.

Both read the weights from memory, as a decode step's layers find them: each call takes the
next of enough copies to pass COLD_BYTES. Wall-clock time on every thread, best of --rounds,
the two ways taking turns; the outputs are checked bitwise equal.

    python bench/parts_ab.py
    python bench/parts_ab.py --rows 1 16 64 --rounds 9

Results: bench/results/parts_ab-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from kernel_ab import COLD_BYTES, round_times  # noqa: E402
from stamp import write_result  # noqa: E402

from textmill.kernels import load  # noqa: E402

# (name, K, parts): the two-part qkv of the matrix's Q4_K_M models, as their files store it
# in every other layer (Q6_K v where llama.cpp gives attn_v more bits).
SHAPES = [
    ("Qwen3 0.6B qkv", 1024, (("q4k", 3072), ("q6k", 1024))),
    ("1B qkv", 2048, (("q4k", 2560), ("q6k", 512))),
    ("Llama 3 8B qkv", 4096, (("q4k", 5120), ("q6k", 1024))),
]


def measure(ext, name: str, k: int, spec: tuple, m: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(k + m)
    weights = [(form, getattr(ext, f"{form}_pack")(torch.randn(n, k, generator=g) * 0.05), n) for form, n in spec]
    nbytes = sum(p.numel() for _, p, _ in weights)
    copies = max(2, -(-COLD_BYTES // nbytes))
    sets = [weights] + [[(f, p.clone(), n) for f, p, n in weights] for _ in range(copies - 1)]
    x = torch.randn(m, k, generator=g)

    def separate(ws):
        return torch.cat([getattr(ext, f"{form}_linear")(x, packed, n) for form, packed, n in ws], dim=-1)

    def together(ws):
        return ext.linear_parts(x, [(ext.mode_number(form), packed, n, None) for form, packed, n in ws])

    same = torch.equal(separate(sets[0]), together(sets[0]))
    # Each timing is one pass over the copies, so that every call reads its weights from memory.
    cycles = {"separate": itertools.cycle(sets), "one_call": itertools.cycle(sets)}
    run = {"separate": lambda: separate(next(cycles["separate"])),
           "one_call": lambda: together(next(cycles["one_call"]))}
    best = {side: min(v) for side, v in round_times(run, copies, rounds, time.perf_counter).items()}
    return {"name": name, "k": k, "parts": [list(p) for p in spec], "m": m, "mib": nbytes / 2**20,
            "separate_us": 1e6 * best["separate"], "one_call_us": 1e6 * best["one_call"],
            "one_over_separate": best["one_call"] / best["separate"], "bitwise_equal": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    ext = load("quant")
    if ext is None:
        print("the quant C++ extension is not available here")
        return 1
    results = [measure(ext, name, k, spec, m, args.rounds) for name, k, spec in SHAPES for m in args.rows]
    print("| weight | parts | MiB | M | separate + cat us | one call us | one / separate | bitwise equal |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        parts = " + ".join(f"{form} {n}" for form, n in r["parts"])
        print(f"| {r['name']} | {parts} | {r['mib']:.2f} | {r['m']} | {r['separate_us']:.1f} | {r['one_call_us']:.1f} | "
              f"{r['one_over_separate']:.2f} | {'yes' if r['bitwise_equal'] else 'NO'} |")
    print(f"weights from memory, wall clock, {torch.get_num_threads()} thread(s), isa {ext.isa()}")
    write_result("parts_ab", {"threads": torch.get_num_threads(), "isa": ext.isa(), "results": results})
    return 0 if all(r["bitwise_equal"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
