"""kernels/build.py: the compile-and-load helpers that need no compiler."""
from __future__ import annotations

import os
import time

from textmill.kernels.build import STALE_LOCK_SECONDS, clear_stale_lock


def test_a_dead_builds_lock_is_removed_and_a_live_one_kept(tmp_path):
    """A killed build leaves cpp_extension's lock, on which the next build would wait
    forever: one older than any build is removed; a recent one (a build running in another
    process) is left alone."""
    lock = tmp_path / "lock"
    assert not clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.touch()
    assert not clear_stale_lock(tmp_path) and lock.exists()
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path) and not lock.exists()
