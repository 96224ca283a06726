"""Compile-and-load for the C++ extensions in csrc/ (see the package docstring)."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger("textmill.kernels")

CSRC = Path(__file__).resolve().parent / "csrc"
# name -> the C++ file of that extension; each defines its own PYBIND11_MODULE.
KERNEL_NAMES = tuple(sorted(p.stem for p in CSRC.glob("*.cpp")))
# torch.utils.cpp_extension already asks for the C++ standard its headers need.
CFLAGS = ("-O3", "-march=native", "-fopenmp")
# cpp_extension guards a build folder with a lock file. A build that is killed (a test run
# stopped mid-compile) leaves it behind, and the next build of that folder waits on it
# forever, using no CPU and saying nothing. No build takes anywhere near this long (~1-2
# min on 2 cores), so a lock this old is a dead one.
STALE_LOCK_SECONDS = 15 * 60


def _cache_root() -> Path:
    base = os.environ.get("TEXTMILL_KERNEL_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "textmill" / "kernels"


def _cpu_key() -> str:
    """-march=native code is only valid on this CPU model: the build directory names it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _build_id(name: str) -> str:
    import torch

    h = hashlib.sha256()
    # Headers count too: a change to one must rebuild every extension that includes it.
    headers = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.h")))
    for part in ((CSRC / f"{name}.cpp").read_bytes(), headers, " ".join(CFLAGS).encode(),
                 torch.__version__.encode(), _cpu_key().encode()):
        h.update(part)
    return h.hexdigest()[:12]


@functools.cache  # one build/import per extension per process, like an import
def load(name: str, verbose: bool = False) -> ModuleType | None:
    """The compiled extension `name`, building it first if this machine has no build yet.
    None, with a warning in the log, when it cannot be built or loaded."""
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel extension {name!r}; have {KERNEL_NAMES}")
    try:
        build_id = _build_id(name)
        module = f"textmill_{name}_{build_id}"
        build_dir = _cache_root() / f"{name}-{build_id}"
        built = build_dir / f"{module}.so"
        if built.exists():
            # The build id covers every input of the build (sources, headers, flags, torch,
            # CPU), so a finished build is this build: import it without cpp_extension,
            # whose import (setuptools) and ninja check cost ~0.5-1 s of every start.
            return _import_built(module, built)
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(build_dir)
        return cpp_extension.load(
            name=module,
            sources=[str(CSRC / f"{name}.cpp")],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as exc:  # a missing compiler or ninja must not stop the server
        log.warning("C++ kernels %r unavailable, using the torch path: %s", name, str(exc).strip()[-500:])
        return None


def clear_stale_lock(build_dir: Path, now: float | None = None) -> bool:
    """Remove build_dir's cpp_extension lock if it is older than STALE_LOCK_SECONDS (see
    there); True when one was removed."""
    lock = build_dir / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    log.warning("removing a stale build lock %s (%.0f min old): a build was stopped there", lock, age / 60)
    lock.unlink(missing_ok=True)
    return True


def _import_built(module: str, path: Path) -> ModuleType:
    import importlib.util

    import torch  # noqa: F401 - loads libtorch, which the extension links against

    spec = importlib.util.spec_from_file_location(module, path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    return ext


def build_variant(name: str, variant: str, extra_flags: list[str]) -> ModuleType:
    """Extension `name` compiled with `extra_flags` after the usual ones (e.g. ISA extensions
    switched off) into a cached folder of its own: the tests build the paths this machine
    does not run this way. Raises where the build fails."""
    from torch.utils import cpp_extension

    build_dir = _cache_root() / f"{name}-{variant}"
    build_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(build_dir)
    return cpp_extension.load(name=f"textmill_{name}_{variant.replace('-', '_')}", sources=[str(CSRC / f"{name}.cpp")],
                              extra_cflags=[*CFLAGS, *extra_flags], extra_ldflags=["-fopenmp"],
                              build_directory=str(build_dir))


def build_all(verbose: bool = False) -> dict[str, bool]:
    return {name: load(name, verbose) is not None for name in KERNEL_NAMES}
