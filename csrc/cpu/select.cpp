// CPU selection kernels: threshold_select and topk_select. The machinery is plain C++:
// select_core.h (one pass over the input in parallel chunks, positions ascending without a sort)
// and topk_core.h (the exact top-k: a sampled bracket around the k-th magnitude, a counting pass,
// a writing pass). Magnitudes are compared in float (double for double inputs), as the
// reference does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "select_op.h"
#include "select_core.h"
#include "topk_core.h"

namespace gradsparse {
namespace {

namespace core = select_core;

at::Tensor threshold_select_cpu(const at::Tensor& x, double threshold) {
  check_selection_input(x, "threshold_select");
  const at::Tensor flat = x.contiguous().view(-1);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "threshold_select", [&] {
    using K = core::Key<scalar_t>;
    const auto lo = K::at_least(static_cast<typename K::mag_t>(threshold));
    core::select_at_least(flat.data_ptr<scalar_t>(), flat.numel(), lo, workers(), [&](int64_t count) {
      out = positions_output(count);
      return out.data_ptr<int64_t>();
    });
  });
  return out;
}

at::Tensor topk_select_cpu(const at::Tensor& x, int64_t k, double sample_ratio, int64_t seed) {
  check_selection_input(x, "topk_select");
  check_sample_ratio(sample_ratio, "topk_select");
  const at::Tensor flat = x.contiguous().view(-1);
  const int64_t n = flat.numel();
  auto opts = at::TensorOptions().dtype(at::kLong);
  if (k <= 0) return at::empty({0}, opts);
  if (k >= n) return at::arange(n, opts);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "topk_select", [&] {
    core::TopK<scalar_t> topk(flat.data_ptr<scalar_t>(), n, k, workers());
    const auto alloc = [&](int64_t count) {
      out = positions_output(count);
      return out.data_ptr<int64_t>();
    };
    const core::Status status = topk.run(n >= kSampledMinNumel, sample_ratio, seed, alloc);
    TORCH_CHECK_VALUE(status != core::Status::kNaN, "topk_select: input contains NaN");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("threshold_select", &threshold_select_cpu);
  m.impl("topk_select", &topk_select_cpu);
}

}  // namespace gradsparse
