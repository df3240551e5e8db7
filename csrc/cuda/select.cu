// CUDA selection: threshold_select and topk_select, on the current stream.
//
// |x| >= t is one elementwise pass writing a mask; at::nonzero compacts it into ascending int64
// positions. topk_select samples, estimates a threshold a little below the k-th magnitude, selects
// candidates with that pass, and takes the exact top-k of the candidates (ties to the lower index),
// exactly as gradsparse/_reference.py::sampled_topk_indices does. segmented_topk_select runs it on
// each segment in turn (a host loop); segmented_topk_select_candidates checks its candidates and
// runs segmented_topk_select (the same positions by definition), then computes kth with ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../select_params.h"
#include "common.cuh"

namespace gradsparse {
namespace {

template <typename scalar_t>
__global__ void at_least_kernel(const scalar_t* __restrict__ x, int64_t n, mag_t<scalar_t> t, bool* __restrict__ mask) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    mag_t<scalar_t> m = static_cast<mag_t<scalar_t>>(x[i]);
    m = m < 0 ? -m : m;
    mask[i] = m >= t;  // false for NaN
  }
}

at::Tensor at_least(const at::Tensor& flat, double threshold) {
  const int64_t n = flat.numel();
  at::Tensor mask = at::empty({n}, flat.options().dtype(at::kBool));
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "at_least", [&] {
      at_least_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          flat.data_ptr<scalar_t>(), n, static_cast<mag_t<scalar_t>>(threshold), mask.data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return at::nonzero(mask).view(-1);
}

at::Tensor magnitude(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? x.abs() : x.to(at::kFloat).abs();
}

// Exact top-k positions of a magnitude vector, ascending, ties to the lower position.
at::Tensor topk_of_magnitude(const at::Tensor& mag, int64_t k) {
  const at::Tensor kth = std::get<0>(at::topk(mag, k, 0, /*largest=*/true, /*sorted=*/false)).min();
  const at::Tensor above = at::nonzero(mag > kth).view(-1);
  const at::Tensor ties = at::nonzero(mag == kth).view(-1).narrow(0, 0, k - above.numel());
  return std::get<0>(at::cat({above, ties}).sort());
}

at::Tensor threshold_select_cuda(const at::Tensor& x, double threshold) {
  check_selection_input(x, "threshold_select");
  c10::cuda::CUDAGuard guard(x.device());
  return at_least(x.contiguous().view(-1), threshold);
}

__global__ void sample_positions_kernel(int64_t* __restrict__ out, int64_t strata, int64_t stride, int64_t n,
                                        uint32_t seed) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < strata; j += step) {
    out[j] = sample_position(j, stride, n, seed);
  }
}

// One position in each stride of n elements (csrc/select_params.h), as the CPU kernel samples.
at::Tensor sample_positions(int64_t n, int64_t stride, int64_t seed, const at::Device& device) {
  const int64_t strata = sample_strata(n, stride);
  at::Tensor out = at::empty({strata}, at::TensorOptions().dtype(at::kLong).device(device));
  sample_positions_kernel<<<blocks_for(strata), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<int64_t>(), strata, stride, n, static_cast<uint32_t>(static_cast<uint64_t>(seed)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The exact top-k positions of flat (1-D, contiguous, no NaN, 0 < k < n), ascending.
at::Tensor topk_positions(const at::Tensor& flat, int64_t k, double sample_ratio, int64_t seed) {
  const int64_t n = flat.numel();
  if (n < kSampledMinNumel) return topk_of_magnitude(magnitude(flat), k);
  const int64_t sample_size =
      std::min(n, std::max<int64_t>(kMinSample, static_cast<int64_t>(std::ceil(n * sample_ratio))));
  const int64_t stride = std::max<int64_t>(1, n / sample_size);
  const at::Tensor sample = magnitude(flat.index_select(0, sample_positions(n, stride, seed, flat.device())));
  const int64_t s = sample.numel();
  int64_t sample_k =
      std::min(s, static_cast<int64_t>(std::ceil(kSampleAim * static_cast<double>(k) * s / n)) + kSampleAimExtra);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double threshold = std::get<0>(at::topk(sample, sample_k, 0, true, false)).min().item<double>();
    const at::Tensor cand = at_least(flat, threshold);
    const int64_t c = cand.numel();
    if (c >= k) return c == k ? cand : cand.index_select(0, topk_of_magnitude(magnitude(flat.index_select(0, cand)), k));
    if (sample_k == s) break;
    sample_k = std::min(s, sample_k * 2);
  }
  return topk_of_magnitude(magnitude(flat), k);
}

at::Tensor topk_select_cuda(const at::Tensor& x, int64_t k, double sample_ratio, int64_t seed) {
  check_selection_input(x, "topk_select");
  check_sample_ratio(sample_ratio, "topk_select");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor flat = x.contiguous().view(-1);
  const int64_t n = flat.numel();
  const auto opts = flat.options().dtype(at::kLong);
  if (k <= 0) return at::empty({0}, opts);
  if (k >= n) return at::arange(n, opts);
  TORCH_CHECK_VALUE(!at::isnan(flat).any().item<bool>(), "topk_select: input contains NaN");
  return topk_positions(flat, k, sample_ratio, seed);
}

// One segment after the other on the host (each a topk_select), shifted by its offset, joined.
at::Tensor segmented_topk_select_cuda(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& ks,
                                      double sample_ratio, int64_t seed) {
  const char* op = "segmented_topk_select";
  check_selection_input(x, op);
  check_sample_ratio(sample_ratio, op);
  const Segments seg = check_segments(x, offsets, ks);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor flat = x.contiguous().view(-1);
  const auto opts = flat.options().dtype(at::kLong);
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < seg.size(); ++i) {
    const int64_t n = seg.length(i), k = seg.count[i], first = seg.offset[i];
    if (k == 0) continue;
    if (k == n) {
      parts.push_back(at::arange(first, first + n, opts));
      continue;
    }
    const at::Tensor piece = flat.narrow(0, first, n);
    TORCH_CHECK_VALUE(!at::isnan(piece).any().item<bool>(), op, ": segment ", i, " contains NaN");
    parts.push_back(topk_positions(piece, k, sample_ratio, seed).add_(first));
  }
  return parts.empty() ? at::empty({0}, opts) : at::cat(parts);
}

// segmented_topk_select_candidates on the GPU: the candidates are checked (inside the segment they
// are listed for, ascending: one device reduction) and then not used, since
// segmented_topk_select_cuda gives the identical positions by definition; kth is each segment's
// smallest selected magnitude by a scatter_reduce (amin) over the selected positions.
std::tuple<at::Tensor, at::Tensor> segmented_topk_select_candidates_cuda(
    const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& ks, const at::Tensor& candidates,
    const at::Tensor& counts, const at::Tensor& caps, double sample_ratio, int64_t seed,
    const std::optional<at::Tensor>& values) {
  const char* op = "segmented_topk_select_candidates";
  check_selection_input(x, op);
  check_sample_ratio(sample_ratio, op);
  const Segments seg = check_segments(x, offsets, ks);
  const CandidateLists lists = check_candidate_lists(seg, x, candidates, counts, caps, op);
  check_candidate_values(x, candidates, values, op);  // checked, not needed: the selection reads x
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t segments = seg.size();
  const auto long_opts = x.options().dtype(at::kLong);
  const auto host_long = at::TensorOptions().dtype(at::kLong);
  const at::Tensor offsets_d = at::tensor(seg.offset, host_long).to(x.device());
  if (candidates.numel() > 0) {
    const at::Tensor c = candidates.contiguous();
    const at::Tensor listed_in =
        at::arange(segments, long_opts).repeat_interleave(at::tensor(lists.stored, host_long).to(x.device()));
    const at::Tensor outside =
        (c < offsets_d.index_select(0, listed_in)) | (c >= offsets_d.index_select(0, listed_in + 1));
    const at::Tensor bad = outside.any() | (c.slice(0, 1) <= c.slice(0, 0, c.numel() - 1)).any();
    TORCH_CHECK_VALUE(!bad.item<bool>(), op,
                      ": a candidate is outside the segment it is listed for, or not above the one before it: "
                      "candidates must be ascending positions in x, segment after segment");
  }
  const at::Tensor positions = segmented_topk_select_cuda(x, offsets, ks, sample_ratio, seed);
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<uint8_t> everything(segments);
  for (int64_t s = 0; s < segments; ++s) everything[s] = seg.count[s] > 0 && seg.count[s] == seg.length(s);
  at::Tensor kth = at::full({segments}, inf, x.options().dtype(at::kDouble));
  if (positions.numel() > 0) {
    const at::Tensor selected_in =
        at::arange(segments, long_opts).repeat_interleave(at::tensor(seg.count, host_long).to(x.device()));
    const at::Tensor mags = magnitude(x.contiguous().view(-1).index_select(0, positions)).to(at::kDouble);
    kth = kth.scatter_reduce(0, selected_in, mags, "amin", /*include_self=*/true);
  }
  const at::Tensor all_kept =
      at::tensor(at::ArrayRef<uint8_t>(everything), at::TensorOptions().dtype(at::kByte)).to(x.device(), at::kBool);
  return {positions, kth.masked_fill(all_kept, 0.0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CUDA, m) {
  m.impl("threshold_select", &threshold_select_cuda);
  m.impl("topk_select", &topk_select_cuda);
  m.impl("segmented_topk_select", &segmented_topk_select_cuda);
  m.impl("segmented_topk_select_candidates", &segmented_topk_select_candidates_cuda);
}

}  // namespace gradsparse
