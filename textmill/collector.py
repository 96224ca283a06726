"""The cyclic garbage collector, paused while start-up makes what lives as long as the process.

Importing torch and FastAPI, and loading a model, make hundreds of thousands of objects
(modules, functions, a tokenizer's tables, parameters) that are never garbage. Each burst of
allocations triggers a collection that walks all of them again: during the load ~5% of a 1B
model's start (perf); during the imports before it 449 collections, 0.17-0.23 s of a 2-3 s
start on the bundled model (gc.callbacks, Zen 3). Start-up leaves few cycles worth collecting
early (a load ~235 objects, a few KB), and the server freezes what it made once loaded
(commands._frozen_after).
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block; the collector's state before it comes back after.

    The switch is the process's: a thread that collects meanwhile finds it off until the block
    ends (start-up runs one such block at a time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
