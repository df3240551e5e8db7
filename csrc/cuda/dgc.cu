// CUDA kernels for the memories' compensation passes, on the current stream: DGC's momentum
// correction + local accumulation, dgc_compensate (in place) and dgc_compensate_into (into other
// buffers; its largest magnitudes come from three ATen reductions after the kernel, not from the
// same pass), and error feedback's residual_compensate_into (r_out = r + g, maxima likewise).
// dgc/residual_compensate_candidates run the same kernels, then collect the selection candidates
// with ATen ops (candidates_of: a second pass here, fused into the compensation only on the CPU).
// dgc_zero_compensate zeroes the state with index_fill_, then compensates in place (fused into one
// pass only on the CPU; the reducer defers its memory update to it on the CPU only).
// Rounds like csrc/cpu/dgc.cpp and the torch ops of gradsparse/_reference.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

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

// The candidates of out (the compensated fp32 buffer, on the device) for the segments of seg, by
// ATen ops after the compensation kernel (one more pass, not fused as on the CPU): a per-element
// floor (repeat_interleave of each segment's floor rounded up to float), a mask (NaN counted, none
// where the floor is +inf), its per-segment counts (a cumsum read at the offsets), nonzero, and
// each position's rank in its segment against the segment's cap; then the kept positions' values.
std::tuple<at::Tensor, at::Tensor, at::Tensor> candidates_of(const at::Tensor& out, const CandidateSegments& seg) {
  const int64_t segments = seg.size();
  const auto long_opts = out.options().dtype(at::kLong);
  if (segments == 0) return {at::empty({0}, long_opts), at::zeros({0}, long_opts), at::empty({0}, out.options())};
  std::vector<float> floor(segments);
  std::vector<int64_t> lengths(segments);
  std::vector<uint8_t> collect(segments);
  for (int64_t s = 0; s < segments; ++s) {
    const uint32_t key = seg.floor_key[s];
    std::memcpy(&floor[s], &key, sizeof(key));
    lengths[s] = seg.offset[s + 1] - seg.offset[s];
    collect[s] = seg.collect[s];
  }
  const auto host_long = at::TensorOptions().dtype(at::kLong);
  const at::Tensor lengths_d = at::tensor(lengths, host_long).to(out.device());
  const at::Tensor floor_d =
      at::tensor(at::ArrayRef<float>(floor), at::TensorOptions().dtype(at::kFloat)).to(out.device());
  const at::Tensor collect_d =
      at::tensor(at::ArrayRef<uint8_t>(collect), at::TensorOptions().dtype(at::kByte)).to(out.device(), at::kBool);
  const at::Tensor segment_of = at::arange(segments, long_opts).repeat_interleave(lengths_d);
  const at::Tensor mask = ((out.abs() >= floor_d.index_select(0, segment_of)) | out.isnan()) &
                          collect_d.index_select(0, segment_of);
  const at::Tensor offsets_d = at::tensor(seg.offset, host_long).to(out.device());
  const at::Tensor running = at::cat({at::zeros({1}, long_opts), mask.cumsum(0, at::kLong)});
  const at::Tensor counts =
      running.index_select(0, offsets_d.slice(0, 1)) - running.index_select(0, offsets_d.slice(0, 0, segments));
  const at::Tensor hits = at::nonzero(mask).view(-1);
  const at::Tensor hit_segment = segment_of.index_select(0, hits);
  const at::Tensor first = counts.cumsum(0) - counts;  // index in hits of each segment's first hit
  const at::Tensor rank = at::arange(hits.numel(), long_opts) - first.index_select(0, hit_segment);
  const at::Tensor caps_d = at::tensor(seg.cap, host_long).to(out.device());
  const at::Tensor kept = hits.masked_select(rank < caps_d.index_select(0, hit_segment));
  return {seg.base == 0 ? kept : kept + seg.base, counts, out.view(-1).index_select(0, kept)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dgc_compensate_candidates_cuda(
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov, at::Tensor& u_out,
    at::Tensor& v_out, const at::Tensor& offsets, const at::Tensor& floors, const at::Tensor& caps) {
  check_dgc_into_args(u, v, g, u_out, v_out);
  const CandidateSegments seg = check_candidate_segments(g.numel(), offsets, floors, caps, "dgc_compensate_candidates");
  c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor gc = g.contiguous().view(-1);
  // the runs no skipped segment interrupts (one run, the whole piece, when nothing is skipped); the
  // maxima over them (0 where there is nothing)
  at::Tensor maxima = at::zeros({3}, u.options().dtype(at::kDouble));
  at::Tensor uo = u_out.view(-1), vo = v_out.view(-1);
  for (const auto& [a, b] : seg.runs()) {
    const at::Tensor gr = gc.narrow(0, a, b - a);
    at::Tensor ur = uo.narrow(0, a, b - a), vr = vo.narrow(0, a, b - a);
    launch(u.view(-1).narrow(0, a, b - a), v.view(-1).narrow(0, a, b - a), gr, momentum, nesterov, ur, vr);
    maxima = at::maximum(maxima, at::cat({absmax(gr), absmax(ur), absmax(vr)}));
  }
  auto [positions, counts, values] = candidates_of(v_out, seg);
  return {maxima, positions, counts, values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_compensate_candidates_cuda(
    const at::Tensor& r, const at::Tensor& g, at::Tensor& r_out, const at::Tensor& offsets, const at::Tensor& floors,
    const at::Tensor& caps) {
  const CandidateSegments seg =
      check_candidate_segments(g.numel(), offsets, floors, caps, "residual_compensate_candidates");
  check_residual_into_args(r, g, r_out);
  c10::cuda::CUDAGuard guard(r.device());
  const at::Tensor gc = g.contiguous().view(-1);
  at::Tensor maxima = at::zeros({2}, r.options().dtype(at::kDouble));
  at::Tensor ro = r_out.view(-1);
  for (const auto& [a, b] : seg.runs()) {  // as dgc_compensate_candidates_cuda
    at::Tensor rr = ro.narrow(0, a, b - a);
    maxima = at::maximum(maxima, residual_compensate_into_cuda(r.view(-1).narrow(0, a, b - a), gc.narrow(0, a, b - a),
                                                               rr));
  }
  auto [positions, counts, values] = candidates_of(r_out, seg);
  return {maxima, positions, counts, values};
}

// zeroed - offset, checked as the CPU kernel checks it (non-decreasing, within [0, numel)), before
// anything is written: the same error types, raised before the pass rather than after it.
at::Tensor zeroed_local(const at::Tensor& zeroed, int64_t offset, int64_t numel, const char* op) {
  const at::Tensor local = zeroed - offset;
  if (local.numel() == 0) return local;
  TORCH_CHECK_VALUE(local.numel() < 2 || !(local.diff() < 0).any().item<bool>(), op,
                    ": zeroed must be non-decreasing");
  TORCH_CHECK_INDEX(local.min().item<int64_t>() >= 0 && local.max().item<int64_t>() < numel, op,
                    ": zeroed has positions outside [offset, offset + numel) = [", offset, ", ", offset + numel, ")");
  return local;
}

at::Tensor dgc_zero_compensate_cuda(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum,
                                    bool nesterov, const at::Tensor& zeroed, int64_t offset) {
  check_dgc_into_args(u, v, g, u, v);
  check_zeroed(zeroed, u, "dgc_zero_compensate");
  c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor local = zeroed_local(zeroed, offset, u.numel(), "dgc_zero_compensate");
  u.view(-1).index_fill_(0, local, 0);
  v.view(-1).index_fill_(0, local, 0);
  return dgc_compensate_into_cuda(u, v, g, momentum, nesterov, u, v);
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
  m.impl("dgc_compensate_candidates", &dgc_compensate_candidates_cuda);
  m.impl("residual_compensate_candidates", &residual_compensate_candidates_cuda);
  m.impl("dgc_zero_compensate", &dgc_zero_compensate_cuda);
}

}  // namespace gradsparse
