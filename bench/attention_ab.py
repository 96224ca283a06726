"""Decode paged attention of this tree against another git revision's, side by side.

Builds kernels/csrc/layer.cpp as it was at --rev into a scratch folder, then times
paged_attention of both builds on the same float16 pool and queries (one decode row per
sequence, the shapes of the matrix's models), alternating old and new in every round, and
checks the outputs are bitwise equal. Two pool states per scenario:

- dram: a 300 MB pool with each sequence's blocks scattered over it, and a 64 MB read
  between calls, so K and V come from memory as in a step (30 layers' pools, the weights
  between them);
- cache: the pool just big enough, read call after call from L2/L3.

Times are wall time of one call, the median over --rounds (the machine is shared; medians
keep the slow rounds in view without letting one outlier decide).

    python bench/attention_ab.py --rev HEAD~1
    python bench/attention_ab.py --rev 358227e --threads 1 2 --rounds 40
    python bench/attention_ab.py --rev HEAD --cflags=-mno-avx512f   # the AVX2 path

Results: bench/results/attention_ab-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import re
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

BLOCK = 16
# name -> (sequences, context, q heads, kv heads, head dim)
SCENARIOS = {
    "smollm2 64 seqs ctx 100": (64, 100, 9, 3, 64),
    "smollm2 16 seqs ctx 1000": (16, 1000, 9, 3, 64),
    "gemma3 1 seq ctx 100": (1, 100, 4, 1, 256),
    "gemma3 16 seqs ctx 300": (16, 300, 4, 1, 256),
    "1b 16 seqs ctx 300": (16, 300, 32, 8, 64),
    "1b 1 seq ctx 300": (1, 300, 32, 8, 64),
    "qwen3 16 seqs ctx 300": (16, 300, 16, 8, 128),
}


def measure(old, new, name: str, dram: bool, threads: int, rounds: int, flush: torch.Tensor) -> dict:
    seqs, ctx, hq, hkv, d = SCENARIOS[name]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seqs * 7 + ctx)
    per_seq = -(-ctx // BLOCK)
    slot_bytes = 2 * hkv * d * 2
    blocks = max(seqs * per_seq + 8, (300 << 20) // (slot_bytes * BLOCK) if dram else 0)
    pool = (torch.randn(blocks * BLOCK, 2, hkv, d, generator=g) * 0.5).to(torch.float16)
    table = torch.randperm(blocks, generator=g)[: seqs * per_seq].view(seqs, per_seq).contiguous()
    q = torch.randn(seqs, hq, d, generator=g)
    query_start = torch.arange(seqs + 1, dtype=torch.int64)
    context = torch.full((seqs,), ctx, dtype=torch.int64)
    args = (q, pool, table, query_start, context - 1, context, BLOCK, d ** -0.5, 0, 0.0)
    same = torch.equal(old.paged_attention(*args), new.paged_attention(*args))
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(rounds):
        for label, ext in (("old", old), ("new", new)):
            if dram:
                flush.sum()
            t = time.perf_counter()
            ext.paged_attention(*args)
            times[label].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"scenario": name, "pool": "dram" if dram else "cache", "threads": threads,
            "old_us": 1e6 * med["old"], "new_us": 1e6 * med["new"], "new_over_old": med["new"] / med["old"],
            "bitwise_equal": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS), metavar="NAME")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--cflags", default="", help="more compiler flags for both builds (e.g. -mno-avx512f)")
    args = ap.parse_args()
    flags = tuple(args.cflags.split())
    new = build_variant("layer", "ab-" + re.sub(r"\W+", "_", "".join(flags)), list(flags)) if flags else load("layer")
    flush = torch.ones(16 << 20)  # 64 MB, twice the L3
    with tempfile.TemporaryDirectory() as scratch:
        old = build_at(args.rev, Path(scratch), "layer", flags)
        results = [measure(old, new, name, dram, threads, args.rounds, flush)
                   for threads in args.threads for name in args.scenarios for dram in (True, False)]
    print(f"| scenario | pool | threads | {args.rev} us | this tree us | new / old | bitwise equal |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['pool']} | {r['threads']} | {r['old_us']:.0f} | {r['new_us']:.0f} | "
              f"{r['new_over_old']:.2f} | {'yes' if r['bitwise_equal'] else 'NO'} |")
    write_result("attention_ab", {"rev": args.rev, "cflags": args.cflags, "results": results})
    return 0 if all(r["bitwise_equal"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
