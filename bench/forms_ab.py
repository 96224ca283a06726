"""A k-quant's own form against the older form it was packed into, on the same GGUF bytes.

Q4_K, Q5_K and Q6_K pack into their super-block forms (q4k, q5k, q6k: the file's 8-bit
scales and super-block halves, 4.625 / 5.625 / 6.5625 bits a weight) or, beside another type
of their width, into q4, q5 and q6 (half scales per group: 5 / 6 / 7 bits). This times both
forms of the same random blocks at one activation row (one decode stream, bound by reading
the weights) and at more rows (bound by the multiply-adds), with the weights cold as in a
decode step: each timing cycles over distinct matrices, --megabytes of them, far more than
the caches. The forms take turns in every round; wall time per call, best of --rounds, at
torch's thread count (the server's). Their outputs differ only by the older forms' rounding
of the scales to halves (the relative difference is printed).

    python bench/forms_ab.py
    python bench/forms_ab.py --types Q4_K --shapes 8192x2048 --rows 1 16 64

Results: bench/results/forms_ab-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# This tree's textmill first (see kernel_ab.py).
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from stamp import write_result  # noqa: E402

from textmill.kernels import load  # noqa: E402

# type -> (GGUF type number, bytes a 256-weight super-block, its d's offset, the own form, the older one)
TYPES = {"Q4_K": (12, 144, 0, "q4k", "q4"), "Q5_K": (13, 176, 0, "q5k", "q5"), "Q6_K": (14, 210, 208, "q6k", "q6")}


def random_rows(qtype: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """n rows of K weights in `qtype`: random codes and scales, sane halves (speed does not
    depend on the values)."""
    _, size, d_at, _, _ = TYPES[qtype]
    blocks = n * k // 256
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    halves = (rng.random((blocks, 2)) * 0.002 + 0.0005).astype(np.float16).view(np.uint8)  # (blocks, 4)
    width = 2 if qtype == "Q6_K" else 4  # Q6_K's d; Q4_K's and Q5_K's d and dmin
    raw[:, d_at:d_at + width] = halves[:, :width]
    return torch.from_numpy(raw.reshape(-1).copy())


def measure(ext, qtype: str, n: int, k: int, rows: list[int], megabytes: float, rounds: int) -> list[dict]:
    number, _, _, own, older = TYPES[qtype]
    rng = np.random.default_rng(n + k)
    count = max(4, int(megabytes * 1e6 / (n * k * 0.6)))
    no_order = [torch.empty(0, dtype=torch.long)]
    raws = [random_rows(qtype, n, k, rng) for _ in range(count)]
    packed = {f: [ext.pack_gguf(f, [r], [number], no_order, k, []) for r in raws] for f in (older, own)}
    del raws
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y = {f: getattr(ext, f"{f}_linear")(x, packed[f][0], n) for f in packed}
        rel = ((y[own] - y[older]).norm() / y[older].norm()).item()
        best = {f: float("inf") for f in packed}
        for _ in range(rounds):
            for f, ws in packed.items():
                op = getattr(ext, f"{f}_linear")
                t = time.perf_counter()
                for w in ws:
                    op(x, w, n)
                best[f] = min(best[f], (time.perf_counter() - t) / len(ws))
        out.append({"type": qtype, "n": n, "k": k, "m": m, "older": older, "own": own,
                    "older_us": 1e6 * best[older], "own_us": 1e6 * best[own], "own_over_older": best[own] / best[older],
                    "older_bytes": packed[older][0].numel(), "own_bytes": packed[own][0].numel(), "relative_difference": rel})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    ap.add_argument("--shapes", nargs="+", default=["1024x2048", "3072x1024", "8192x2048", "2048x8192"],
                    help="N x K (K a multiple of 256)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--megabytes", type=float, default=250, help="distinct weights cycled over per timing")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    ext = load("quant")
    results = [r for qtype in args.types for shape in args.shapes
               for r in measure(ext, qtype, *map(int, shape.split("x")), args.rows, args.megabytes, args.rounds)]
    print(f"threads {torch.get_num_threads()}, isa {ext.isa()}, weights cold ({args.megabytes:.0f} MB cycled)")
    print("| type | N x K | M | older form us (GB/s) | own form us (GB/s) | own / older | relative difference |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['type']} | {r['n']}x{r['k']} | {r['m']} | {r['older']} {r['older_us']:.1f} "
              f"({r['older_bytes'] / r['older_us'] / 1e3:.1f}) | {r['own']} {r['own_us']:.1f} "
              f"({r['own_bytes'] / r['own_us'] / 1e3:.1f}) | {r['own_over_older']:.3f} | {r['relative_difference']:.1e} |")
    write_result("forms_ab", {"threads": torch.get_num_threads(), "isa": ext.isa(), "megabytes": args.megabytes,
                              "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
