"""Guessed tokens (prompt lookup, engine/ngram_draft.py) on and off, side by side in one engine.

One engine per model (wiring.build_engine, as `textmill serve` builds it, its default
--draft-tokens). Waves of C requests, added together and run to their end, take turns with
the scheduler's drafter in place and taken out, in one process, so a noisy neighbour hits
both alike. Every wave's requests are the same on both sides, and the bench checks that
both gave the same tokens: guessing is exact or the run fails. Per model, workload and C:
tok/s of each wave (generated tokens over the wave's wall time, prefill included), each
wave's on / off (the waves' prompts differ, a wave's are both sides') and their median, and
a request's tokens a step (1 + the guesses kept, on average).

Workloads, 64 tokens each, the model's ending ids banned:
  bench  the matrix's prompts (bench/workload.py: 64 random common words). Small models
         answer them with loops, which guesses continue: the best case.
  prose  requests for prose (a story, an explanation, a letter, a recipe): the text
         repeats itself far less.
  code   code to be rewritten or continued: output that copies its input, the case
         prompt lookup is for.
On the random-weight files (synthetic-*) the text is noise whatever the prompt.

    python bench/draft_ab.py
    python bench/draft_ab.py --models smollm2 gemma3 --streams 1 2 4 --waves 3
    python bench/draft_ab.py --temperature 0.7             # seeded sampling guesses too

Results: bench/results/draft_ab-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from models import eos_token_ids, resolve  # noqa: E402
from stamp import write_result  # noqa: E402
from workload import Workload, make_prompt  # noqa: E402

from textmill.cli import build_parser, engine_config_from_args  # noqa: E402
from textmill.messages import EngineRequest  # noqa: E402
from textmill.sampling_params import SamplingParams  # noqa: E402
from textmill.wiring import build_engine  # noqa: E402

PROSE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step, for a high school student.",
    "Write a letter to a friend describing your first week in a new city.",
    "Give a recipe for a simple vegetable soup and explain each step.",
    "Describe the causes and the consequences of the French Revolution.",
    "What are the advantages and disadvantages of working from home?",
    "Write a product description for a waterproof hiking backpack.",
    "Summarize the plot of a detective novel in your own words.",
]
CODE = [
    "Add type hints to this function:\n\ndef total_price(items, tax_rate):\n    total = 0\n    for item in items:\n"
    "        total += item.price * item.quantity\n    return total * (1 + tax_rate)\n",
    "Rename the variable `data` to `rows` in this code:\n\ndef load(path):\n    data = []\n    with open(path) as f:\n"
    "        for line in f:\n            data.append(line.strip().split(','))\n    return data\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "class Point3D:\n    def __init__(self, x, y, z):\n",
    "<ul>\n  <li><a href=\"/home\">Home</a></li>\n  <li><a href=\"/about\">About</a></li>\n"
    "  <li><a href=\"/blog\">Blog</a></li>\n",
    "SELECT id, name, email FROM users WHERE active = 1;\nSELECT id, name, email FROM admins WHERE",
    "Fix the bug in this function:\n\ndef is_even(n):\n    return n % 2 == 1\n",
    "def test_add():\n    assert add(1, 2) == 3\n\ndef test_sub():\n    assert sub(3, 2) == 1\n\ndef test_mul():\n",
    "Convert to JSON: name Alice, age 30, city Paris; name Bob, age 25, city Lyon; name Carol, age 41, city Nice.",
]


def prompts(kind: str, workload: Workload, c: int, first: int) -> list[str]:
    if kind == "bench":
        return [make_prompt(workload, first + i) for i in range(c)]
    pool = PROSE if kind == "prose" else CODE
    return [pool[(first + i) % len(pool)] for i in range(c)]


class Counting:
    """The runner, counting sampled chunks and the guesses they kept."""

    def __init__(self, runner):
        self.runner, self.sampled, self.kept = runner, 0, 0

    def execute(self, scheduled):
        out = self.runner.execute(scheduled)
        self.sampled += len(out.sampled)
        self.kept += sum(len(a) for a in out.accepted.values())
        return out


def wave(built, params: SamplingParams, texts: list[str], first: int) -> tuple[float, int, int, list]:
    """(seconds, tokens generated, samplings, each request's tokens) for one wave run to its end:
    tokens / samplings is a request's tokens a step."""
    engine, tok = built.engine, built.tokenizer
    ids = [f"w{first + i}" for i in range(len(texts))]
    for i, (rid, text) in enumerate(zip(ids, texts)):
        # Each request of a wave its own seed, the same on both sides (used when sampling).
        engine.add_request(EngineRequest(rid, tuple(tok.encode(text)), dataclasses.replace(params, seed=i)))
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    counting = engine._runner
    counting.sampled = 0
    start = time.perf_counter()
    while engine.has_unfinished:
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(v) for v in got.values()), counting.sampled, [got[rid] for rid in ids]


def compare(key: str, kinds: list[str], streams: list[int], waves: int, workload: Workload,
            temperature: float, draft_tokens: int | None) -> list[dict]:
    path = resolve(key)
    # No prefix cache: both sides run each wave's prompts, and the second would find the
    # first's blocks and skip most of its prefill.
    ns = build_parser().parse_args(["serve", str(path), "--max-num-seqs", str(max(16, *streams)),
                                    "--kv-cache-memory", "2", "--max-model-len", "4096", "--no-prefix-caching",
                                    *(["--draft-tokens", str(draft_tokens)] if draft_tokens else [])])
    built = build_engine(engine_config_from_args(ns))
    gc.freeze()  # as `textmill serve` does once its model is loaded
    built.engine._runner = Counting(built.engine._runner)
    scheduler = built.engine._scheduler
    drafter = scheduler.drafter
    if drafter is None:
        raise SystemExit("this engine guesses no tokens (--draft-tokens 0)")
    banned = tuple((i, -100.0) for i in eos_token_ids(path))
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=temperature, logit_bias=banned)
    rows, first = [], 0
    for kind in kinds:
        for c in streams:
            wave(built, params, prompts(kind, workload, c, first), first)  # warm-up
            got: dict[str, list] = {"off": [], "on": []}
            for w in range(waves):
                texts = prompts(kind, workload, c, first + w * c)
                answers = {}
                for name in ("off", "on") if w % 2 == 0 else ("on", "off"):
                    scheduler.drafter = drafter if name == "on" else None
                    seconds, tokens, samplings, answers[name] = wave(built, params, texts, first)
                    first += c
                    got[name].append((tokens / seconds, tokens / samplings))
                if answers["on"] != answers["off"]:
                    raise SystemExit(f"{key} {kind} C={c}: guessing changed the tokens")
            scheduler.drafter = drafter
            on, off = [r for r, _ in got["on"]], [r for r, _ in got["off"]]
            paired = [a / b for a, b in zip(on, off)]  # the waves' prompts differ; each wave's are both sides'
            rows.append({"model": key, "workload": kind, "streams": c, "temperature": temperature,
                         "off_tok_s": [round(x, 1) for x in off], "on_tok_s": [round(x, 1) for x in on],
                         "on_over_off": round(statistics.median(paired), 3),
                         "on_over_off_waves": [round(x, 3) for x in paired],
                         "tokens_per_step": round(statistics.mean(t for _, t in got["on"]), 2)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3", "synthetic-1b", "synthetic-qwen3"],
                    help="matrix names (bench/models.py) or GGUF paths")
    ap.add_argument("--workloads", nargs="+", default=["bench", "prose", "code"], choices=["bench", "prose", "code"])
    ap.add_argument("--streams", type=int, nargs="+", default=[1])
    ap.add_argument("--waves", type=int, default=4, help="waves per side, workload and stream count")
    ap.add_argument("--draft-tokens", type=int, default=None, help="guesses at most (default: textmill's)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; above: seeded sampling (seed i for a wave's request i)")
    args = ap.parse_args()
    workload = Workload(max_tokens=64)
    rows = [r for key in args.models
            for r in compare(key, args.workloads, args.streams, args.waves, workload, args.temperature,
                             args.draft_tokens)]
    print("| model | workload | streams | off: tok/s, each wave | on | on / off, each wave | median | "
          "tokens a step, on |")
    print("|---|---|---:|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['workload']} | {r['streams']} | {' '.join(f'{x:.0f}' for x in r['off_tok_s'])} | "
              f"{' '.join(f'{x:.0f}' for x in r['on_tok_s'])} | "
              f"{' '.join(f'{x:.2f}' for x in r['on_over_off_waves'])} | {r['on_over_off']:.2f} | "
              f"{r['tokens_per_step']:.2f} |")
    write_result("draft_ab", {"waves": args.waves, "temperature": args.temperature,
                              "draft_tokens": args.draft_tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
