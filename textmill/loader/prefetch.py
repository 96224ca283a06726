"""Reading the model's files into the page cache while the process imports its libraries.

A server spends its first ~1.5 s importing torch and the HTTP stack before it opens the
model; a file that is not in the page cache (the first start after a boot, or after the
cache evicted it) is then read at the disk's rate while the loader waits: ~0.45 GB/s on the
project's VMs, 1.6 s for a 1B Q4_K_M and 11 s for an 8B. posix_fadvise(WILLNEED) asks the
kernel to start those reads at once; the loader later finds the pages it needs in memory,
or being read. llama.cpp does the same for its mapped file (MAP_POPULATE, madvise WILLNEED).

This module imports nothing heavy: the CLI calls it before torch is imported.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

# Files past this share of the memory available are left alone: reading them ahead would
# push out the pages of what the process has just read.
_MAX_SHARE_OF_AVAILABLE = 0.5


def model_files(path: Path) -> list[Path]:
    """The files a load reads the weights from: the GGUF itself, or a folder's safetensors."""
    if path.is_dir():
        return sorted(path.glob("*.safetensors"))
    return [path] if path.is_file() else []


def available_bytes() -> int | None:
    """What the process may still fill: MemAvailable of /proc/meminfo, or less where a
    cgroup (v2) caps the process's memory, page cache included (a container); None where
    neither says (not Linux)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def advise_will_need(files: list[Path]) -> int:
    """Ask the kernel to read these files ahead; the bytes asked for. Blocks while the reads
    are queued (a second or more for a file of several GB), hence the thread below."""
    asked = 0
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue  # the load reports a missing or unreadable file in its own words
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            asked += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return asked


def prefetch_in_background(path: Path) -> threading.Thread | None:
    """Start reading `path`'s weight files ahead in a daemon thread (os.posix_fadvise drops
    the GIL); None where there is nothing to do: no such call on this OS, no files, or more
    bytes than half the memory available."""
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        files = model_files(Path(path))
        size = sum(f.stat().st_size for f in files)
    except OSError:  # unreadable, or a link to nothing: the load says so in its own words
        return None
    avail = available_bytes()
    if not files or (avail is not None and size > _MAX_SHARE_OF_AVAILABLE * avail):
        return None
    thread = threading.Thread(target=advise_will_need, args=(files,), name="textmill-prefetch", daemon=True)
    thread.start()
    return thread
