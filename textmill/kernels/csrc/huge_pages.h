// Buffers in 2 MiB pages, for memory that a decode step streams through from end to end.
//
// One decode stream reads every packed weight once a token, at the machine's read rate.
// On 4 KiB pages that is a TLB miss every 4 KiB, and the page walks cost a tenth of the
// rate: on a 2-vCPU Ice Lake the 1B synthetic file's layer matmuls read 19.0-19.8 GB/s on
// 4 KiB pages and 21.1-21.3 GB/s on 2 MiB ones (the same kernels, one process each).
// Linux backs anonymous memory with 2 MiB pages only where the process asks for them
// (transparent huge pages in "madvise" mode, many distributions' default), and only in
// 2 MiB-aligned extents: so the buffer is mapped on its own, aligned, and advised.
// Where the kernel has no transparent huge pages the advice fails and the buffer keeps
// 4 KiB pages: the same bytes, the old speed.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace textmill {

// An uninitialised (bytes,) uint8 tensor; 2 MiB-aligned and advised for huge pages when
// it is at least one such page long (smaller ones gain nothing and would waste the rest of
// a mapping's page), otherwise torch's own allocation.
inline torch::Tensor huge_page_bytes(int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes >= static_cast<int64_t>(kHuge)) {
    // Only whole 4 KiB pages past the end: a last, partial 2 MiB extent stays in small pages.
    const size_t len = (static_cast<size_t>(bytes) + 4095) & ~size_t{4095};
    void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
      const uintptr_t start = (base + kHuge - 1) & ~(kHuge - 1);
      // Give back the slack taken for the alignment, before and after the buffer.
      if (start > base) munmap(raw, start - base);
      if (base + kHuge > start) munmap(reinterpret_cast<void*>(start + len), base + kHuge - start);
      void* p = reinterpret_cast<void*>(start);
      madvise(p, len, MADV_HUGEPAGE);  // advice: refused, the buffer keeps small pages
      return torch::from_blob(p, {bytes}, [len](void* q) { munmap(q, len); }, torch::kUInt8);
    }
  }
#endif
  return torch::empty({bytes}, torch::kUInt8);
}

}  // namespace textmill
