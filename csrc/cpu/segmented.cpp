// CPU segmented_topk_select: every segment's exact top-k (topk_core.h) in one call, written into
// one output at offsets known before anything is selected (segment i writes clamp(ks[i], 0, its
// length) positions). Segments of at least kMinParallelNumel elements run one after the other,
// each over all workers; the others run side by side, one worker each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "select_core.h"
#include "select_op.h"
#include "topk_core.h"

namespace gradsparse {
namespace {

namespace core = select_core;

constexpr const char* kOp = "segmented_topk_select";

at::Tensor segmented_topk_select_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& ks,
                                     double sample_ratio, int64_t seed) {
  check_selection_input(x, kOp);
  check_sample_ratio(sample_ratio, kOp);
  const Segments seg = check_segments(x, offsets, ks);
  const at::Tensor flat = x.contiguous().view(-1);
  at::Tensor out = positions_output(seg.total());
  int64_t* o = out.data_ptr<int64_t>();
  const int threads = workers();
  std::vector<char> nan(seg.size(), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), kOp, [&] {
    const scalar_t* xp = flat.data_ptr<scalar_t>();
    const auto select = [&](int64_t i, int segment_threads) {  // segment i into its slice of the output
      const int64_t n = seg.length(i), k = seg.count[i], first = seg.offset[i];
      int64_t* dst = o + seg.out[i];
      if (k == n) {
        for (int64_t j = 0; j < n; ++j) dst[j] = first + j;
        return;
      }
      core::TopK<scalar_t> topk(xp + first, n, k, segment_threads);
      topk.base = first;
      const auto status = topk.run(n >= kSampledMinNumel, sample_ratio, seed, [&](int64_t) { return dst; });
      nan[i] = status == core::Status::kNaN;
    };
    std::vector<int64_t> side_by_side;
    for (int64_t i = 0; i < seg.size(); ++i) {
      if (seg.count[i] == 0) continue;
      if (seg.length(i) >= core::kMinParallelNumel && threads > 1) {
        select(i, threads);
      } else {
        side_by_side.push_back(i);
      }
    }
    core::for_each_rethrowing(side_by_side, threads, [&](int64_t i) { select(i, 1); });
  });
  for (int64_t i = 0; i < seg.size(); ++i) TORCH_CHECK_VALUE(!nan[i], kOp, ": segment ", i, " contains NaN");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("segmented_topk_select", &segmented_topk_select_cpu);
}

}  // namespace gradsparse
