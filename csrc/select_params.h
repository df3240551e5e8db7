// Tuning constants of topk_select's sampled path, shared by the CPU (csrc/cpu/topk_core.h) and
// CUDA (csrc/cuda/select.cu) kernels. They choose the path, never the result (every path returns
// the exact top-k). gradsparse/_reference.py uses the same values (SAMPLED_MIN_NUMEL, MIN_SAMPLE);
// tests/tools/test_constants.py reads this file and fails when the two drift apart.
#pragma once

#include <cstdint>

namespace gradsparse {

// Below this many elements topk_select takes no sample: every element is a candidate.
constexpr int64_t kSampledMinNumel = 16384;
// The sample has at least this many positions (or all of them).
constexpr int64_t kMinSample = 1024;
// The reference's (and the CUDA kernel's) threshold estimate: the sample's
// ceil(kSampleAim * k * s / n) + kSampleAimExtra -th largest magnitude, a little below the k-th.
constexpr double kSampleAim = 1.25;
constexpr int64_t kSampleAimExtra = 4;

}  // namespace gradsparse
