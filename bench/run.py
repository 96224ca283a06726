"""`make bench`: textmill against llama.cpp's llama-server on a matrix of models, in one run.

For each model (the bundled SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M, a random-weight
1B-class Llama and a random-weight file of Qwen3-0.6B's shapes, both in Q4_K_M's tensor
types, and any --model FILE), each system is started
alone on the same GGUF file (the machine has 2 cores; two servers at once would measure
each other), timed from process start to its first /health 200, warmed up, loaded at each
concurrency with the same workload (the model's own ending ids banned), and stopped. Each
model gets one table, with textmill's tok/s over each other system's at the same
concurrency, the servers' ready times and resident memory; a summary line per model ends
the run. Results: bench/results/<time>-<commit>.json and latest.json (git-ignored);
`python bench/report.py` turns them into the Markdown of docs/performance.md.

    python bench/run.py                               # smollm2 gemma3 synthetic-1b synthetic-qwen3; C=1,16
    python bench/run.py --quick                       # fewer requests
    python bench/run.py --models smollm2 --model ~/my.gguf --with-64
    python bench/run.py --models smollm2 --systems textmill llama-server llama-cpp-python hf
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
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuwatch  # noqa: E402
import models  # noqa: E402
import servers  # noqa: E402
import stamp  # noqa: E402
import tables  # noqa: E402
from loadgen import run_load, warm_up  # noqa: E402
from workload import Workload  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SYSTEMS = ("textmill", "llama-server", "llama-cpp-python", "hf")
DEFAULT_SYSTEMS = ("textmill", "llama-server")
SLOT_CONTEXT = 1024  # tokens of context per llama-server slot (../shared/tools/llama-server.sh)
# Issue 5's goals for textmill on SmolLM2, on its reference machine (docs/performance.md).
ISSUE_GOALS = {"c1": 93.0, "c16": 560.0}
TTFT_GOAL_S = 0.5


def free_port(start: int) -> int:
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port from {start}")


ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "f16": 2, "q8_0": 1}


def kv_args(model: models.BenchModel, args: argparse.Namespace, kv_dtype: str | None) -> list[str]:
    """textmill flags that give it llama-server's KV capacity in tokens (slots x 1024).

    kv_dtype: the element type textmill will store K and V in (None: unknown, float32
    assumed). llama.cpp keeps f16, and for Gemma 3's sliding-window layers only the window;
    the table heading says what each side allocated. --kv-tokens 0 keeps textmill's default.
    """
    tokens = args.kv_tokens
    if tokens <= 0 or "--kv-cache-memory" in args.textmill_args:
        return []
    per_token = model.info.kv_bytes_per_token(ELEMENT_BYTES.get(kv_dtype or "float32", 4))
    gib = (tokens + 8) * per_token / 2**30  # half a block over, against float rounding
    out = ["--kv-cache-memory", f"{gib:.6f}"]
    if model.info.context > tokens and "--max-model-len" not in args.textmill_args:
        out += ["--max-model-len", str(tokens)]  # older textmill wants one full context in the cache
    return out


def start(system: str, model: models.BenchModel, args: argparse.Namespace, port: int) -> servers.Server:
    max_c = max(args.concurrency)
    if system == "textmill":
        own = shlex.split(args.textmill_args)
        kv_dtype = servers.prepare_textmill(model.path, own)  # builds the kernels first, untimed
        kv = kv_args(model, args, kv_dtype)
        servers.set_page_cache(model.path, args.page_cache)
        return servers.start_textmill(port, ["--max-num-seqs", str(max(max_c, 16)), *kv, *own], model=model.path)
    repack = {"auto": None, "on": True, "off": False}[args.llama_repack]
    if system == "llama-server":
        return servers.start_llama_server(port, model.path, slots=args.slots, repack=repack)
    return servers.start_llama_cpp_python(port, model.path, repack=repack)


def bench_server(system: str, model: models.BenchModel, args: argparse.Namespace,
                 workload: Workload) -> tuple[list[dict], dict]:
    """Start one server, warm it up, run every concurrency, stop it: (rows, server record)."""
    port = free_port(args.port)
    quiet(args, system)
    if system != "textmill":  # textmill: inside start(), after its untimed kernel build
        servers.set_page_cache(model.path, args.page_cache)
    server = start(system, model, args, port)
    loaded = servers.memory_mib(server.pid)
    print(f"[{model.key}/{system}] ready on {server.url} as {server.model!r} in {tables.fmt(server.ready_s, 1)} s, "
          f"first answer {tables.fmt(server.first_answer_s, 2)} s later, RSS {tables.fmt(loaded['rss'], 0)} MiB",
          flush=True)
    rows = []
    try:
        asyncio.run(warm_up(server.url, server.model, workload, args.warmup))
        for c in args.concurrency:
            rows.append(measure(server, f"{model.key}/{system}", args, workload, c))
        end = servers.memory_mib(server.pid)
    finally:
        servers.stop(server)
    record = {"system": system, "ready_s": server.ready_s, "first_answer_s": server.first_answer_s,
              "rss_load_mib": loaded["rss"], "rss_end_mib": end["rss"], "rss_peak_mib": end["peak"],
              **dict(zip(("kv_tokens", "kv_dtype"), servers.kv_capacity(system, server.log)))}
    return [{"system": system, **r, **{k: v for k, v in record.items() if k != "system"}} for r in rows], record


def measure(server: servers.Server, label: str, args: argparse.Namespace, workload: Workload, c: int) -> dict:
    """One concurrency; re-run (up to --retries times) while other processes disturbed it."""
    n = max(args.min_requests, args.rounds * c)
    best: dict | None = None
    for attempt in range(1 + args.retries):
        # Fresh prompts per concurrency and attempt: prompts the server saw before would be
        # prefix-cache hits. Attempt k uses the same prompts for every system.
        w = replace(workload, seed=workload.seed + 1000 * c + 100 * attempt)
        quiet(args, label, server.pgid)
        before = cpuwatch.snapshot(server.pgid)
        r = asyncio.run(run_load(server.url, server.model, w, c, requests=n, label=label))
        after = cpuwatch.snapshot(server.pgid)
        others, cores = cpuwatch.others_share(before, after), cpuwatch.group_cores(before, after)
        print(f"[{label}] C={c}: {r.total_tok_s:.1f} tok/s, TTFT p50 {r.ttft_p50_s or 0:.2f} s, "
              f"{r.errors} errors, server used {cores:.2f} cores, others {others:.0%} of the CPUs"
              + "".join(f"; {x}" for x in r.notes), flush=True)
        if r.first_error:
            print(f"[{label}]   first error: {r.first_error}", flush=True)
        if best is None or others < best["others"]:
            best = {"concurrency": c, "tok_s": r.total_tok_s, "others": others, "cores": cores, "result": asdict(r)}
        if others < args.quiet_threshold:
            break
    return best


def quiet(args: argparse.Namespace, label: str, pgid: int | None = None) -> None:
    """Let other people's work finish first, up to --wait-quiet seconds."""
    if args.wait_quiet <= 0:
        return
    share = cpuwatch.wait_for_quiet(args.quiet_threshold, args.wait_quiet, pgid=pgid)
    if share >= args.quiet_threshold:
        print(f"[{label}] the machine is busy (others {share:.0%} of the CPUs); measuring anyway", flush=True)


def bench_hf(model: models.BenchModel, args: argparse.Namespace, workload: Workload) -> list[dict]:
    """The HF baseline in its own process, so its memory and threads leave with it."""
    out = RESULTS / "hf.json"
    cmd = [sys.executable, str(REPO / "bench" / "hf_baseline.py"), "--gguf", str(model.path),
           "--max-tokens", str(workload.max_tokens), "--prompt-words", str(workload.prompt_words),
           "--json", str(out), "--batch-sizes", *map(str, args.concurrency)]
    quiet(args, f"{model.key}/hf")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hf_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"hf_baseline failed:\n{done.stderr[-2000:]}")
    print(done.stdout, flush=True)
    return [{"system": "hf-generate", "concurrency": r["batch_size"], "tok_s": r["tok_s"],
             "others": r["others_cpu"], "cores": r["cores"], "result": None}
            for r in json.loads(out.read_text())]


def goal_lines(rows: list[dict]) -> list[str]:
    """Issue 5's goals (SmolLM2), as ratios to llama-server measured in this run where there is one.

    The issue's absolute figures (93 tok/s per stream, 560 tok/s at 16) come from its own
    reference machine; on another machine only the ratios to llama-server carry over.
    """
    ls = {r["concurrency"]: r["result"] for r in rows if r["system"] == "llama-server" and r["result"]}
    c1 = (ls[1]["stream_tok_s_p50"], "llama-server's stream tok/s here") if ls.get(1, {}).get("stream_tok_s_p50") \
        else (ISSUE_GOALS["c1"], "the issue's figure")
    c16 = (4 * ls[16]["total_tok_s"], "4x llama-server's tok/s here") if 16 in ls \
        else (ISSUE_GOALS["c16"], "the issue's figure")
    lines = []
    for r in rows:
        lr = r["result"]
        if r["system"] != "textmill" or lr is None:
            continue
        if r["concurrency"] == 1 and lr["stream_tok_s_p50"]:
            lines.append(f"goal 1 stream: {lr['stream_tok_s_p50']:.1f} / {c1[0]:.1f} stream tok/s ({c1[1]}) "
                         f"= {lr['stream_tok_s_p50'] / c1[0]:.2f}")
        if r["concurrency"] == 16:
            lines.append(f"goal 16 streams: {r['tok_s']:.1f} / {c16[0]:.1f} tok/s ({c16[1]}) "
                         f"= {r['tok_s'] / c16[0]:.2f}")
            if lr["ttft_p50_s"] is not None:
                lines.append(f"goal TTFT p50 at 16 streams: {lr['ttft_p50_s']:.2f} s (aim < {TTFT_GOAL_S} s)")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(models.MATRIX), metavar="NAME",
                   help=f"models of the matrix ({', '.join(models.MATRIX)}), smollm2-iq4xs (the bundled model in "
                        "IQ4_XS), synthetic-1b-q3k (the synthetic 1B in Q3_K), synthetic-8b (Llama 3 8B's shapes), "
                        "synthetic-gemma2 (Gemma 2 2B's), synthetic-phi3 (Phi-3-mini's) or GGUF paths "
                        "(default: the matrix)")
    p.add_argument("--model", action="append", default=[], type=Path, metavar="FILE",
                   help="add a GGUF file to the matrix (repeatable)")
    p.add_argument("--gguf", type=Path, default=None, help="bench this one file only (the old single-model run)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--with-64", action="store_true", help="add concurrency 64")
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each concurrency")
    p.add_argument("--min-requests", type=int, default=4, help="at least this many requests per run")
    p.add_argument("--quick", action="store_true", help="1 round, at least 2 requests: a smoke run")
    p.add_argument("--warmup", type=int, default=2, help="short requests before measuring each server")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--shared-prefix", type=float, default=0.0, help="0.9: the prefix-cache workload")
    p.add_argument("--slots", type=int, default=16, help="llama-server parallel slots, 1024 tokens of context each")
    p.add_argument("--kv-tokens", type=int, default=None,
                   help="textmill's KV cache in tokens (default: llama-server's, slots x 1024; 0: textmill's default)")
    p.add_argument("--llama-repack", choices=("auto", "on", "off"), default="auto",
                   help="llama.cpp weight repacking/AMX (both llama.cpp servers); "
                        "auto: off where the CPU advertises AMX")
    p.add_argument("--page-cache", choices=("warm", "cold"), default="warm",
                   help="the model file's state before each server starts (ready s): warm, read through once "
                        "(a restart); cold, its pages dropped (a first start after boot)")
    p.add_argument("--textmill-args", default="", help="extra `textmill serve` flags, one string")
    p.add_argument("--port", type=int, default=8300, help="first port to try")
    p.add_argument("--hf-timeout", type=float, default=900.0)
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="before each run, wait up to this many seconds for other processes to go idle")
    p.add_argument("--quiet-threshold", type=float, default=0.15,
                   help="idle enough: others use less than this share of the CPUs")
    p.add_argument("--retries", type=int, default=1,
                   help="re-runs of a measurement that others disturbed (the least disturbed is kept)")
    p.add_argument("--json", type=Path, default=None, help="result file (default bench/results/<time>-<commit>.json)")
    args = p.parse_args(argv)
    if args.with_64 and 64 not in args.concurrency:
        args.concurrency.append(64)
    if args.quick:
        args.rounds, args.min_requests = 1, 2
    if args.kv_tokens is None:
        args.kv_tokens = args.slots * SLOT_CONTEXT
    args.model_keys = [str(args.gguf)] if args.gguf else [*args.models, *map(str, args.model)]
    return args


def bench_model(key: str, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Every system on one model: the model's result dict and what failed."""
    model = models.load(key)
    workload = Workload(prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                        shared_prefix=args.shared_prefix, eos_token_ids=model.info.eos_token_ids)
    result = {"key": model.key, "path": str(model.path), "info": asdict(model.info),
              "eos_token_ids": list(model.info.eos_token_ids), "servers": [], "rows": []}
    print(f"\n== {tables.model_heading(result)}", flush=True)
    problems = []
    for system in args.systems:
        if system == "llama-cpp-python" and not servers.llama_cpp_python_available():
            print("[llama-cpp-python] skipped: not installed in .venv-bench (run `make bench-env`)", flush=True)
            continue
        try:
            if system == "hf":
                result["rows"] += bench_hf(model, args, workload)
            else:
                rows, record = bench_server(system, model, args, workload)
                result["rows"] += rows
                result["servers"].append(record)
        except (servers.ServerError, RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            problems.append(f"{model.key}/{system}: {exc}")
            print(f"[{model.key}/{system}] FAILED: {exc}", flush=True)
    return result, problems


def print_model(result: dict) -> None:
    print(f"\n{tables.model_heading(result)}")
    print(tables.model_table(result))
    if result["key"] == "smollm2":
        for line in goal_lines(result["rows"]):
            print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    code = stamp.code_stamp()
    out_path = args.json or RESULTS / f"{started:%Y%m%d-%H%M%S}-{code['commit'][:7]}.json"
    doc = {"stamp": {"code": code, "machine": stamp.machine_stamp(), "time_utc": started.isoformat(timespec="seconds"),
                     "command": shlex.join([Path(sys.executable).name, *sys.argv])},
           "workload": {"prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
                        "shared_prefix": args.shared_prefix, "concurrency": args.concurrency,
                        "rounds": args.rounds, "min_requests": args.min_requests, "slots": args.slots,
                        "kv_tokens": args.kv_tokens, "textmill_args": args.textmill_args,
                        "page_cache": args.page_cache},
           "models": [], "problems": []}
    print(f"machine: {stamp.machine_label(doc['stamp']['machine'])}; commit {code['commit']}"
          + (" (with uncommitted changes)" if code["dirty"] else ""), flush=True)
    for key in args.model_keys:
        try:
            result, problems = bench_model(key, args)
        except (OSError, ValueError, ImportError, KeyError) as exc:  # a model that cannot be found or read
            result, problems = None, [f"{key}: {type(exc).__name__}: {exc}"]
            print(f"[{key}] FAILED: {exc}", flush=True)
        if result is not None:
            doc["models"].append(result)
            print_model(result)
        doc["problems"] += problems
        write(doc, out_path)  # after every model: a later failure keeps what was measured
    print(f"\nworkload: {args.prompt_words}-word prompts (shared prefix {args.shared_prefix:.0%}), "
          f"{args.max_tokens} tokens each, each model's ending ids banned (logit_bias -100 and ignore_eos), "
          f"greedy, streaming; times in seconds")
    for result in doc["models"]:
        print_model(result)
    print()
    print(tables.summary_table(doc["models"]))
    for problem in doc["problems"]:
        print(f"FAILED {problem.splitlines()[0]}")
    print(f"results: {out_path}")
    return 1 if doc["problems"] or not any(m["rows"] for m in doc["models"]) else 0


def write(doc: dict, path: Path) -> None:
    text = json.dumps(doc, indent=2, default=str)
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
