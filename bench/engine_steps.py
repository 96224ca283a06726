"""Offline engine throughput: several textmill configurations side by side, no HTTP.

Each variant is a full engine (wiring.build_engine, as `textmill serve` builds it) on the
bundled model. For each concurrency C, C workload requests (bench/workload.py prompts, 64
greedy tokens, EOS ignored; prompts never repeat, so no prefill is a prefix-cache hit) are
added at once and Engine.step() runs until all finish. The
variants take turns for `--repeats` rounds in one process, so a noisy neighbour hits them
alike; the table keeps each variant's best round, with its ratio to the first variant, and
lists every round beside it (the result file has them too).

    python bench/engine_steps.py                                   # default vs --no-kernels
    python bench/engine_steps.py --variants "" " --quantization int4" --concurrency 1 16 64
    python bench/engine_steps.py --variants " --device cuda" " --device cuda --enforce-eager"

    python bench/engine_steps.py --variants "" " --layers-in-python" --concurrency 1 16 64

(A variant that starts with "--" needs a leading space, or argparse takes it for an option.)
`--layers-in-python` is this bench's own flag, not a `textmill serve` one: that variant
runs the kernel forward's layer loop in Python (kernel_forward.layer(), the reference the
tests hold the one-call C++ Forward to), to measure what the one call saves.
Compare thread counts (`--threads`) in separate runs: each engine re-applies its own count
every step, and two counts alternating in one process halved the 2-thread variant's
16-stream figure (360 against 676 tok/s alone, Zen 5).
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from pathlib import Path

# This tree's textmill first: a worktree that shares another checkout's virtual environment
# would otherwise import that checkout's code.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from stamp import write_result  # noqa: E402
from workload import Workload, make_prompt  # noqa: E402

from textmill.cli import build_parser, engine_config_from_args  # noqa: E402
from textmill.messages import EngineRequest  # noqa: E402
from textmill.sampling_params import SamplingParams  # noqa: E402
from textmill.wiring import build_engine  # noqa: E402

PYTHON_LAYERS = "--layers-in-python"


def run_once(built, workload: Workload, concurrency: int, tag: str, first: int) -> tuple[float, float]:
    """(generated tok/s, mean step ms) for `concurrency` requests added at once, with the
    workload's prompts first, first + 1, ..."""
    engine, tok = built.engine, built.tokenizer
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=0.0)
    for i in range(concurrency):
        ids = tuple(tok.encode(make_prompt(workload, first + i)))
        engine.add_request(EngineRequest(f"{tag}-{i}", ids, params))
    generated, steps, start = 0, 0, time.perf_counter()
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                generated += out.num_output_tokens
        steps += 1
    elapsed = time.perf_counter() - start
    return generated / elapsed, 1e3 * elapsed / max(steps, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["", " --no-kernels"],
                   help="`textmill serve` flags of each variant, one string each ('' = defaults)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", help="also copy the result file here")
    args = p.parse_args()
    workload = Workload(max_tokens=args.max_tokens)
    parser = build_parser()
    engines = {}
    for v in args.variants:
        flags = shlex.split(v)
        in_python = PYTHON_LAYERS in flags
        flags = [f for f in flags if f != PYTHON_LAYERS]
        ns = parser.parse_args(["serve", "--max-num-seqs", str(max(args.concurrency)), *flags])
        engines[v] = build_engine(engine_config_from_args(ns))
        if in_python:
            forward = engines[v].engine._runner.forward
            if getattr(forward, "one_call", None) is None:
                raise SystemExit(f"variant {v!r}: this engine has no one-call forward to turn off")
            forward.one_call = None
    gc.freeze()  # as `textmill serve` does once its model is loaded (commands._frozen_after)
    best: dict[tuple[str, int], tuple[float, float]] = {}
    rounds: dict[tuple[str, int], list[float]] = {}
    first = 0  # every run gets prompts no run has seen: a repeat would be a prefix-cache hit
    for r in range(args.repeats):
        for c in args.concurrency:
            for v, built in engines.items():
                rate, step_ms = run_once(built, workload, c, f"r{r}", first)
                first += c
                key = (v, c)
                rounds.setdefault(key, []).append(round(rate, 2))
                if key not in best or rate > best[key][0]:
                    best[key] = (rate, step_ms)
    print("| variant | conc | tok/s (best round) | x first | ms/step | every round |")
    print("|---|---:|---:|---:|---:|---|")
    rows = []
    for c in args.concurrency:
        base = best[(args.variants[0], c)][0]
        for v in args.variants:
            rate, step_ms = best[(v, c)]
            rows.append({"variant": v.strip() or "defaults", "concurrency": c, "tok_s": round(rate, 2),
                         "ratio_to_first": round(rate / base, 3), "step_ms": round(step_ms, 2),
                         "tok_s_rounds": rounds[(v, c)]})
            every = ", ".join(f"{r:.1f}" for r in rounds[(v, c)])
            print(f"| {v.strip() or 'defaults'} | {c} | {rate:.1f} | {rate / base:.2f}x | {step_ms:.1f} | {every} |")
    path = write_result("engine_steps", {"repeats": args.repeats, "max_tokens": args.max_tokens, "rows": rows})
    if args.json:
        Path(args.json).write_text(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
