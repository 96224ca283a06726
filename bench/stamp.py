"""What a result file is stamped with: the code (git commit, dirty or not) and the machine.

Figures are only comparable within one machine, and the project's machines change from
session to session, so every result names its CPU (model name, family/model numbers, the
SIMD features the kernels care about), its core count and memory.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The features that decide which kernels textmill and llama.cpp run, in this order.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_tile", "amx_int8")


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def changed_files(porcelain: str) -> list[str]:
    """Paths of `git status --porcelain` lines ("XY path"; the first line's leading blank
    may have been stripped, so split rather than slice)."""
    return [parts[1] for parts in (line.split(None, 1) for line in porcelain.splitlines()) if len(parts) == 2]


def code_stamp() -> dict:
    """The commit, and whether tracked files differed from it (other work in the tree)."""
    changed = changed_files(_git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": _git("rev-parse", "HEAD")[:12] or "unknown", "dirty": bool(changed),
            "dirty_files": changed[:50]}


def cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    return fields


def machine_stamp(info: dict[str, str] | None = None) -> dict:
    info = cpuinfo() if info is None else info
    flags = set(info.get("flags", "").split())
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0.0
    stamp = {"cpu": info.get("model name", platform.processor() or "unknown"),
             "family": info.get("cpu family"), "model": info.get("model"),
             "cores": os.cpu_count(), "mem_gib": round(mem, 1),
             "simd": [f for f in SIMD_FLAGS if f in flags], "kernel": platform.release()}
    gpus = _gpus()
    if gpus:
        stamp["gpu"] = gpus
    return stamp


def _gpus() -> str:
    """The NVIDIA GPUs' names ("NVIDIA H200"), "" without nvidia-smi: --device cuda runs
    are stamped with the device they ran on."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return ", ".join(done.stdout.split("\n")).strip(", ") if done.returncode == 0 else ""


def machine_label(m: dict) -> str:
    """A short name for tables: "AMD EPYC (fam 26 model 2), 2 cores, avx512 vnni bf16"."""
    simd = set(m.get("simd") or ())
    isa = "avx512" if "avx512f" in simd else "avx2" if "avx2" in simd else "no avx2"
    extras = [x for x, f in (("vnni", "avx512_vnni"), ("avx-vnni", "avx_vnni"), ("bf16", "avx512_bf16"),
                             ("amx", "amx_tile")) if f in simd]
    fam = f" (fam {m['family']} model {m['model']})" if m.get("family") else ""
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m.get('cpu', '?')}{fam}, {m.get('cores', '?')} cores, {' '.join([isa, *extras])}{gpu}"


def write_result(kind: str, payload: dict) -> Path:
    """bench/results/<kind>-<time>.json: payload stamped with the code, the machine and the
    command line; prints the machine and the file's path, and returns the path."""
    import json
    import shlex
    import sys
    import time

    machine = machine_stamp()
    out = REPO / "bench" / "results" / time.strftime(f"{kind}-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"code": code_stamp(), "machine": machine,
                               "command": shlex.join([Path(sys.executable).name, *sys.argv]), **payload}, indent=1))
    print(f"{machine_label(machine)}; wrote {out}")
    return out
