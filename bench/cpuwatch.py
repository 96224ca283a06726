"""How much of the machine other processes used during a measurement.

On 2 shared cores one busy test suite halves a server's speed (more for llama.cpp, whose
threads spin on barriers), so each figure carries the share of CPU time that went to
processes other than the system under test and the load generator. Linux /proc only.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _busy_ticks() -> int:
    """All CPUs' non-idle ticks since boot (/proc/stat: idle and iowait are fields 4-5)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def _group_ticks(pgid: int | None) -> int:
    """utime+stime of the live processes in process group pgid (the server under test)."""
    if pgid is None:
        return 0
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()  # fields after "pid (comm)"; comm may hold spaces
        if int(rest[2]) == pgid:  # field 5: pgrp
            total += int(rest[11]) + int(rest[12])  # fields 14, 15: utime, stime
    return total


def _own_ticks() -> float:
    """This process and its reaped children (the HF baseline runs as one)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime) * TICKS


@dataclass(frozen=True)
class Snapshot:
    wall: float
    busy: int
    group: int
    own: float


def snapshot(pgid: int | None = None) -> Snapshot:
    return Snapshot(time.monotonic(), _busy_ticks(), _group_ticks(pgid), _own_ticks())


def others_share(before: Snapshot, after: Snapshot) -> float:
    """Fraction of all CPUs' time used by neither the watched group nor this process.

    The group is read live at both ends, so a server process that exited in between is
    missed; servers are stopped only after the second snapshot.
    """
    capacity = (after.wall - before.wall) * TICKS * (os.cpu_count() or 1)
    if capacity <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.group - before.group) - (after.own - before.own)
    return min(1.0, max(0.0, others / capacity))


def wait_for_quiet(threshold: float, timeout_s: float, window_s: float = 3.0,
                   pgid: int | None = None) -> float:
    """Wait until others use under `threshold` of the CPUs for `window_s`; return the last share.

    pgid: the idle server under test, not counted as "others". Gives up after timeout_s
    (the run then goes on, and its others % says how noisy it was).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        before = snapshot(pgid)
        time.sleep(window_s)
        share = others_share(before, snapshot(pgid))
        if share < threshold or time.monotonic() >= deadline:
            return share


def group_cores(before: Snapshot, after: Snapshot) -> float:
    """Cores the watched group kept busy on average: 2.0 is all of this machine."""
    wall = after.wall - before.wall
    return (after.group - before.group) / TICKS / wall if wall > 0 else 0.0


def own_cores(before: Snapshot, after: Snapshot) -> float:
    """Cores this process kept busy on average (the HF baseline measures itself with it)."""
    wall = after.wall - before.wall
    return (after.own - before.own) / TICKS / wall if wall > 0 else 0.0
