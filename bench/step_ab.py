"""Decode steps of a real engine on this tree's layer.cpp (or quant.cpp) against another revision's.

One engine per model (wiring.build_engine, as `textmill serve` builds it), and two one-call
forwards over the same weights and cache: this tree's layer.cpp `Forward` and the one
built from --rev (bench/revision.py). Waves of C requests (the workload's prompts, 64
greedy tokens, the model's ending ids banned, so a wave's requests finish together; no
prompt-lookup guesses, so every step is one row a request) run with their steps taking
the two forwards in turn, in one process: a noisy neighbour hits both alike, and so do
the wave's context lengths. Each wave gives each forward's median over its decode steps
with all C rows (prefill steps and the last ones left out); the table keeps every wave's
medians and the ratio of the medians over waves. (Until 2026-12-07 whole waves alternated,
with guesses on: on this VM a wave's median could double from one wave to the next.) What it measures is a whole step (the matmuls, attention, the head, sampling),
so a kernel change shows at its real share of a step, with the weights streaming between
its calls as they do in a server.

    python bench/step_ab.py --rev HEAD                           # uncommitted layer.cpp changes
    python bench/step_ab.py --rev HEAD~1 --models smollm2 gemma3 --streams 16 64 --waves 6

By default only layer.cpp's side (the layer loop, attention, norms, RoPE): quant.cpp's
kernels are this tree's in both. `--ext quant` swaps the other way: both forwards are this
tree's layer.cpp, one calling the linears of this tree's quant.cpp and one those of --rev's
(the LM head, which Python calls, and the packing stay this tree's, so --rev must pack as this
tree does). Either way --rev must take the same linear_entry.h (its capsule name refuses
another). Results: bench/results/step_ab-<time>.json, stamped with commit and machine.

    python bench/step_ab.py --ext quant --rev HEAD~1 --streams 16 64
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from models import eos_token_ids, resolve  # noqa: E402
from revision import build_at  # noqa: E402
from stamp import write_result  # noqa: E402
from workload import Workload, make_prompt  # noqa: E402

from textmill.cli import build_parser, engine_config_from_args  # noqa: E402
from textmill.messages import EngineRequest  # noqa: E402
from textmill.sampling_params import SamplingParams  # noqa: E402
from textmill.wiring import build_engine  # noqa: E402


def wave(built, calls: dict, params: SamplingParams, workload: Workload, c: int, first: int) -> dict[str, float]:
    """Per forward, the median ms of its decode steps that carry all c rows of one wave, the
    steps taking the forwards in `calls` in turn."""
    engine, tok, forward = built.engine, built.tokenizer, built.engine._runner.forward
    for i in range(c):
        engine.add_request(EngineRequest(f"w{first + i}", tuple(tok.encode(make_prompt(workload, first + i))), params))
    names = list(calls)
    steps: dict[str, list[float]] = {name: [] for name in names}
    step = 0
    while engine.has_unfinished:
        name = names[step % len(names)]
        forward.one_call = calls[name]
        start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - start
        if len(outs) == c and not any(o.finished for o in outs):
            steps[name].append(1e3 * elapsed)
        step += 1
    return {name: statistics.median(ts) for name, ts in steps.items()}


def compare(key: str, ext: str, old_module, streams: list[int], waves: int, workload: Workload) -> list[dict]:
    path = resolve(key)
    ns = build_parser().parse_args(["serve", str(path), "--max-num-seqs", str(max(16, *streams)),
                                    "--kv-cache-memory", "2", "--max-model-len", "4096", "--draft-tokens", "0"])
    built = build_engine(engine_config_from_args(ns))
    gc.freeze()  # as `textmill serve` does once its model is loaded
    forward = built.engine._runner.forward
    new = getattr(forward, "one_call", None)
    if new is None:
        raise SystemExit(f"{key}: this engine has no one-call forward to compare")
    ops = forward.ops
    if ext == "layer":
        forward.ops = old_module  # build_one_call() builds the Forward of the module in .ops
    try:
        forward.build_one_call(quant_ext=old_module if ext == "quant" else None)
        old = forward.one_call
    finally:
        forward.ops = ops
        forward.one_call = new
    banned = tuple((i, -100.0) for i in eos_token_ids(path))
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=0.0, logit_bias=banned)
    rows, first = [], 0
    for c in streams:
        wave(built, {"new": new}, params, workload, c, first)  # warm-up: first-touch of the cache blocks
        first += c
        got: dict[str, list[float]] = {"old": [], "new": []}
        for w in range(waves):
            # Which forward takes a wave's first step alternates from wave to wave.
            medians = wave(built, {"old": old, "new": new} if w % 2 == 0 else {"new": new, "old": old},
                           params, workload, c, first)
            for name, ms in medians.items():
                got[name].append(round(ms, 2))
            first += c
        forward.one_call = new
        rows.append({"model": key, "streams": c, "old_ms": got["old"], "new_ms": got["new"],
                     "new_over_old": round(statistics.median(got["new"]) / statistics.median(got["old"]), 3)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the git revision whose layer.cpp to compare against")
    ap.add_argument("--ext", choices=("layer", "quant"), default="layer",
                    help="which extension --rev gives: layer.cpp (the forward), or quant.cpp (the "
                         "linears the forward calls; the head and the packing stay this tree's)")
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3", "synthetic-qwen3"],
                    help="matrix names (bench/models.py) or GGUF paths")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--waves", type=int, default=4, help="waves per forward and stream count")
    args = ap.parse_args()
    workload = Workload(max_tokens=64)
    with tempfile.TemporaryDirectory() as scratch:
        old_module = build_at(args.rev, Path(scratch), args.ext)
        rows = [r for key in args.models
                for r in compare(key, args.ext, old_module, args.streams, args.waves, workload)]
    print(f"| model | streams | {args.rev}: decode step ms, each wave | this tree | new / old (medians) |")
    print("|---|---:|---|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['streams']} | {' '.join(f'{x:.1f}' for x in r['old_ms'])} | "
              f"{' '.join(f'{x:.1f}' for x in r['new_ms'])} | {r['new_over_old']:.3f} |")
    write_result("step_ab", {"rev": args.rev, "ext": args.ext, "waves": args.waves, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
