// Software prefetch for the CPU selection's scans, the candidate-collecting compensation passes and
// unpack_add's output chunks.
// Plain C++, no ATen, like the headers that include it.
//
// These loops read their input front to back, 64 elements (a block) at a time, and store what they
// find at places that depend on what they read (positions, keys, pairs). Before a block they ask for
// the lines kAheadBytes further on. Without it, on a virtualized Xeon (2 cores, 480 MiB of L3,
// 2026-12-02), small k's pass 1 over ResNet-50's 54 compressed tensors ran at about two thirds of a
// plain read's speed: 8.2-8.5 ms at 0.1 % and 12.0-12.2 ms at 1 %, against 5.3-5.6 and 6.2-6.5 ms with
// it (benchmarks/topk_phases.cpp, docs/benchmarks.md). The plain compensation and absmax loops, which
// store nothing data-dependent, timed the same with and without it (benchmarks/op_bench.py) and do
// not use it. A prefetch never faults, so asking past the end of a buffer is harmless; the address
// is formed as an integer so that no out-of-range pointer is made.
#pragma once

#include <cstdint>

namespace gradsparse {

// How far ahead of the block it reads a loop prefetches (2, 4, 8 and 16 KiB all helped, within about
// 1 ms of each other at 1 %, one run each).
constexpr std::uintptr_t kAheadBytes = 4096;

// Prefetches the `bytes` (rounded up to whole 64-byte lines) that lie kAheadBytes past p.
__attribute__((always_inline)) inline void prefetch_ahead(const void* p, std::int64_t bytes) {
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(p) + kAheadBytes;
  for (std::int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + l));
}

// Asks for the `bytes` (rounded up to whole lines) from p on, to be written: unpack_add's next output
// chunk, while the current one takes its pairs.
__attribute__((always_inline)) inline void prefetch_for_write(const void* p, std::int64_t bytes) {
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(p);
  for (std::int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(reinterpret_cast<const void*>(at + l), 1);
}

}  // namespace gradsparse
