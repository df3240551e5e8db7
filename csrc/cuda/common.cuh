// Helpers shared by the CUDA kernels: launch shape and magnitude type.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace gradsparse {

constexpr int kThreads = 256;

// Grid-stride launches: enough blocks to fill the device, never more than needed.
inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 4096)));
}

// Magnitudes are compared in float (double for double), like the CPU kernels and the reference.
template <typename scalar_t>
using mag_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace gradsparse
