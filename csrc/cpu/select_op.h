// The ATen side shared by the CPU selection kernels (select.cpp, segmented.cpp): worker count and
// the int64 position outputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gradsparse {

// Workers for one selection: torch's intra-op thread count, one inside a parallel region.
inline int workers() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// An uninitialized int64 tensor of `count` elements. From 32 MiB on (4M positions), glibc's
// malloc serves an allocation with a fresh mmap (32 MiB is its largest mmap threshold) and unmaps
// it when freed, so each call pays a page fault per 4 KiB on first write: 15 ms for 50 MB here,
// three times the whole selection. Those outputs get MADV_HUGEPAGE on their 2 MiB-aligned
// interior before the first write (3 ms for 50 MB): a hint, the same torch gives every large
// allocation under C10_THP_MEM_ALLOC_ENABLE=1, that ends with the mapping. Smaller outputs are
// reused heap memory and need nothing.
inline at::Tensor positions_output(int64_t count) {
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(at::kLong));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t nbytes = static_cast<size_t>(count) * sizeof(int64_t);
  if (nbytes >= (size_t(32) << 20)) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr<int64_t>());
    const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + nbytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
  }
#endif
  return out;
}

}  // namespace gradsparse
