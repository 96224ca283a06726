"""Where a hybrid's step goes (Qwen3.5, LFM2, Granite 4.0-H on runner/hybrid_forward.py): decode steps of N
streams and one prompt chunk, offline, each kernel call timed.

One runner over the file's blocks, as the plan builds it for the CPU kernels (float16 KV). N
requests are prefilled (64 tokens each), then 12 decode steps of one token a request run, the
last 8 timed; then a chunk of 4 x 64 prompt tokens. Each part's time is its calls' sum over
those steps: each layer's mixer as a whole (its projections included) and, within it, the
recurrent kernels (causal_conv, gated_delta, ssm_scan, sigmoid_gate); the MLP (or mixture of
experts) as a whole; "other" is the rest of a step (embedding, norms, the head, sampling).

    python bench/hybrid_steps.py --model synthetic-qwen35 --streams 1 16

Results: bench/results/hybrid_steps-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from stamp import write_result  # noqa: E402

PROMPT = list(range(100, 164))
KERNELS = ("causal_conv", "gated_delta", "ssm_scan", "sigmoid_gate")  # inside the mixers' time


class Timed:
    """Calls of `fn` timed into totals[name]."""

    def __init__(self, totals: dict[str, float], name: str, fn):
        self.totals, self.name, self.fn = totals, name, fn

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.totals[self.name] += time.perf_counter() - start
        return out


def instrumented_runner(path: Path, totals: dict[str, float]):
    import torch

    from textmill.config import CacheConfig
    from textmill.loader import load_model
    from textmill.runner import ModelRunner

    loaded = load_model(path, codes=True)
    runner = ModelRunner(loaded.model, loaded.config, CacheConfig(block_size=16, num_blocks=2048),
                         file_weights=loaded, kv_dtype=torch.float16, state_slots=64)
    forward = runner.forward
    assert type(forward).__name__ == "HybridKernelForward", f"{path.name} is not a hybrid on the kernels"
    kernels = type("Kernels", (), {})()
    for name in KERNELS:
        setattr(kernels, name, Timed(totals, name, getattr(forward.recurrent, name)))
    forward.recurrent = kernels
    forward.steps = [Timed(totals, "mixers (projections included)", s) for s in forward.steps]
    forward.mlps = [Timed(totals, "MLP", mlp) for mlp in forward.mlps]
    return runner


def measure(path: Path, streams: int) -> dict:
    from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput
    from textmill.sampling_params import SamplingParams

    totals: dict[str, float] = collections.defaultdict(float)
    runner = instrumented_runner(path, totals)
    params = SamplingParams(temperature=0.0, max_tokens=1000)
    blocks: dict[str, list[int]] = {}

    def chunk(rid: str, start: int, tokens: list[int]) -> ScheduledChunk:
        have = blocks.setdefault(rid, [])
        before = len(have)
        while len(have) * 16 < start + len(tokens):
            have.append(sum(len(b) for b in blocks.values()))
        return ScheduledChunk(rid, tuple(tokens), start, tuple(have[before:]), sample=True, block_offset=before)

    ids = [f"r{i}" for i in range(streams)]
    for rid in ids:
        runner.execute(SchedulerOutput((NewRequestData(rid, params),), (chunk(rid, 0, PROMPT),), (), ()))
    position, timed = len(PROMPT), 8
    for step in range(12):
        if step == 12 - timed:
            totals.clear()
            start = time.perf_counter()
        runner.execute(SchedulerOutput((), tuple(chunk(r, position, [5 + step]) for r in ids), (), ()))
        position += 1
    decode = {"step_ms": 1000 * (time.perf_counter() - start) / timed,
              "parts_ms": {k: 1000 * v / timed for k, v in totals.items()}}
    totals.clear()
    prompts = [f"p{i}" for i in range(4)]
    start = time.perf_counter()
    runner.execute(SchedulerOutput(tuple(NewRequestData(r, params) for r in prompts),
                                   tuple(chunk(r, 0, PROMPT) for r in prompts), (), ()))
    prefill = {"chunk_ms": 1000 * (time.perf_counter() - start), "tokens": 4 * len(PROMPT),
               "parts_ms": {k: 1000 * v for k, v in totals.items()}}
    return {"streams": streams, "decode": decode, "prefill": prefill}




def _table(rows: list[dict]) -> str:
    lines = ["| streams | what | ms | mixers (ms) | of which recurrent.cpp (ms) | MLP (ms) | other (ms) |",
             "|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        for what, part, key in (("decode step", r["decode"], "step_ms"),
                                ("4 x 64-token prompt chunk", r["prefill"], "chunk_ms")):
            t = collections.defaultdict(float, part["parts_ms"])
            mixers, mlp = t["mixers (projections included)"], t["MLP"]
            kernels = ", ".join(f"{k} {t[k]:.1f}" for k in KERNELS if k in part["parts_ms"])
            lines.append(f"| {r['streams']} | {what} | {part[key]:.1f} | {mixers:.1f} | {kernels} | {mlp:.1f} "
                         f"| {part[key] - mixers - mlp:.1f} |")
    return "\n".join(lines)


def main() -> int:
    from models import resolve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic-qwen35", help="a matrix name or a GGUF path (bench/models.py)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    args = p.parse_args()
    path = resolve(args.model)
    rows = [measure(path, n) for n in args.streams]
    print(_table(rows))
    write_result("hybrid_steps", {"model": args.model, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
