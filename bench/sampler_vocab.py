"""Micro-benchmark: Sampler.sample with large vocabularies, the sampler before and after
candidate top-p and logsumexp logprobs, side by side in one process.

The baseline is the sampler as it was at BASELINE_REV (a full (S, V) log_softmax every step,
top-p by a full sort of each row), loaded from git into a module of its own: it is the old
code, not a copy of it. Vocabularies: 49,152 (SmolLM2), 151,936 (Qwen2.5), 262,144 (Gemma 3);
S = 1, 16, 64 rows, one request per row, float32 logits.

Logits: "LM-like" rows put 1,000 tokens (random ids) on a Zipf slope over a N(0, 1.5)
background, each row with its own steepness, so the 0.95 nucleus at temperature 0.8 spans
from a couple of tokens to a few hundred (the table's notes give the spread); "flat" rows are
N(0, 1) logits, whose nucleus is most of the vocabulary: the new sampler's full-sort fallback.

Method: old and new run interleaved, a batch of calls per round, several rounds; the table
shows the minimum ms per call over rounds (this machine is shared: minima are the least
noisy). Before timing, both draw from the same seeds and the table says whether they chose
the same tokens. Results: bench/results/sampler_vocab-<time>.json.

    .venv/bin/python bench/sampler_vocab.py [--rounds 3] [--vocab 49152 151936 262144] [--rows 1 16 64]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from textmill.runner import sampler as new_sampler
from textmill.sampling_params import SamplingParams

BASELINE_REV = "c6b4f364bb72d48b72d9c0f72572684029aa8d1e"  # the last sampler with sort-based top-p
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name -> (params of every row, logits kind)
    "greedy": (dict(temperature=0.0), "lm"),
    "t0.8 top_p 0.95": (dict(temperature=0.8, top_p=0.95), "lm"),
    "greedy logprobs=5": (dict(temperature=0.0, logprobs=5), "lm"),
    "t0.8 top_p 0.95 flat": (dict(temperature=0.8, top_p=0.95), "flat"),
}


def load_baseline(rev: str):
    """The sampler module as it was at rev, imported under a name of its own."""
    source = subprocess.run(["git", "show", f"{rev}:textmill/runner/sampler.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("baseline_sampler", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev[:7]}:textmill/runner/sampler.py", "exec"), module.__dict__)
    return module


def make_logits(kind: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return torch.randn(rows, vocab, generator=g)
    x = torch.randn(rows, vocab, generator=g) * 1.5
    head = min(1000, vocab)
    steep = 1.2 + 2.3 * torch.rand(rows, 1, generator=g)
    slope = 16.0 - steep * torch.log(torch.arange(1, head + 1, dtype=torch.float32))  # (rows, head)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:head] for _ in range(rows)])
    return x.scatter_(1, ids, slope)


def nucleus_sizes(logits: torch.Tensor, temperature: float, top_p: float) -> list[int]:
    probs = torch.softmax(logits / temperature, -1).sort(-1, descending=True).values
    return ((probs.cumsum(-1) - probs) < top_p).sum(-1).tolist()


def make_sampler(module, vocab: int, rows: int, params: dict) -> tuple[object, list[str]]:
    sampler = module.Sampler(vocab)
    ids = [f"r{i}" for i in range(rows)]
    for i, rid in enumerate(ids):
        sampler.add_request(rid, SamplingParams(**params, seed=7919 * i + 1))
    return sampler, ids


def timeit(fns: dict[str, Callable[[], object]], rounds: int, target_s: float = 0.05) -> dict[str, float]:
    """Minimum ms per call of each fn, the fns interleaved round by round."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, min(200, int(target_s / max(time.perf_counter() - t0, 1e-7))))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name] * 1e3)
    return best


def measure(old, vocab: int, rows: int, config: str, rounds: int) -> dict:
    params, kind = CONFIGS[config]
    logits = make_logits(kind, rows, vocab, seed=vocab + rows)
    (old_s, ids), (new_s, _) = make_sampler(old, vocab, rows, params), make_sampler(new_sampler, vocab, rows, params)
    a, b = old_s.sample(logits, ids), new_s.sample(logits, ids)  # the same seeds, first draw
    row = {"vocab": vocab, "rows": rows, "config": config, "same_tokens": torch.equal(a.token_ids, b.token_ids),
           "max_logprob_diff": float((a.logprobs - b.logprobs).abs().max())}
    if params.get("logprobs"):
        row["max_top_logprob_diff"] = float((a.top_logprobs - b.top_logprobs).abs().max())
        row["same_top_ids"] = torch.equal(a.top_ids, b.top_ids)
    if "top_p" in params:
        row["nucleus_sizes"] = sorted(nucleus_sizes(logits, params["temperature"], params["top_p"]))
    times = timeit({"old": lambda: old_s.sample(logits, ids), "new": lambda: new_s.sample(logits, ids)}, rounds)
    return {**row, "old_ms": times["old"], "new_ms": times["new"], "ratio": times["old"] / times["new"]}


def stamp() -> dict:
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "textmill/runner/sampler.py")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"commit": commit, "sampler_uncommitted_changes": bool(dirty), "baseline_rev": BASELINE_REV, "cpu": cpu,
            "command": shlex.join([Path(sys.executable).name, *sys.argv]), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg_before": os.getloadavg()}


def print_table(results: list[dict]) -> None:
    print(f"{'V':>7} {'S':>3}  {'config':<22} {'old ms':>9} {'new ms':>8} {'old/new':>8}  same tokens")
    for r in results:
        same = "yes" if r["same_tokens"] else "NO"
        print(f"{r['vocab']:>7} {r['rows']:>3}  {r['config']:<22} {r['old_ms']:>9.2f} {r['new_ms']:>8.2f} "
              f"{r['ratio']:>7.1f}x  {same}")
    for r in results:
        if "nucleus_sizes" in r and r["rows"] > 1:
            n = r["nucleus_sizes"]
            where = f"V={r['vocab']} S={r['rows']} {r['config']}"
            print(f"  nucleus {where}: min {n[0]}, median {n[len(n) // 2]}, max {n[-1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936, 262144])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info, old = stamp(), load_baseline(BASELINE_REV)
    results = [measure(old, v, s, c, args.rounds) for v in args.vocab for s in args.rows for c in args.configs]
    print_table(results)
    out = ROOT / "bench" / "results" / time.strftime("sampler_vocab-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    info["load_avg_after"] = os.getloadavg()
    out.write_text(json.dumps({**info, "results": results}, indent=1))
    print(f"load average before/after: {info['load_avg_before'][0]:.1f}/{info['load_avg_after'][0]:.1f}; wrote {out}")


if __name__ == "__main__":
    main()
