// CUDA kernels for the memories' compensation passes, on the current stream: DGC's momentum
// correction + local accumulation, dgc_compensate (in place) and dgc_compensate_into (into other
// buffers; its largest magnitudes come from three ATen reductions after the kernel, not from the
// same pass), and error feedback's residual_compensate_into (r_out = r + g, maxima likewise).
// Rounds like csrc/cpu/dgc.cpp and the torch ops of gradsparse/_reference.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "common.cuh"

namespace gradsparse {
namespace {

// Reads u[i], v[i] and writes u_out[i], v_out[i] in the same thread: an output may be its input.
template <typename scalar_t>
__global__ void dgc_compensate_kernel(const float* u, const float* v, const scalar_t* __restrict__ g, float* u_out,
                                      float* v_out, int64_t n, float m, bool nesterov) {
  using acc_t = mag_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    if (nesterov) {
      const float ui = __fmul_rn(static_cast<float>(static_cast<acc_t>(u[i]) + gi), m);
      const float vi = static_cast<float>(static_cast<acc_t>(__fadd_rn(v[i], ui)) + gi);
      u_out[i] = ui;
      v_out[i] = vi;
    } else {
      const float ui = static_cast<float>(static_cast<acc_t>(__fmul_rn(u[i], m)) + gi);
      const float vi = __fadd_rn(v[i], ui);
      u_out[i] = ui;
      v_out[i] = vi;
    }
  }
}

void launch(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov,
            at::Tensor& u_out, at::Tensor& v_out) {
  const int64_t n = g.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dgc_compensate", [&] {
    dgc_compensate_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        u.data_ptr<float>(), v.data_ptr<float>(), g.data_ptr<scalar_t>(), u_out.data_ptr<float>(),
        v_out.data_ptr<float>(), n, static_cast<float>(momentum), nesterov);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dgc_compensate_cuda(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov) {
  check_dgc_args(u, v, g);
  c10::cuda::CUDAGuard guard(u.device());
  launch(u, v, g.contiguous(), momentum, nesterov, u, v);
}

// The largest |t| (NaN if t holds one: max propagates NaN), as a 1-element float64 tensor.
at::Tensor absmax(const at::Tensor& t) {
  return t.numel() ? t.abs().max().to(at::kDouble).reshape({1}) : at::zeros({1}, t.options().dtype(at::kDouble));
}

at::Tensor dgc_compensate_into_cuda(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, double momentum,
                                    bool nesterov, at::Tensor& u_out, at::Tensor& v_out) {
  check_dgc_into_args(u, v, g, u_out, v_out);
  c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor gc = g.contiguous();
  launch(u, v, gc, momentum, nesterov, u_out, v_out);
  return at::cat({absmax(gc), absmax(u_out), absmax(v_out)});
}

// r_out = r + g, the sum in mag_t (double for a double gradient, else float), stored as float.
// Reads r[i] and writes r_out[i] in the same thread: r_out may be r.
template <typename scalar_t>
__global__ void residual_compensate_kernel(const float* r, const scalar_t* __restrict__ g, float* r_out, int64_t n) {
  using acc_t = mag_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    r_out[i] = static_cast<float>(static_cast<acc_t>(r[i]) + static_cast<acc_t>(g[i]));
  }
}

at::Tensor residual_compensate_into_cuda(const at::Tensor& r, const at::Tensor& g, at::Tensor& r_out) {
  check_residual_into_args(r, g, r_out);
  c10::cuda::CUDAGuard guard(r.device());
  const at::Tensor gc = g.contiguous();
  const int64_t n = gc.numel();
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "residual_compensate_into", [&] {
      residual_compensate_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          r.data_ptr<float>(), gc.data_ptr<scalar_t>(), r_out.data_ptr<float>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return at::cat({absmax(gc), absmax(r_out)});
}

at::Tensor absmax_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_floating_point(), "absmax: expected a floating-point tensor, got ", x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  return absmax(x.reshape(-1)).reshape({});
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CUDA, m) {
  m.impl("absmax", &absmax_cuda);
  m.impl("dgc_compensate", &dgc_compensate_cuda);
  m.impl("dgc_compensate_into", &dgc_compensate_into_cuda);
  m.impl("residual_compensate_into", &residual_compensate_into_cuda);
}

}  // namespace gradsparse
