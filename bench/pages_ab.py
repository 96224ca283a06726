"""Where the packed weights live, side by side: the weight arena's 2 MiB pages against
tensors of their own (torch's allocator, 4 KiB pages: the layout before the arena).

One engine per model (wiring.build_engine, as `textmill serve` builds it; prompt-lookup
guesses off, so every step is one token a stream). Its layers' weights are loaded into the
arena (runner/weight_arena.py); a copy of each in a tensor of its own makes the other
placement, and the kernel forward is built once over each. For each concurrency C, C
workload requests (64 greedy tokens, the model's ending ids banned) are added at once and
the engine's decode steps alternate between the two placements, so a noisy neighbour hits
both alike. The table gives each placement's median decode step (steps with all C
requests running), and the arena's over the separate tensors'. The head stays in the
arena in both: the ratio is the layers' share only.

    python bench/pages_ab.py                                   # the matrix, C = 1 and 16
    python bench/pages_ab.py --models smollm2 --concurrency 1 16 64 --waves 4
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from models import MATRIX, eos_token_ids, resolve  # noqa: E402
from stamp import write_result  # noqa: E402
from workload import Workload, make_prompt  # noqa: E402

from textmill.cli import build_parser, engine_config_from_args  # noqa: E402
from textmill.messages import EngineRequest  # noqa: E402
from textmill.runner.qlinear import QLinear  # noqa: E402
from textmill.sampling_params import SamplingParams  # noqa: E402
from textmill.wiring import build_engine  # noqa: E402

PLACEMENTS = ("arena", "own tensors")


def placements(forward) -> dict[str, object]:
    """The kernel forward over the arena's weights and over a copy of each in its own tensor."""
    linears = [m for layer in forward.layers for m in layer.modules() if type(m) is QLinear]
    in_arena = [m.packed for m in linears]
    calls = {"arena": forward.one_call}
    for m in linears:
        m.packed = m.packed.clone()
    forward.build_one_call()
    calls["own tensors"] = forward.one_call
    for m, packed in zip(linears, in_arena):
        m.packed = packed
    return calls


def decode_steps(built, calls: dict, c: int, waves: int, workload: Workload, banned: tuple[int, ...]) -> dict:
    """Median decode step (s) of each placement, the steps alternating between them."""
    engine, tok, forward = built.engine, built.tokenizer, built.engine._runner.forward
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=0.0,
                            logit_bias=tuple((i, -100.0) for i in banned))
    times = {name: [] for name in calls}
    names = list(calls)
    n = 0
    for wave in range(waves + 1):  # the first wave warms up
        for _ in range(c):
            engine.add_request(EngineRequest(f"w{wave}-{n}", tuple(tok.encode(make_prompt(workload, n))), params))
            n += 1
        step = 0
        while engine.has_unfinished:
            name = names[step % len(names)]
            forward.one_call = calls[name]
            start = time.perf_counter()
            outs = engine.step()
            elapsed = time.perf_counter() - start
            if wave and len(outs) == c and not any(o.finished for o in outs) and step >= 2:
                times[name].append(elapsed)
            step += 1
    forward.one_call = calls["arena"]
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MATRIX))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--waves", type=int, default=4, help="request waves per concurrency, after one to warm up")
    args = p.parse_args()
    workload = Workload(max_tokens=64)
    rows = []
    print("| model | conc | arena ms/step | own tensors ms/step | arena / own |")
    print("|---|---:|---:|---:|---:|")
    for key in args.models:
        path = resolve(key)
        ns = build_parser().parse_args(["serve", str(path), "--max-num-seqs", str(max(16, *args.concurrency)),
                                        "--max-model-len", "4096", "--draft-tokens", "0"])
        built = build_engine(engine_config_from_args(ns))
        gc.freeze()
        forward = built.engine._runner.forward
        if getattr(forward, "one_call", None) is None:
            raise SystemExit(f"{key}: no one-call kernel forward to compare")
        calls = placements(forward)
        for c in args.concurrency:
            med = decode_steps(built, calls, c, args.waves, workload, eos_token_ids(path))
            ratio = med["arena"] / med["own tensors"]
            rows.append({"model": key, "concurrency": c, "arena_ms": round(1e3 * med["arena"], 3),
                         "own_ms": round(1e3 * med["own tensors"], 3), "ratio": round(ratio, 3)})
            print(f"| {key} | {c} | {1e3 * med['arena']:.2f} | {1e3 * med['own tensors']:.2f} | {ratio:.3f}x |",
                  flush=True)
        del built, calls, forward
        gc.unfreeze()
        gc.collect()
    write_result("pages_ab", {"waves": args.waves, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
