// CUDA unpack_add, on the current stream.
//
// Headers are copied to the host (32 bytes per payload) and checked there; index range and strict
// ascent are checked on the device; only then is the destination zeroed (if asked) and each rank's
// pairs scatter-added in rank order. A payload's indices are unique, so one thread per pair needs
// no atomics and the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common.h"
#include "common.cuh"

namespace gradsparse {
namespace {

// out + v * a with the product and the sum rounded separately (no FMA contraction), as on the CPU.
__device__ inline float mul_add_rn(float out, float v, float a) { return __fadd_rn(out, __fmul_rn(v, a)); }
__device__ inline double mul_add_rn(double out, double v, double a) { return __dadd_rn(out, __dmul_rn(v, a)); }

template <typename out_t, typename val_t, typename index_t>
__global__ void scatter_kernel(out_t* __restrict__ out, const index_t* __restrict__ idx, const val_t* __restrict__ vals,
                               int64_t count, out_t alpha) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += stride) {
    out[idx[j]] = mul_add_rn(out[idx[j]], static_cast<out_t>(vals[j]), alpha);
  }
}

struct Parsed {
  int32_t flags;
  int64_t count;
  at::Tensor payload;
};

Parsed parse(const at::Tensor& p, int64_t rank, const at::Tensor& out, at::ScalarType value_dtype, int64_t n_dense) {
  check_payload_tensor(p, rank);
  TORCH_CHECK_VALUE(p.device() == out.device(), "unpack_add: payload ", rank, " is on ", p.device(),
                    ", the destination on ", out.device());
  const at::Tensor header = p.narrow(0, 0, kHeaderBytes).view(at::kInt).to(at::kCPU);
  const int32_t* h = header.data_ptr<int32_t>();
  const int64_t numel = out.numel();
  const int64_t count = check_header(h, p.numel(), rank, numel, value_dtype, n_dense);
  if (count) {
    const at::Tensor idx = p.narrow(0, kHeaderBytes, 4 * count).view(at::kInt);
    const at::Tensor ends = at::stack({idx[0], idx[count - 1]}).to(at::kCPU);
    TORCH_CHECK_VALUE(ends[0].item<int32_t>() >= 0 && ends[1].item<int32_t>() < numel, "unpack_add: payload ", rank,
                      " index out of range [0, ", numel, ")");
    if (count > 1) {
      TORCH_CHECK_VALUE((idx.slice(0, 1) > idx.slice(0, 0, count - 1)).all().item<bool>(), "unpack_add: payload ",
                        rank, " indices are not strictly ascending (duplicate or unordered index)");
    }
  }
  return {h[1], count, p};
}

at::Tensor unpack_add_cuda(at::TensorList payloads, at::Tensor& out, at::ScalarType value_dtype,
                           const std::optional<at::Tensor>& dense_index, double alpha, bool overwrite) {
  check_destination(out);
  c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor didx = dense_positions(dense_index, out);
  const int64_t n_dense = didx.defined() ? didx.numel() : 0;
  std::vector<Parsed> parsed;
  parsed.reserve(payloads.size());
  for (size_t r = 0; r < payloads.size(); ++r) parsed.push_back(parse(payloads[r], r, out, value_dtype, n_dense));
  if (overwrite) out.zero_();
  int64_t flags = 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "unpack_add_out", [&] {
    using out_t = scalar_t;
    out_t* o = out.data_ptr<out_t>();
    const out_t a = static_cast<out_t>(alpha);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "unpack_add_values", [&] {
      for (const Parsed& p : parsed) {
        flags |= p.flags;
        const Layout lay(p.count, n_dense, value_dtype);
        const uint8_t* base = p.payload.data_ptr<uint8_t>();
        if (p.count) {
          scatter_kernel<out_t, scalar_t, int32_t><<<blocks_for(p.count), kThreads, 0, stream>>>(
              o, reinterpret_cast<const int32_t*>(base + kHeaderBytes),
              reinterpret_cast<const scalar_t*>(base + lay.values_offset), p.count, a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (n_dense) {
          scatter_kernel<out_t, scalar_t, int64_t><<<blocks_for(n_dense), kThreads, 0, stream>>>(
              o, didx.data_ptr<int64_t>(), reinterpret_cast<const scalar_t*>(base + lay.dense_offset), n_dense, a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
  return at::scalar_tensor(flags, out.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CUDA, m) {
  m.impl("unpack_add", &unpack_add_cuda);
}

}  // namespace gradsparse
