"""Where a mixture of experts' one-stream decode step goes, on this tree and on another revision.

One offline engine per tree (wiring.build_engine, as `textmill serve` builds it; --rev's
from a git worktree), each timing its own calls: the experts' grouped
projections (`experts_linear`), the router's logits, route and sum, q/k/v and o, attention,
the head. Rounds of one request (the workload's prompts, 64 greedy tokens, no prompt-lookup
guesses) alternate between the trees, each in a process of its own (the kernels of two
revisions cannot share one); decode steps only. Each row of the table is one round: the
step's median, and per op its mean over the round's steps. Since the VM's pace moves
between rounds, the table also gives the experts' time over q/k/v's, which neither tree
may change: that ratio is what compares them.

    python bench/moe_steps.py --model synthetic-qwen3moe                 # this tree alone
    python bench/moe_steps.py --model synthetic-qwen3moe --rev HEAD~1 --rounds 3

Results: bench/results/moe_steps-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from stamp import write_result  # noqa: E402

# Run inside the measuring process: ROOT_UNDER_TEST is the tree whose textmill it imports.
_CHILD = r"""
import collections, json, os, statistics, sys, time
root = os.environ["ROOT_UNDER_TEST"]; sys.path[:0] = [root, os.path.join(root, "bench")]
from workload import Workload, make_prompt
from textmill.cli import build_parser, engine_config_from_args
from textmill.messages import EngineRequest
from textmill.sampling_params import SamplingParams
from textmill.wiring import build_engine
import textmill.runner.kernel_forward as kf
from textmill.runner.moe import KernelMoE
ns = build_parser().parse_args(["serve", sys.argv[1], "--kv-cache-memory", "1", "--max-model-len", "4096",
                                "--draft-tokens", "0"])
built = build_engine(engine_config_from_args(ns))
eng, tok = built.engine, built.tokenizer
fw, acc = eng._runner.forward, collections.defaultdict(float)
def timed(name, f):
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[name] += time.perf_counter() - t; return r
    return g
for m in (m for m in fw.experts if m is not None):
    m._quant = type("Q", (), {"experts_linear": staticmethod(timed("experts", m._quant.experts_linear))})
    glue = {"silu_mul": "swiglu", "moe_glu": "swiglu"}  # (moe_glu: gpt-oss's, from c2e0f47 on)
    m._layer = type("L", (), {n: staticmethod(timed(glue.get(n, "router, route, sum"), getattr(m._layer, n)))
                              for n in ("dense_rows", "moe_route", "silu_mul", "moe_glu", "moe_combine")
                              if hasattr(m._layer, n)})
    if m.shared_expert is not None:  # Qwen2 MoE's, ERNIE 4.5 MoE's
        m.shared_expert.forward = timed("shared expert", m.shared_expert.forward)
fw.matmuls = [tuple(timed(("qkv", "o")[j], f) if j < 2 else f for j, f in enumerate(ms)) for ms in fw.matmuls]
kf.KernelPagedAttention.attend_cached = timed("attention", kf.KernelPagedAttention.attend_cached)
eng._runner.model.logits = timed("head", eng._runner.model.logits)
eng.add_request(EngineRequest("r", tuple(tok.encode(make_prompt(Workload(max_tokens=64), int(sys.argv[2])))),
                              SamplingParams(max_tokens=64, temperature=0.0)))
steps = []
while eng.has_unfinished:
    t = time.perf_counter(); eng.step(); steps.append(time.perf_counter() - t)
    if len(steps) == 1:
        acc.clear()  # the prefill step
steps = steps[1:]
print(json.dumps({"step_ms": statistics.median(steps) * 1e3, **{k: v / len(steps) * 1e3 for k, v in acc.items()}}))
"""


def measure(tree: Path, model: Path, seed: int) -> dict:
    env = dict(os.environ, ROOT_UNDER_TEST=str(tree))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(seed)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic-qwen3moe", help="a matrix name or a GGUF path with experts")
    p.add_argument("--rev", default=None, help="also time this revision, rounds alternating")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from models import resolve

    model = resolve(args.model)
    trees = {"this tree": ROOT}
    scratch = tempfile.TemporaryDirectory() if args.rev else None
    if scratch is not None:  # --rev's tree, checked out beside this one (its kernels build from it)
        worktree = Path(scratch.name) / "rev"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(worktree), args.rev],
                       check=True, capture_output=True)
        trees = {args.rev: worktree, "this tree": ROOT}
    rows = []
    try:
        for r in range(args.rounds):
            for name, tree in (list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]):
                rows.append({"tree": name, "round": r, **measure(tree, model, r)})
    finally:
        if scratch is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
            scratch.cleanup()
    ops = ["experts", "qkv", "o", "attention", "router, route, sum", "swiglu", "shared expert", "head"]
    print(f"| tree | round | step ms (median) | {' | '.join(ops)} | experts / qkv |")
    print("|---|---:|---:|" + "---:|" * (len(ops) + 1))
    for row in rows:
        cells = " | ".join(f"{row.get(op, 0.0):.2f}" for op in ops)
        print(f"| {row['tree']} | {row['round']} | {row['step_ms']:.2f} | {cells} | "
              f"{row.get('experts', 0.0) / max(row.get('qkv', 1e-9), 1e-9):.2f} |")
    write_result("moe_steps", {"model": str(model), "rev": args.rev, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
