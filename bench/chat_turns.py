"""Conversations, turn after turn: what a prefix cache saves a chat, textmill against llama-server.

Each conversation sends its whole text again every turn, as a chat client does: turn k's prompt is
turn k-1's prompt, its answer and a new user message (`--user-words` random common words), so all
but the new message was computed before. `--conversations` of them run side by side, `--turns`
turns each; every answer is `--max-tokens` long (the model's ending ids banned). Systems, each
started alone on the same file: textmill (its prefix cache: on a hybrid, hits resume from the
recurrent states it kept, engine/kv_cache/state_snapshots.py), textmill --no-prefix-caching, and
llama-server (its slots keep a conversation's cache; `cache_prompt`). Per system: time to first
token of the first turn and of the later ones (p50), the share of the later turns' prompt tokens
served from a cache (as each server reports it), the whole run's wall time, and each system's
later-turn TTFT over textmill's. Prompts and answers go as token ids, so a random-weight model's
answers come back as they were generated.

    python bench/chat_turns.py --models synthetic-qwen35 synthetic-lfm2
    python bench/chat_turns.py --models smollm2 --conversations 2 --turns 6

Results: bench/results/chat_turns-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT)]
import httpx  # noqa: E402
from models import eos_token_ids, resolve  # noqa: E402
from servers import start_llama_server, start_textmill, stop  # noqa: E402
from stamp import write_result  # noqa: E402
from workload import WORDS  # noqa: E402

from textmill.tokenizer import load_gguf_tokenizer  # noqa: E402

SYSTEMS = {"textmill": ("textmill", []), "textmill-nocache": ("textmill", ["--no-prefix-caching"]),
           "llama-server": ("llama-server", [])}


async def _turn(http: httpx.AsyncClient, server, prompt: list[int], args, banned: dict[str, int]) -> dict:
    """One turn, streamed, on token ids (a random model's text does not tokenize back to the ids it
    came from): textmill's /v1/completions with return_token_ids, llama-server's own /completion
    with return_tokens (the ids, and its cache_n, are not in its OpenAI answers)."""
    if server.name == "textmill":
        url, body = f"{server.url}/v1/completions", {
            "model": server.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "logit_bias": banned, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    else:
        url, body = f"{server.url}/completion", {
            "prompt": prompt, "n_predict": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_tokens": True, "cache_prompt": True}
    start, ttft, ids, cached = time.perf_counter(), None, [], 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            new = (chunk.get("choices") or [{}])[0].get("token_ids") if server.name == "textmill" else (
                None if chunk.get("stop") else chunk.get("tokens"))
            if new:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                ids += new
            if usage := chunk.get("usage"):
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            if chunk.get("stop"):
                cached = chunk.get("timings", {}).get("cache_n", 0)
    # llama-server's stream leaves out the ids of tokens whose text it held back (a random model's
    # broken UTF-8): the next turn goes on with the ids it gave; textmill's must all be there.
    want = args.max_tokens if server.name == "textmill" else args.max_tokens // 2
    assert len(ids) >= want, f"{server.name} answered {len(ids)} tokens, not {args.max_tokens}"
    return {"ttft": ttft, "ids": ids, "prompt_tokens": len(prompt), "cached": cached}


async def conversations(server, args, banned: dict[str, int], tokenizer) -> dict:
    async def one(index: int) -> list[dict]:
        rng, prompt, turns = random.Random(f"chat-{index}"), [], []
        for _ in range(args.turns):
            words = " ".join(rng.choice(WORDS) for _ in range(args.user_words))
            prompt += tokenizer.encode(f"\nUser: {words}\nAssistant:", add_special_tokens=not prompt)
            turns.append(await _turn(http, server, prompt, args, banned))
            prompt += turns[-1]["ids"]
        return turns

    # A connection per request: llama-server's /completion stream, its connection then reused, stopped
    # the server now and then on this machine ("cleaning up before exit" after a turn).
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=1200, limits=limits) as http:
        start = time.perf_counter()
        runs = await asyncio.gather(*(one(i) for i in range(args.conversations)))
        wall = time.perf_counter() - start
    later = [t for run in runs for t in run[1:]]
    return {"ttft_first_p50_s": statistics.median(run[0]["ttft"] for run in runs),
            "ttft_later_p50_s": statistics.median(t["ttft"] for t in later),
            "cached_share": sum(t["cached"] for t in later) / max(1, sum(t["prompt_tokens"] for t in later)),
            "later_prompt_tokens": statistics.mean(t["prompt_tokens"] for t in later), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["synthetic-qwen35", "synthetic-lfm2"])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--user-words", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--port", type=int, default=8470)
    args = p.parse_args()
    rows = []
    for key in args.models:
        path = resolve(key)
        banned = {str(t): -100 for t in eos_token_ids(path)}
        tokenizer = load_gguf_tokenizer(path)
        for system in args.systems:
            kind, extra = SYSTEMS[system]
            server = (start_textmill(args.port, extra, model=path) if kind == "textmill"
                      else start_llama_server(args.port, path))
            row = {"model": key, "system": system, "ready_s": server.ready_s}
            try:
                row |= asyncio.run(conversations(server, args, banned, tokenizer))
            except (httpx.HTTPError, AssertionError) as exc:  # a server that fails a turn: said, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                stop(server)
            rows.append(row)
            print(_line(row), flush=True)
    print("\n| model | system | TTFT turn 1 p50 s | TTFT later turns p50 s | their / textmill's | cached | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mine = next((m for m in rows if m["model"] == r["model"] and m["system"] == "textmill" and "error" not in m),
                    None)
        if "error" in r or mine is None:
            print(f"| {r['model']} | {r['system']} | {r.get('error', 'textmill failed')} | | | | |")
            continue
        r["later_ttft_vs_textmill"] = r["ttft_later_p50_s"] / mine["ttft_later_p50_s"]
        print(f"| {r['model']} | {r['system']} | {r['ttft_first_p50_s']:.2f} | {r['ttft_later_p50_s']:.2f} | "
              f"{r['later_ttft_vs_textmill']:.2f}x | {r['cached_share']:.0%} | {r['wall_s']:.1f} |")
    write_result("chat_turns", {"args": vars(args), "results": rows})


def _line(r: dict) -> str:
    if "error" in r:
        return f"[{r['model']}/{r['system']}] failed: {r['error']}"
    return (f"[{r['model']}/{r['system']}] TTFT p50 turn 1 {r['ttft_first_p50_s']:.2f} s, later turns "
            f"{r['ttft_later_p50_s']:.2f} s ({r['later_prompt_tokens']:.0f} prompt tokens, {r['cached_share']:.0%} "
            f"cached), wall {r['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
