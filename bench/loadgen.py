"""Closed-loop load generator for any OpenAI-compatible /v1/completions server.

C clients each send streaming requests back to back (the next one as soon as the last one
finished) until a fixed number of requests, or a duration, is used up. Each request records
when it was sent, when its first content chunk came (TTFT), when its last one came, and
how many tokens it generated (usage from stream_options.include_usage, else one per chunk).

    python bench/loadgen.py --url http://127.0.0.1:8000 --model NAME --concurrency 16 --requests 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import format_table  # noqa: E402
from workload import SMOLLM2_EOS_TOKEN_IDS, Workload, request_body  # noqa: E402


@dataclass(frozen=True)
class RequestRecord:
    """One finished request; times in seconds from the start of the run."""

    sent: float
    first_token: float | None  # None when no content came back
    last_token: float | None
    done: float
    completion_tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None
    tokens_from_usage: bool
    error: str | None = None


@dataclass(frozen=True)
class LoadResult:
    """The summary of one run at one concurrency."""

    label: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    completion_tokens: int
    total_tok_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    stream_tok_s_p50: float | None  # per-stream decode rate after the first token
    mean_completion_tokens: float
    mean_prompt_tokens: float | None
    cached_tokens: int | None  # summed usage.prompt_tokens_details.cached_tokens
    cached_fraction: float | None  # of all prompt tokens: the prefix cache's hit rate
    usage_counted: bool  # all token counts came from the server's usage, not chunk counts
    first_error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    return choices[0].get("text") or ""


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> RequestRecord:
    sent = time.perf_counter() - t0
    first = last = None
    chunks = 0
    usage: dict | None = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")[:300]
            raise RuntimeError(f"HTTP {resp.status_code}: {text}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {json.dumps(chunk['error'])[:300]}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            if _chunk_text(chunk):
                now = time.perf_counter() - t0
                first = now if first is None else first
                last = now
                chunks += 1
    done = time.perf_counter() - t0
    from_usage = bool(usage and usage.get("completion_tokens") is not None)
    details = (usage or {}).get("prompt_tokens_details") or {}
    return RequestRecord(
        sent=sent, first_token=first, last_token=last, done=done,
        completion_tokens=usage["completion_tokens"] if from_usage else chunks,
        prompt_tokens=(usage or {}).get("prompt_tokens"),
        cached_tokens=details.get("cached_tokens"),
        tokens_from_usage=from_usage,
    )


async def _client_loop(client, url, model, workload, next_index, deadline, t0, records) -> None:
    """One closed-loop client: take the next request index, send it, wait, repeat."""
    while True:
        index = next_index()
        if index is None or (deadline is not None and time.perf_counter() >= deadline):
            return
        body = request_body(workload, model, index)
        try:
            records.append(await _stream_one(client, url, body, t0))
        except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as exc:
            now = time.perf_counter() - t0
            records.append(RequestRecord(now, None, None, now, 0, None, None, False,
                                         error=f"{type(exc).__name__}: {exc}"[:300]))


def _counter(limit: int | None):
    """A next-index function shared by the clients (single event loop: no lock needed)."""
    state = {"n": 0}

    def next_index() -> int | None:
        if limit is not None and state["n"] >= limit:
            return None
        state["n"] += 1
        return state["n"] - 1
    return next_index


async def run_load(url: str, model: str, workload: Workload, concurrency: int,
                   requests: int | None = None, duration_s: float | None = None,
                   label: str = "", timeout_s: float = 600.0) -> LoadResult:
    """Run C closed-loop clients until `requests` are done or `duration_s` has passed."""
    if requests is None and duration_s is None:
        raise ValueError("give a number of requests or a duration")
    endpoint = url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    records: list[RequestRecord] = []
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = None if duration_s is None else t0 + duration_s
        next_index = _counter(requests)
        await asyncio.gather(*(
            _client_loop(client, endpoint, model, workload, next_index, deadline, t0, records)
            for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(records, wall, concurrency, workload, label)


def summarize(records: list[RequestRecord], wall: float, concurrency: int,
              workload: Workload, label: str) -> LoadResult:
    ok = [r for r in records if r.error is None]
    errors = [r for r in records if r.error is not None]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.first_token - r.sent for r in ok if r.first_token is not None]
    latency = [r.done - r.sent for r in ok]
    rates = [(r.completion_tokens - 1) / (r.last_token - r.first_token) for r in ok
             if r.first_token is not None and r.completion_tokens > 1 and r.last_token > r.first_token]
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    mean_tokens = tokens / len(ok) if ok else 0.0
    notes = []
    if ok and mean_tokens < workload.max_tokens:
        notes.append(f"mean completion {mean_tokens:.1f} < max_tokens {workload.max_tokens}: EOS not banned?")
    if ok and not all(r.tokens_from_usage for r in ok):
        notes.append("some token counts are chunk counts (no usage in the stream)")
    return LoadResult(
        label=label, concurrency=concurrency, requests=len(records), errors=len(errors),
        wall_s=wall, completion_tokens=tokens, total_tok_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        latency_p50_s=percentile(latency, 50), latency_p99_s=percentile(latency, 99),
        stream_tok_s_p50=percentile(rates, 50), mean_completion_tokens=mean_tokens,
        mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
        cached_tokens=sum(cached) if cached else None,
        cached_fraction=sum(cached) / sum(prompts) if cached and sum(prompts) else None,
        usage_counted=bool(ok) and all(r.tokens_from_usage for r in ok),
        first_error=errors[0].error if errors else None, notes=tuple(notes),
    )


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


COLUMNS = ("system", "conc", "reqs", "err", "tok/s", "TTFT p50", "TTFT p99",
           "lat p50", "lat p99", "stream tok/s", "gen/req", "prompt", "cached %")


def table_rows(results: list[LoadResult]) -> list[list[str]]:
    return [[r.label, str(r.concurrency), str(r.requests), str(r.errors), _fmt(r.total_tok_s, 1),
             _fmt(r.ttft_p50_s), _fmt(r.ttft_p99_s), _fmt(r.latency_p50_s), _fmt(r.latency_p99_s),
             _fmt(r.stream_tok_s_p50, 1), _fmt(r.mean_completion_tokens, 1),
             _fmt(r.mean_prompt_tokens, 1), _fmt(r.cached_fraction and 100 * r.cached_fraction, 0)]
            for r in results]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model name the server expects")
    p.add_argument("--concurrency", "-c", type=int, default=1)
    p.add_argument("--requests", "-n", type=int, default=None, help="total requests (default 2 x concurrency)")
    p.add_argument("--duration", type=float, default=None, help="seconds to keep starting requests instead")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--shared-prefix", type=float, default=0.0,
                   help="fraction of prompt words common to all requests (0.9 for the prefix-cache workload)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-token-ids", type=int, nargs="*", default=list(SMOLLM2_EOS_TOKEN_IDS),
                   help="tokens banned by logit_bias (default SmolLM2's 0 2); none given bans none")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send the ignore_eos extension")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) before the run")
    p.add_argument("--label", default="server")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def workload_from_args(args: argparse.Namespace) -> Workload:
    return Workload(prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                    shared_prefix=args.shared_prefix, seed=args.seed, temperature=args.temperature,
                    eos_token_ids=tuple(args.eos_token_ids),
                    ignore_eos=not args.no_ignore_eos)


async def warm_up(url: str, model: str, workload: Workload, n: int) -> None:
    """Requests outside the measured window (a different seed: no prefix-cache head start)."""
    if n > 0:
        warm = Workload(**{**asdict(workload), "seed": workload.seed + 10_007, "max_tokens": 8})
        await run_load(url, model, warm, concurrency=1, requests=n, label="warmup")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = workload_from_args(args)
    requests = args.requests
    if requests is None and args.duration is None:
        requests = 2 * args.concurrency
    asyncio.run(warm_up(args.url, args.model, workload, args.warmup))
    result = asyncio.run(run_load(args.url, args.model, workload, args.concurrency,
                                  requests=requests, duration_s=args.duration, label=args.label))
    print(format_table(COLUMNS, table_rows([result])))
    for note in result.notes:
        print(f"note: {note}")
    if result.first_error:
        print(f"first error: {result.first_error}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
