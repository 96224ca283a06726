"""Load time of the float path (--no-kernels, CUDA, int4/int8): the C++ block decoder against numpy's.

Where textmill does not run a GGUF's own blocks on its CPU kernels, `load_model` decodes every
quantized tensor to floats. It takes the kernels' C++ decoder where they build
(runner/file_weights.file_decoder) and numpy's decoders otherwise; both give the same values
(tests/unit/test_file_weights.py). This times `load_model` both ways on the same files,
alternating them in every round, and checks the state dicts are equal. Wall time, on a quiet
machine: the cold first read of a file lands on whichever goes first, so round 1 is reported
apart from the best of the rest.

    python bench/float_load.py                       # smollm2, gemma3, synthetic-1b
    python bench/float_load.py --models synthetic-qwen3 --rounds 3

Results: bench/results/float_load-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import models  # noqa: E402
from stamp import write_result  # noqa: E402

from textmill.loader import load_model  # noqa: E402
from textmill.runner.file_weights import file_decoder  # noqa: E402


def measure(key: str, rounds: int, dtype: torch.dtype) -> dict:
    path = models.resolve(key)
    decoders = {"cpp": file_decoder(), "numpy": None}
    if decoders["cpp"] is None:
        raise SystemExit("the C++ kernels do not build here: nothing to compare")
    times: dict[str, list[float]] = {name: [] for name in decoders}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(rounds):
        for name, decode in decoders.items():
            gc.collect()
            t = time.perf_counter()
            loaded = load_model(path, dtype=dtype, decode=decode)
            times[name].append(time.perf_counter() - t)
            if r == 0:
                states[name] = loaded.model.state_dict()
            del loaded
    equal = all(torch.equal(states["cpp"][n], v) for n, v in states["numpy"].items())
    states.clear()
    best = {name: min(t[1:] or t) for name, t in times.items()}
    return {"model": key, "file": path.name, "file_mib": path.stat().st_size / 2**20, "dtype": str(dtype),
            "seconds": times, "cpp_best_s": best["cpp"], "numpy_best_s": best["numpy"],
            "numpy_over_cpp": best["numpy"] / best["cpp"], "equal": equal}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3", "synthetic-1b"],
                    help="matrix names or GGUF paths (bench/models.py); three float32 copies of each must "
                         "fit in memory (the two compared, and the next round's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    results = [measure(key, args.rounds, getattr(torch, args.dtype)) for key in args.models]
    print(f"| model | file MiB | C++ s (round 1) | numpy s (round 1) | numpy / C++ | equal |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['model']} | {r['file_mib']:.0f} | {r['cpp_best_s']:.2f} ({r['seconds']['cpp'][0]:.2f}) | "
              f"{r['numpy_best_s']:.2f} ({r['seconds']['numpy'][0]:.2f}) | {r['numpy_over_cpp']:.1f} | "
              f"{'yes' if r['equal'] else 'NO'} |")
    write_result("float_load", {"dtype": args.dtype, "rounds": args.rounds, "results": results})
    return 0 if all(r["equal"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
