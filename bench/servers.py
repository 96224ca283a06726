"""Start and stop the servers under test: textmill, llama.cpp's llama-server, llama-cpp-python.

Each starter returns a Server once /health answers 200 and /v1/models names the model,
with the time from the server process's start to that first 200 (`ready_s`, from the
process's start time in /proc, so a build or a shell in front does not count) and its
resident memory then. Every server runs in its own process group, so stop() ends it
together with any children (uvicorn workers, the shell of the shared script).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
LLAMA_SERVER_SCRIPT = REPO.parent / "shared" / "tools" / "llama-server.sh"
BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
LOG_DIR = REPO / "bench" / "results" / "logs"  # bench/results/ is git-ignored


class ServerError(RuntimeError):
    """A server did not start; the message carries the end of its log."""


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    model: str  # the id from /v1/models, to put in request bodies
    pgid: int  # process group to signal on stop
    log: Path
    pid: int | None = None  # the server process itself (its RSS is the server's memory)
    ready_s: float | None = None  # process start -> first /health 200
    # first /health 200 -> a /v1/models lookup and then a one-token completion both answered
    first_answer_s: float | None = None


TICKS = os.sysconf("SC_CLK_TCK")


def boot_seconds() -> float:
    """Now, on the clock /proc/PID/stat's start times count on (seconds since boot)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def set_page_cache(path: Path, state: str) -> None:
    """Put a model file in the page cache ("warm": read it through once) or take it out
    ("cold": POSIX_FADV_DONTNEED drops its clean pages; no privileges needed), so that every
    server's ready time starts from the same state. Without this the first server of a model
    read the file from disk (~0.45 GB/s on the project's VMs) and the next found it in memory.
    A page another process holds mapped stays, so "cold" is as cold as the machine allows."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if state == "cold":
            os.fdatasync(fd)  # DONTNEED leaves dirty pages: a file the bench just wrote
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            while os.read(fd, 16 << 20):
                pass
    finally:
        os.close(fd)


def process_start(pid: int) -> float | None:
    """When process pid started, in boot_seconds() (field 22 of /proc/PID/stat, 10 ms ticks)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19]) / TICKS


def memory_mib(pid: int | None) -> dict[str, float | None]:
    """Resident memory of one process now (VmRSS) and at its peak so far (VmHWM), in MiB."""
    out: dict[str, float | None] = {"rss": None, "peak": None}
    if pid is None:
        return out
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def kv_capacity(system: str, log: Path) -> tuple[int | None, str | None]:
    """The KV cache's size in tokens and its element type, as the server's own log says.

    textmill logs "KV cache N blocks of B tokens" and, in its plan line, "KV cache float16";
    llama-server "n_slots = N, n_ctx_slot = M" (M tokens of context per slot; at its
    default log level it prints neither the cache's bytes nor its type, f16 by default).
    """
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None, None
    if system == "textmill":
        m = re.search(r"KV cache (\d+) blocks of (\d+) tokens", text)
        dtype = re.search(r"KV cache (float32|float16|bfloat16)", text)
        return (int(m[1]) * int(m[2]) if m else None), (dtype[1] if dtype else None)
    m = re.search(r"n_slots = (\d+), n_ctx_slot = (\d+)", text)
    return (int(m[1]) * int(m[2]) if m else None), os.environ.get("LLAMA_ARG_CACHE_TYPE_K", "f16")


def prepare_textmill(model: Path, extra_args: list[str] = (),
                     python: Path = REPO / ".venv" / "bin" / "python") -> str | None:
    """Before textmill's timed start: build its C++ kernels if their sources changed (a
    build is not start-up time, as llama.cpp's is not), and return the KV element type
    textmill will choose for `model` (its runner/plan.py decides: float16 on the CPU
    kernels at the time of writing); None where this textmill has no such plan (it then
    keeps the activation dtype). One throw-away process."""
    want = next((extra_args[i + 1] for i, a in enumerate(extra_args[:-1]) if a == "--kv-cache-dtype"), "auto")
    code = ("import sys, pathlib\n"
            "from textmill.kernels.build import build_all\n"
            "build_all()\n"
            "from textmill.config import DeviceConfig\n"
            "from textmill.runner.plan import decide\n"
            "print(decide(pathlib.Path(sys.argv[1]), DeviceConfig(kv_cache_dtype=sys.argv[2])).kv_dtype)\n")
    try:
        done = subprocess.run([str(python), "-c", code, str(model), want], capture_output=True, text=True,
                              timeout=1800, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = done.stdout.split()
    return words[-1] if done.returncode == 0 and words else None


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _model_id(url: str) -> str | None:
    try:
        r = httpx.get(url + "/v1/models", timeout=5.0)
        data = r.json().get("data") or [] if r.status_code == 200 else []
        return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError):
        return None


def wait_ready(url: str, pgid: int, log: Path, timeout_s: float, alive=None) -> tuple[float, str, float]:
    """Poll GET /health every 0.1 s until it answers 200; return (boot_seconds() then, model
    id, first answer): the first answer is the seconds from that 200 until the model id lookup
    and a one-token completion sent right after it have come back, what "ready" is worth to
    the first client (work a server starts only once it is ready delays it).

    alive(): whether it is still worth waiting (default: the process group exists).
    """
    alive = alive or (lambda: _alive(pgid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise ServerError(f"server exited during start-up; log {log}:\n{_log_tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                ready = boot_seconds()
                model = _model_id(url)
                if model is not None:
                    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
                    httpx.post(url + "/v1/completions", json=body, timeout=120.0).raise_for_status()
                    return ready, model, boot_seconds() - ready
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    _kill_group(pgid)
    raise ServerError(f"no /health 200 from {url} in {timeout_s:.0f} s; log {log}:\n{_log_tail(log)}")


def _spawn(name: str, cmd: list[str], port: int, timeout_s: float, env: dict | None = None) -> Server:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{name}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO, env=env)
    started = process_start(proc.pid) or boot_seconds()
    url = f"http://127.0.0.1:{port}"
    # proc.poll(), not the process group: an exited child stays a zombie until it is reaped,
    # and signalling a zombie succeeds, so a server that died at start would be waited on
    # for the whole timeout.
    ready, model, first = wait_ready(url, proc.pid, log, timeout_s, alive=lambda: proc.poll() is None)
    return Server(name=name, url=url, model=model, pgid=proc.pid, log=log, pid=proc.pid,
                  ready_s=ready - started, first_answer_s=first)


def start_textmill(port: int, extra_args: list[str] = (), timeout_s: float = 900.0,
                   exe: Path = REPO / ".venv" / "bin" / "textmill", model: Path | None = None) -> Server:
    """`textmill serve` on `model` (default: the bundled one)."""
    cmd = [str(exe), "serve", *([str(model)] if model else []), "--host", "127.0.0.1", "--port", str(port),
           *extra_args]
    return _spawn("textmill", cmd, port, timeout_s)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def start_llama_server(port: int, gguf: Path, slots: int = 16, timeout_s: float = 900.0,
                       repack: bool | None = None, script: Path = LLAMA_SERVER_SCRIPT) -> Server:
    """llama.cpp's llama-server through the shared script (builds it on first use).

    The script starts the server under setsid, waits for it and prints its PID, which is
    also its process group id. repack=None turns ggml's extra buffer types off where the
    CPU advertises AMX: a -march=native build then uses AMX tiles, which fault in VMs that
    advertise AMX without enabling its state (this machine: SIGILL at the first matmul).
    On x86 the only other extra buffer type is repacking, which covers Q4_0/Q4_K/IQ4_NL
    but not the bundled model's Q4_1 and Q8_0 tensors, so for it nothing else changes.
    """
    if not script.is_file():
        raise ServerError(f"missing {script}")
    if repack is None:
        repack = "amx_tile" not in cpu_flags()
    env = {**os.environ, "LLAMA_ARG_REPACK": "1" if repack else "0"}  # llama.cpp's --[no-]repack
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    build_log = LOG_DIR / f"llama-server-build-{port}.log"
    log = Path.home() / ".cache" / "llama-server-build" / f"llama-server-{port}.log"
    url = f"http://127.0.0.1:{port}"
    # The script waits for the server in 1 s steps before it prints the PID; /health is polled
    # here meanwhile, in 0.1 s steps, so that the ready time is not rounded up to a second.
    with open(build_log, "wb") as err:
        script_proc = subprocess.Popen(["bash", str(script), str(port), str(gguf), str(slots)],
                                       stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                       cwd=REPO, env=env, start_new_session=True)
    watch = _ScriptWatch(script_proc)
    try:
        ready, model, first = wait_ready(url, script_proc.pid, log, timeout_s, alive=watch.alive)
        script_proc.wait(timeout=180)
        if not watch.alive():
            raise ServerError("llama-server.sh did not print a live server PID")
    except (ServerError, subprocess.TimeoutExpired) as exc:
        _kill_group(script_proc.pid)
        if watch.pid is not None:
            _kill_group(watch.pid)
        raise ServerError(f"llama-server failed ({exc}); logs {build_log}, {log}:\n{_log_tail(build_log)}") from exc
    started = process_start(watch.pid)
    return Server(name="llama-server", url=url, model=model, pgid=watch.pid, log=log, pid=watch.pid,
                  ready_s=None if started is None else ready - started, first_answer_s=first)


class _ScriptWatch:
    """The shared script while it builds and starts llama-server, then the server it printed
    the PID of (setsid: the server leads its own process group)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid: int | None = None

    def alive(self) -> bool:
        code = self.proc.poll()
        if code is None:
            return True
        if code != 0:
            return False
        if self.pid is None:
            words = self.proc.stdout.read().split()
            self.pid = int(words[-1]) if words and words[-1].isdigit() else None
        return self.pid is not None and _alive(self.pid)


def llama_cpp_python_available(python: Path = BENCH_PYTHON) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import llama_cpp.server"],
                           capture_output=True, timeout=120)
    return probe.returncode == 0


def start_llama_cpp_python(port: int, gguf: Path, n_ctx: int = 4096, threads: int = 2,
                           repack: bool | None = None, timeout_s: float = 300.0,
                           python: Path = BENCH_PYTHON) -> Server:
    """llama-cpp-python's OpenAI server from the bench venv (never from .venv).

    It runs one request at a time behind a lock. Its default, interrupt_requests=True,
    ends a running stream early whenever another request waits, which would make every
    concurrent run look short and fast; off, later requests queue instead.
    """
    if repack is None:
        repack = "amx_tile" not in cpu_flags()
    shim = REPO / "bench" / "llama_cpp_server.py"  # adds --no-extra-bufts, like llama-server's --no-repack
    cmd = [str(python), str(shim), *([] if repack else ["--no-extra-bufts"]), "--model", str(gguf),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--interrupt_requests", "false"]
    return _spawn("llama-cpp-python", cmd, port, timeout_s)


def _kill_group(pgid: int, grace_s: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _alive(pgid):
                return
            try:  # reap our own child so the group disappears
                os.waitpid(pgid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)


def stop(server: Server) -> None:
    """SIGTERM the server's process group, SIGKILL after a grace period."""
    _kill_group(server.pgid)
