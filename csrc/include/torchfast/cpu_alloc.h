// Huge pages for large CPU outputs. Host code only (op files).
//
// A fresh large CPU tensor is paid for in page faults when the kernel first writes it: glibc serves
// allocations above its mmap threshold (at most 32 MiB) with fresh pages on every call, and one fault
// per 4 KiB page cost more than the arithmetic of an elementwise op (a 32 MiB output: about 22 ms
// allocated and filled, 8 ms when its pages are 2 MiB; measured on the 2-core dev machine). So the ops
// ask the kernel for transparent huge pages on the 2 MiB-aligned interior of each large output they
// allocate, before writing it: madvise(MADV_HUGEPAGE), the hint torch's own allocator gives every
// allocation when THP_MEM_ALLOC_ENABLE=1. It changes no values and no layout, and is a no-op where
// THP is disabled or already "always". TORCHFAST_THP=0 turns it off (to measure without it).
//
// Outputs above 512 MiB get no hint. In a VM whose balloon device reports free memory to the host
// (virtio free page reporting, order 9: the 2 MiB blocks), freed 2 MiB blocks are handed back to the
// host about 2 s after they are freed, and a huge-page fault then takes exactly such a block and pays a
// host fault for each of its pages; 4 KiB faults are served from the smaller free blocks, which are not
// reported. Measured on the 2-core dev machine (Firecracker VM, 1 thread, cross_entropy forward+backward,
// benchmarks/bench_cross_entropy.py): with the hint, the 500 MiB float32 gradient at V = 32000 took 153 ms
// against 364 ms without; the 2 GiB one at V = 128256 took 2.5 s (+-20%) against 1.36 s without. Where
// memory is not reported, a 4 KiB-paged large output costs its faults (a few percent of a kernel that
// reads and writes as many bytes), so leaving the largest outputs alone is the safe side.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace torchfast {

inline bool huge_page_hints_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("TORCHFAST_THP");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// Call on an output just allocated by the op, before anything writes it.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  constexpr uintptr_t kMaxHinted = uintptr_t{512} << 20;
  const uintptr_t nbytes = static_cast<uintptr_t>(t.nbytes());
  if (nbytes < 4 * kHuge || nbytes > kMaxHinted || !t.is_cpu() || !huge_page_hints_enabled()) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

// `t` (a fresh output), after advise_huge_pages: `at::Tensor y = hinted(at::empty_like(x));`
inline at::Tensor hinted(at::Tensor t) {
  advise_huge_pages(t);
  return t;
}

}  // namespace torchfast
