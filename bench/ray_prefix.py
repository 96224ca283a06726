"""Prefix-aware routing against Ray's default router, on textmill's Ray Serve application.

For each router (textmill's PrefixAffinityRouter, Ray's PowerOfTwoChoicesRequestRouter), a
fresh local Ray head with `--replicas` engine replicas of the bundled model (one CPU, one
torch thread each) takes the shared-prefix workload of tests/integration/test_ray_serve.py:
4 distinct 300-word prefixes, 8 requests each (each its own question after the shared
text), streamed with usage. One request per prefix goes first, all at once; the other 28
follow `--concurrency` at a time. Per router: requests without a prefix-cache hit, the
share of prompt tokens served from the cache, TTFT p50/p90 and total tok/s (generated
tokens over the whole run's wall time).

    python bench/ray_prefix.py                       # both routers, 2 replicas
    python bench/ray_prefix.py --repeats 2 --concurrency 4 --max-tokens 32

Results: bench/results/ray_prefix-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.stamp import code_stamp, machine_label, machine_stamp  # noqa: E402
from textmill.cli import build_parser, engine_config_from_args  # noqa: E402
from textmill.loader.bundled import BUNDLED_NAME  # noqa: E402
from tests.integration.ray_app import ray_app, shared_prefix_requests, shared_prefixes  # noqa: E402

NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end tokens: every request generates max_tokens


async def one(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": BUNDLED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logit_bias": NO_EOS, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, usage = time.perf_counter(), None, None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"ttft": ttft, "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


async def workload(url: str, concurrency: int, max_tokens: int) -> dict:
    requests = shared_prefix_requests(shared_prefixes(4, 300), 8)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as http:
        async def limited(prompt: str) -> dict:
            async with gate:
                return await one(http, url, prompt, max_tokens)

        start = time.perf_counter()
        first = await asyncio.gather(*(one(http, url, p, max_tokens) for _, p in requests[:4]))
        rest = await asyncio.gather(*(limited(p) for _, p in requests[4:]))
        wall = time.perf_counter() - start
    results = first + rest
    ttfts = sorted(r["ttft"] for r in results)
    prompt = sum(r["prompt_tokens"] for r in results)
    return {"requests": len(results), "misses": sum(r["cached_tokens"] == 0 for r in results),
            "cached_share": sum(r["cached_tokens"] for r in results) / prompt,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
            "tok_s": sum(r["completion_tokens"] for r in results) / wall, "wall_s": wall}


def print_table(rows: list[dict]) -> None:
    print(f"{'router':<8} {'run':>3} {'misses':>6} {'cached':>7} {'TTFT p50':>9} {'TTFT p90':>9} {'tok/s':>7} {'wall s':>7}")
    for r in rows:
        print(f"{r['router']:<8} {r['run']:>3} {r['misses']:>3}/{r['requests']:<2} {r['cached_share']:>7.0%} "
              f"{r['ttft_p50_s']:>9.2f} {r['ttft_p90_s']:>9.2f} {r['tok_s']:>7.1f} {r['wall_s']:>7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", nargs="+", default=["prefix", "pow2"], choices=["prefix", "pow2"])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="fresh applications per router, taking turns")
    p.add_argument("--serve-args", default="--kv-cache-memory 0.25",
                   help="`textmill serve` flags of every replica")
    args = p.parse_args()
    engine = engine_config_from_args(build_parser().parse_args(["serve", *shlex.split(args.serve_args)]))
    machine, rows = machine_stamp(), []
    for run in range(args.repeats):
        for router in args.routers:
            with ray_app(engine, replicas=args.replicas, router=router, num_cpus=args.replicas) as url:
                rows.append({"router": router, "run": run, **asyncio.run(workload(url, args.concurrency,
                                                                                 args.max_tokens))})
            print_table(rows[-1:])
    print()
    print_table(rows)
    out = ROOT / "bench" / "results" / time.strftime("ray_prefix-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"code": code_stamp(), "machine": machine, "args": vars(args), "results": rows},
                              indent=1))
    print(f"{machine_label(machine)}; wrote {out}")


if __name__ == "__main__":
    main()
