"""`make bench`: textmill against llama.cpp and HF transformers, side by side, in one run.

Each server is started alone (the machine has 2 cores; two servers at once would measure
each other), warmed up, loaded at each concurrency with the same workload, and stopped.
The HF generate() baseline runs last, offline. One table, with textmill's tok/s over each
other system's at the same concurrency (batch size, for HF).

    python bench/run.py                      # textmill, llama-server, llama-cpp-python, hf at C=1,16
    python bench/run.py --quick              # fewer requests
    python bench/run.py --systems llama-server hf --with-64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuwatch  # noqa: E402
import servers  # noqa: E402
from loadgen import LoadResult, format_table, run_load, warm_up  # noqa: E402
from workload import Workload  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SYSTEMS = ("textmill", "llama-server", "llama-cpp-python", "hf")
# Issue 5's goals for textmill on this workload, on its reference machine (docs/performance.md).
ISSUE_GOALS = {"c1": 93.0, "c16": 560.0}
TTFT_GOAL_S = 0.5


@dataclass(frozen=True)
class Row:
    """One line of the final table: a server at a concurrency, or HF at a batch size."""

    system: str
    concurrency: int
    tok_s: float
    result: LoadResult | None = None  # None for the offline HF rows
    others: float | None = None  # share of the CPUs used by other processes meanwhile
    cores: float | None = None  # CPU cores the system under test kept busy on average


def free_port(start: int) -> int:
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port from {start}")


def start(system: str, args: argparse.Namespace, port: int) -> servers.Server:
    max_c = max(args.concurrency)
    if system == "textmill":
        extra = ["--max-num-seqs", str(max(max_c, 16)), *shlex.split(args.textmill_args)]
        return servers.start_textmill(port, extra)
    repack = {"auto": None, "on": True, "off": False}[args.llama_repack]
    if system == "llama-server":
        return servers.start_llama_server(port, args.gguf, slots=args.slots, repack=repack)
    return servers.start_llama_cpp_python(port, args.gguf, repack=repack)


def bench_server(system: str, args: argparse.Namespace, workload: Workload) -> list[Row]:
    """Start one server, warm it up, run every concurrency, stop it."""
    port = free_port(args.port)
    t = time.monotonic()
    server = start(system, args, port)
    print(f"[{system}] ready on {server.url} as {server.model!r} in {time.monotonic() - t:.0f} s", flush=True)
    rows = []
    try:
        asyncio.run(warm_up(server.url, server.model, workload, args.warmup))
        for c in args.concurrency:
            rows.append(measure(server, system, args, workload, c))
    finally:
        servers.stop(server)
    return rows


def measure(server: servers.Server, system: str, args: argparse.Namespace, workload: Workload,
            c: int) -> Row:
    """One concurrency; re-run (up to --retries times) while other processes disturbed it."""
    n = max(args.min_requests, args.rounds * c)
    best: Row | None = None
    for attempt in range(1 + args.retries):
        # Fresh prompts per concurrency and attempt: prompts the server saw before would be
        # prefix-cache hits. Attempt k uses the same prompts for every system.
        w = replace(workload, seed=workload.seed + 1000 * c + 100 * attempt)
        quiet(args, system, server.pgid)
        before = cpuwatch.snapshot(server.pgid)
        r = asyncio.run(run_load(server.url, server.model, w, c, requests=n, label=system))
        after = cpuwatch.snapshot(server.pgid)
        others, cores = cpuwatch.others_share(before, after), cpuwatch.group_cores(before, after)
        print(f"[{system}] C={c}: {r.total_tok_s:.1f} tok/s, TTFT p50 {r.ttft_p50_s or 0:.2f} s, "
              f"{r.errors} errors, server used {cores:.2f} cores, others {others:.0%} of the CPUs"
              + "".join(f"; {x}" for x in r.notes), flush=True)
        if r.first_error:
            print(f"[{system}]   first error: {r.first_error}", flush=True)
        if best is None or others < best.others:
            best = Row(system, c, r.total_tok_s, result=r, others=others, cores=cores)
        if others < args.quiet_threshold:
            break
    return best


def quiet(args: argparse.Namespace, system: str, pgid: int | None = None) -> None:
    """Let other people's work finish first, up to --wait-quiet seconds."""
    if args.wait_quiet <= 0:
        return
    share = cpuwatch.wait_for_quiet(args.quiet_threshold, args.wait_quiet, pgid=pgid)
    if share >= args.quiet_threshold:
        print(f"[{system}] the machine is busy (others {share:.0%} of the CPUs); measuring anyway", flush=True)


def bench_hf(args: argparse.Namespace, workload: Workload) -> list[Row]:
    """The HF baseline in its own process, so its memory and threads leave with it."""
    out = RESULTS / "hf.json"
    cmd = [sys.executable, str(REPO / "bench" / "hf_baseline.py"), "--gguf", str(args.gguf),
           "--max-tokens", str(workload.max_tokens), "--prompt-words", str(workload.prompt_words),
           "--json", str(out), "--batch-sizes", *map(str, args.concurrency)]
    quiet(args, "hf")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hf_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"hf_baseline failed:\n{done.stderr[-2000:]}")
    print(done.stdout, flush=True)
    return [Row("hf-generate", r["batch_size"], r["tok_s"], others=r["others_cpu"], cores=r["cores"])
            for r in json.loads(out.read_text())]


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def final_table(rows: list[Row]) -> str:
    """All systems, with textmill's tok/s divided by each row's at the same concurrency."""
    tm = {r.concurrency: r.tok_s for r in rows if r.system == "textmill"}
    header = ("system", "conc", "tok/s", "textmill/x", "TTFT p50", "TTFT p99", "lat p50",
              "lat p99", "stream tok/s", "gen/req", "cached %", "err", "cores", "others %")
    body = []
    for r in sorted(rows, key=lambda r: (r.concurrency, SYSTEMS.index(_base(r.system)))):
        lr = r.result
        ratio = f"{tm[r.concurrency] / r.tok_s:.2f}x" if r.concurrency in tm and r.tok_s > 0 else "-"
        body.append([r.system, str(r.concurrency), _f(r.tok_s, 1), ratio,
                     _f(lr and lr.ttft_p50_s), _f(lr and lr.ttft_p99_s),
                     _f(lr and lr.latency_p50_s), _f(lr and lr.latency_p99_s),
                     _f(lr and lr.stream_tok_s_p50, 1), _f(lr and lr.mean_completion_tokens, 1),
                     _f(lr and lr.cached_fraction and 100 * lr.cached_fraction, 0),
                     str(lr.errors) if lr else "-", _f(r.cores), _f(r.others and 100 * r.others, 0)])
    return format_table(header, body)


def _base(system: str) -> str:
    return "hf" if system == "hf-generate" else system


def goals(rows: list[Row]) -> dict[str, tuple[float, str]]:
    """Issue 5's goals, as ratios to llama-server measured in this run where there is one.

    The issue's absolute figures (93 tok/s per stream, 560 tok/s at 16) come from its own
    reference machine; on another machine only the ratios to llama-server carry over.
    """
    ls = {r.concurrency: r.result for r in rows if r.system == "llama-server" and r.result}
    out = {"c1": (ISSUE_GOALS["c1"], "the issue's figure"), "c16": (ISSUE_GOALS["c16"], "the issue's figure")}
    if 1 in ls and ls[1].stream_tok_s_p50:
        out["c1"] = (ls[1].stream_tok_s_p50, "llama-server's stream tok/s here")
    if 16 in ls:
        out["c16"] = (4 * ls[16].total_tok_s, "4x llama-server's tok/s here")
    return out


def goal_lines(rows: list[Row]) -> list[str]:
    g = goals(rows)
    lines = []
    for r in rows:
        lr = r.result
        if r.system != "textmill" or lr is None:
            continue
        if r.concurrency == 1 and lr.stream_tok_s_p50:
            target, why = g["c1"]
            lines.append(f"goal 1 stream: {lr.stream_tok_s_p50:.1f} / {target:.1f} stream tok/s ({why}) "
                         f"= {lr.stream_tok_s_p50 / target:.2f}")
        if r.concurrency == 16:
            target, why = g["c16"]
            lines.append(f"goal 16 streams: {r.tok_s:.1f} / {target:.1f} tok/s ({why}) = {r.tok_s / target:.2f}")
            if lr.ttft_p50_s is not None:
                lines.append(f"goal TTFT p50 at 16 streams: {lr.ttft_p50_s:.2f} s (aim < {TTFT_GOAL_S} s)")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--with-64", action="store_true", help="add concurrency 64")
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each concurrency")
    p.add_argument("--min-requests", type=int, default=4, help="at least this many requests per run")
    p.add_argument("--quick", action="store_true", help="1 round, at least 2 requests: a smoke run")
    p.add_argument("--warmup", type=int, default=2, help="short requests before measuring each server")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--shared-prefix", type=float, default=0.0, help="0.9: the prefix-cache workload")
    p.add_argument("--gguf", type=Path, default=None, help="default: the bundled SmolLM2-135M Q4_1")
    p.add_argument("--slots", type=int, default=16, help="llama-server parallel slots (the issue's figures: 16)")
    p.add_argument("--llama-repack", choices=("auto", "on", "off"), default="auto",
                   help="llama.cpp weight repacking/AMX (both llama.cpp servers); auto: off where the CPU advertises AMX")
    p.add_argument("--textmill-args", default="", help="extra `textmill serve` flags, one string")
    p.add_argument("--port", type=int, default=8300, help="first port to try")
    p.add_argument("--hf-timeout", type=float, default=900.0)
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="before each run, wait up to this many seconds for other processes to go idle")
    p.add_argument("--quiet-threshold", type=float, default=0.15,
                   help="idle enough: others use less than this share of the CPUs")
    p.add_argument("--retries", type=int, default=1,
                   help="re-runs of a measurement that others disturbed (the least disturbed is kept)")
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    args = p.parse_args(argv)
    if args.with_64 and 64 not in args.concurrency:
        args.concurrency.append(64)
    if args.quick:
        args.rounds, args.min_requests = 1, 2
    if args.gguf is None:
        sys.path.insert(0, str(REPO))
        from textmill.loader.bundled import bundled_model_path
        args.gguf = bundled_model_path()
    return args


def collect(args: argparse.Namespace, workload: Workload) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    problems: list[str] = []
    for system in args.systems:
        if system == "llama-cpp-python" and not servers.llama_cpp_python_available():
            print("[llama-cpp-python] skipped: not installed in .venv-bench (run `make bench-env`)", flush=True)
            continue
        try:
            rows += bench_hf(args, workload) if system == "hf" else bench_server(system, args, workload)
        except (servers.ServerError, RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            problems.append(f"{system}: {exc}")
            print(f"[{system}] FAILED: {exc}", flush=True)
    return rows, problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                        shared_prefix=args.shared_prefix)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, problems = collect(args, workload)
    print()
    print(f"workload: {workload.prompt_words}-word prompts (shared prefix {workload.shared_prefix:.0%}), "
          f"{workload.max_tokens} tokens each, EOS banned, greedy, streaming; times in seconds")
    print(final_table(rows))
    for line in goal_lines(rows):
        print(line)
    for p in problems:
        print(f"FAILED {p.splitlines()[0]}")
    args.json.write_text(json.dumps({"workload": asdict(workload), "problems": problems,
                                     "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    return 1 if problems or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
