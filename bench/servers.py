"""Start and stop the servers under test: textmill, llama.cpp's llama-server, llama-cpp-python.

Each starter returns a Server once /v1/models answers (the model is loaded by then), with
the model id the server reports. Every server runs in its own process group, so stop()
ends it together with any children (uvicorn workers, the shell of the shared script).
"""
from __future__ import annotations

import os
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


def wait_ready(url: str, pgid: int, log: Path, timeout_s: float) -> str:
    """Poll GET /v1/models until it answers; return the first model id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pgid):
            raise ServerError(f"server exited during start-up; log {log}:\n{_log_tail(log)}")
        try:
            r = httpx.get(url + "/v1/models", timeout=2.0)
            if r.status_code == 200:
                data = r.json().get("data") or []
                if data:
                    return data[0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _kill_group(pgid)
    raise ServerError(f"no answer from {url}/v1/models in {timeout_s:.0f} s; log {log}:\n{_log_tail(log)}")


def _spawn(name: str, cmd: list[str], port: int, timeout_s: float, env: dict | None = None) -> Server:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{name}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    model = wait_ready(url, proc.pid, log, timeout_s)
    return Server(name=name, url=url, model=model, pgid=proc.pid, log=log)


def start_textmill(port: int, extra_args: list[str] = (), timeout_s: float = 300.0,
                   exe: Path = REPO / ".venv" / "bin" / "textmill") -> Server:
    """`textmill serve` on the bundled model (or the model given in extra_args)."""
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args]
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
    with open(build_log, "wb") as err:
        done = subprocess.run(["bash", str(script), str(port), str(gguf), str(slots)],
                              stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                              timeout=timeout_s, cwd=REPO, env=env)
    if done.returncode != 0 or not done.stdout.strip():
        raise ServerError(f"llama-server.sh failed; log {build_log}:\n{_log_tail(build_log)}")
    pgid = int(done.stdout.split()[-1])
    log = Path.home() / ".cache" / "llama-server-build" / f"llama-server-{port}.log"
    url = f"http://127.0.0.1:{port}"
    return Server(name="llama-server", url=url, model=wait_ready(url, pgid, log, 60.0), pgid=pgid, log=log)


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
