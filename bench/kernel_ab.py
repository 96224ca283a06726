"""The quantized linear kernels of this tree against those of another git revision, side by side.

Builds kernels/csrc/quant.cpp (and its headers) as it was at --rev into a scratch folder,
then times q4_linear / q8_linear of both builds on the same packed weights and inputs,
alternating old and new in every round, and checks the outputs are bitwise equal. Times
are CPU time of one thread (time.process_time), best of --rounds: on a machine shared with
other work that is steadier than wall time, though memory bandwidth is still shared. Each
side writes into an output buffer of its own, reused call after call, as the engine does
(a fresh result of 32 MiB or more would be a fresh mmap and its page faults).

    python bench/kernel_ab.py --rev HEAD~1
    python bench/kernel_ab.py --rev 4493961 --shapes 262144x640 8192x2048 --rows 1 16 64
    python bench/kernel_ab.py --rev HEAD~1 --modes act --shapes 3072x576 576x1536 --rows 64 256

(`--modes act` times the activation quantizer alone, at each shape's K. `--cflags` builds
both sides with more flags: `--cflags=-mno-avx512f` times the AVX2 path on an AVX-512 machine.
`--cold` takes the weights from memory, as a step's layers find them: each call reads the
next of enough copies to pass COLD_BYTES, on every thread, timed by the wall clock.)

Results: bench/results/kernel_ab-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# This tree's textmill first: a worktree that shares another checkout's virtual environment
# would otherwise import (and build) that checkout's kernels as "this tree".
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from revision import build_at  # noqa: E402
from stamp import write_result  # noqa: E402

from textmill.kernels import load  # noqa: E402
from textmill.kernels.build import build_variant  # noqa: E402
from textmill.runner.weight_arena import WeightArena  # noqa: E402

# --cold: the copies of a weight a timing cycles through, in all. Several times any last-level
# cache of the project's machines (32 MiB on Zen 4), so every call reads its weights from
# memory, as a decode step does: a model's layers together are larger than the cache.
COLD_BYTES = 256 << 20


def round_times(run: dict, reps: int, rounds: int, clock=time.process_time) -> dict:
    """Each callable's time per call in each of `rounds` by `clock`, the callables taking
    turns (and the first of a round alternating, so that neither always follows the other)."""
    times = {name: [] for name in run}
    for r in range(rounds):
        for name, f in (list(run.items()) if r % 2 == 0 else list(run.items())[::-1]):
            t = clock()
            for _ in range(reps):
                f()
            times[name].append((clock() - t) / reps)
    return times


def summary(times: dict) -> dict:
    """Best and median per call of each side, and new over old by both. The best round is
    the one least disturbed; the median also counts what a call pays now and then (a
    thread preempted at a parallel call's join), which 2-thread timings on a shared
    machine show."""
    best = {name: min(v) for name, v in times.items()}
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"old_ms": 1e3 * best["old"], "new_ms": 1e3 * best["new"], "new_over_old": best["new"] / best["old"],
            "old_median_ms": 1e3 * med["old"], "new_median_ms": 1e3 * med["new"],
            "median_new_over_old": med["new"] / med["old"]}


def measure(old, new, mode: str, n: int, k: int, m: int, rounds: int, cold: bool = False) -> dict:
    g = torch.Generator().manual_seed(n * 31 + k * 7 + m)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    # Each build packs the weights itself: the packed layout may differ between revisions.
    packed = {name: getattr(ext, f"{mode}_pack")(w) for name, ext in (("old", old), ("new", new))}
    copies = max(2, -(-COLD_BYTES // packed["new"].numel())) if cold else 1
    # The copies on the engine's pages: side by side in a weight arena (2 MiB pages where
    # the kernel gives them), as GGUF weights are packed (runner/weight_arena.py).
    arena = WeightArena()
    weights = {name: [p] + [arena.take(p.numel()).copy_(p) for _ in range(copies - 1)] for name, p in packed.items()}
    calls = {name: itertools.cycle(ws) for name, ws in weights.items()}
    # Into a buffer of each side's own, reused call after call, as the engine's layers and
    # head write theirs (qlinear's `output` rows): a fresh (m, n) result of 32 MiB or more
    # is a fresh mmap in glibc, and its page faults took a third of a 64-row call's time on
    # Gemma 3's head (Zen 4), which no step pays.
    outs = {name: torch.empty(m, n) for name in ("old", "new")}
    run = {name: (lambda ext=ext, name=name: getattr(ext, f"{mode}_linear")(x, next(calls[name]), n, out=outs[name]))
           for name, ext in (("old", old), ("new", new))}
    same = torch.equal(run["old"](), run["new"]())
    reps = max(1, int(2e8 // (n * k * max(m, 4))))  # ~the same work per timing at every shape
    if cold:  # at least one pass over the copies, so that each timing reads them all from memory
        reps = max(reps, copies)
    times = round_times(run, reps, rounds, time.perf_counter if cold else time.process_time)
    return {"mode": mode, "n": n, "k": k, "m": m, **summary(times), "bitwise_equal": same}


def measure_act(old, new, k: int, m: int, rounds: int) -> dict:
    """The activation quantizer every linear runs first (quantize_act: int8 codes, scales and
    scaled sums per group of 32), old build against new, on the same rows."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k * 7 + m))
    run = {"old": lambda: old.quantize_act(x, 0), "new": lambda: new.quantize_act(x, 0)}
    same = all(torch.equal(a, b) for a, b in zip(run["old"](), run["new"]()))
    times = round_times(run, reps=max(1, int(2e7 // (k * m))), rounds=rounds)
    return {"mode": "act", "n": 0, "k": k, "m": m, **summary(times), "bitwise_equal": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--modes", nargs="+", default=["q8", "q4"],
                    choices=["q8", "q4", "q5", "q6", "iq4", "mxfp4", "q3", "iq2", "q2", "q4k", "q5k", "q6k", "act"],
                    help="weight forms; act: the activation quantizer alone, at each shape's K")
    ap.add_argument("--shapes", nargs="+", default=["262144x640", "8192x2048", "2048x8192"],
                    help="N x K of the weights (262144x640: Gemma 3's head)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cflags", default="", help="more compiler flags for both builds (e.g. -mno-avx512f)")
    ap.add_argument("--cold", action="store_true",
                    help="weights from memory (copies past the cache), every thread, wall-clock time")
    args = ap.parse_args()
    if not args.cold:
        torch.set_num_threads(1)
    flags = tuple(args.cflags.split())
    new = build_variant("quant", "ab-" + re.sub(r"\W+", "_", "".join(flags)), list(flags)) if flags else load("quant")
    with tempfile.TemporaryDirectory() as scratch:
        old = build_at(args.rev, Path(scratch), "quant", flags)
        results = [measure_act(old, new, int(shape.split("x")[1]), m, args.rounds) if mode == "act"
                   else measure(old, new, mode, *map(int, shape.split("x")), m, args.rounds, args.cold)
                   for mode in args.modes for shape in args.shapes for m in args.rows]
    print(f"| mode | N x K | M | {args.rev} ms | this tree ms | new / old (best) | new / old (median) "
          "| bitwise equal |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['mode']} | {r['n']}x{r['k']} | {r['m']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | "
              f"{r['new_over_old']:.2f} | {r['median_new_over_old']:.2f} | {'yes' if r['bitwise_equal'] else 'NO'} |")
    print(f"isa: {args.rev} {old.isa()}, this tree {new.isa()}" + (f" (--cflags {args.cflags})" if flags else ""))
    threads = torch.get_num_threads()
    print(f"{'weights from memory, wall clock' if args.cold else 'weights cached, CPU time'}, {threads} thread(s)")
    write_result("kernel_ab", {"rev": args.rev, "threads": threads, "cold": args.cold, "cflags": args.cflags,
                               "isa": new.isa(), "results": results})
    return 0 if all(r["bitwise_equal"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
