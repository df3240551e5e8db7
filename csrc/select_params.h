// Tuning constants of topk_select's sampled path, shared by the CPU (csrc/cpu/topk_core.h) and
// CUDA (csrc/cuda/select.cu) kernels. They choose the path, never the result (every path returns
// the exact top-k). gradsparse/_reference.py uses the same values (SAMPLED_MIN_NUMEL, MIN_SAMPLE);
// tests/tools/test_constants.py reads this file and fails when the two drift apart.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GRADSPARSE_HOST_DEVICE __host__ __device__
#else
#define GRADSPARSE_HOST_DEVICE
#endif

namespace gradsparse {

// Below this many elements topk_select takes no sample: every element is a candidate.
constexpr int64_t kSampledMinNumel = 16384;
// The sample has at least this many positions (or all of them).
constexpr int64_t kMinSample = 1024;
// The reference's (and the CUDA kernel's) threshold estimate: the sample's
// ceil(kSampleAim * k * s / n) + kSampleAimExtra -th largest magnitude, a little below the k-th.
constexpr double kSampleAim = 1.25;
constexpr int64_t kSampleAimExtra = 4;

// The sample: the tensor cut into strata of `stride` elements (the last one shorter), one position
// drawn in each from a hash of (seed, stratum). A fixed stride from one start aliased with the
// periods of gradient tensors: a 3x3 convolution whose input is 1x1 has gradient only at the
// kernel's centre (every 9th element), and a stride of 99 then sampled only zeros. The reference
// (gradsparse/_reference.py::sample_positions) draws the same positions.
GRADSPARSE_HOST_DEVICE inline uint32_t sample_hash(uint32_t seed, uint32_t stratum) {
  uint32_t h = stratum + seed * 0x9e3779b9u;  // lowbias32 (C. Wellons) of the stratum, offset by the seed
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

// How many strata (and sampled positions) a tensor of n elements has: the last one may be shorter.
GRADSPARSE_HOST_DEVICE inline int64_t sample_strata(int64_t n, int64_t stride) { return (n + stride - 1) / stride; }

// Stratum j's sampled position in a tensor of n elements.
GRADSPARSE_HOST_DEVICE inline int64_t sample_position(int64_t j, int64_t stride, int64_t n, uint32_t seed) {
  const int64_t first = j * stride;
  const int64_t length = n - first < stride ? n - first : stride;
  return first + static_cast<int64_t>((static_cast<uint64_t>(sample_hash(seed, static_cast<uint32_t>(j))) *
                                       static_cast<uint64_t>(length)) >> 32);
}

}  // namespace gradsparse
