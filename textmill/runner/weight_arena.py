"""Memory for packed weights, on 2 MiB pages.

Decoding a stream reads every packed weight once a token, straight from memory, so a step
is as fast as that stream of reads. On 4 KiB pages each page of weights costs a TLB miss (a
two-level page walk in a virtual machine), and the hardware prefetchers stop at every page
boundary. The arena hands out room for the GGUF weights as they are packed (pack_gguf
writes into it: no copy) from anonymous mappings that ask for transparent huge pages
(madvise(MADV_HUGEPAGE)). Linux's usual THP mode, "madvise", gives 2 MiB pages to mappings
that ask and to no other; where it has none free, or THP is off, the pages are small and
nothing else changes.

bench/pages_ab.py (one engine whose decode steps alternate between the arena and the same
weights in tensors of their own), Zen 4, 2 threads: one stream's step 0.87-0.97x the time on
the four models of the matrix, 16 streams' 0.95-0.98x. The same weights side by side on
4 KiB pages gained 0-3%, and in the forward pass's order rather than the packing order no
more: the pages are what counts (docs/performance.md).
"""
from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # each weight starts on a cache line, as torch's own allocations do
# Address space reserved a mapping at a time: only the pages written become resident, so a
# small model leaves most of its one mapping untouched (and uncounted). A mapping's last
# huge page is at most partly used: <= 2 MiB of waste per mapping.
CHUNK_BYTES = 256 << 20


class WeightArena:
    """Hands out contiguous 1-D uint8 tensors, in order, from 2 MiB-aligned mappings."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None  # the current mapping's usable bytes
        self._used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        start = -(-self._used // ALIGN) * ALIGN
        if self._chunk is None or start + nbytes > self._chunk.numel():
            self._chunk, start = _mapping(max(self.chunk_bytes, nbytes)), 0
        self._used = start + nbytes
        return self._chunk[start:start + nbytes]


def _mapping(nbytes: int) -> torch.Tensor:
    """nbytes (rounded up to whole huge pages) of zeroed anonymous memory starting on a
    2 MiB boundary, asked for huge pages. Views of it keep the mapping alive."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # One huge page more than needed, so that the usable part can start on a boundary.
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(buf, dtype=torch.uint8)
    skip = -whole.data_ptr() % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE, skip, size)
        except OSError:  # a kernel built without THP: small pages
            pass
    return whole[skip:skip + size]
