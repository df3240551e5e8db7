// CUDA kernel for DGC's momentum correction + local accumulation in one pass, on the current
// stream. Rounds like csrc/cpu/dgc.cpp and the torch ops of gradsparse/_reference.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "common.cuh"

namespace gradsparse {
namespace {

template <typename scalar_t>
__global__ void dgc_compensate_kernel(float* __restrict__ u, float* __restrict__ v, const scalar_t* __restrict__ g,
                                      int64_t n, float m, bool nesterov) {
  using acc_t = mag_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    if (nesterov) {
      const float ui = __fmul_rn(static_cast<float>(static_cast<acc_t>(u[i]) + gi), m);
      u[i] = ui;
      v[i] = static_cast<float>(static_cast<acc_t>(__fadd_rn(v[i], ui)) + gi);
    } else {
      const float ui = static_cast<float>(static_cast<acc_t>(__fmul_rn(u[i], m)) + gi);
      u[i] = ui;
      v[i] = __fadd_rn(v[i], ui);
    }
  }
}

void dgc_compensate_cuda(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov) {
  check_dgc_args(u, v, g);
  c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor gc = g.contiguous();
  const int64_t n = gc.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dgc_compensate", [&] {
    dgc_compensate_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        u.data_ptr<float>(), v.data_ptr<float>(), gc.data_ptr<scalar_t>(), n, static_cast<float>(momentum), nesterov);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CUDA, m) {
  m.impl("dgc_compensate", &dgc_compensate_cuda);
}

}  // namespace gradsparse
