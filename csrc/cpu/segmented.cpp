// CPU segmented_topk_select: every segment's exact top-k (topk_core.h) in one call, written into
// one output at offsets known before anything is selected (segment i writes clamp(ks[i], 0, its
// length) positions). Segments of at least kMinParallelNumel elements run one after the other,
// each over all workers; the others run side by side, one worker each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../common.h"
#include "../pack.h"
#include "select_core.h"
#include "select_op.h"
#include "topk_core.h"

namespace gradsparse {
namespace {

namespace core = select_core;

constexpr const char* kOp = "segmented_topk_select";

// Every segment's top-k into `out` (int64, seg.total() positions); with pairs (x fp32), each
// position's index and value at the same place in pairs.idx and pairs.val.
// With bits (zeroed words, one bit per position of x), every position written is also marked there.
void select_segments(const at::Tensor& flat, const Segments& seg, double sample_ratio, int64_t seed, int64_t* o,
                     core::Pairs pairs, const char* op, uint64_t* bits = nullptr) {
  const int threads = workers();
  std::vector<char> nan(seg.size(), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "segmented_topk_select", [&] {
    const scalar_t* xp = flat.data_ptr<scalar_t>();
    const auto select = [&](int64_t i, int segment_threads) {  // segment i into its slice of the output
      const int64_t n = seg.length(i), k = seg.count[i], first = seg.offset[i];
      int64_t* dst = o + seg.out[i];
      core::Pairs at;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (pairs) at = core::Pairs{pairs.idx + seg.out[i], pairs.val + seg.out[i]};
      }
      if (k == n) {
        if (bits) core::BitSink{bits, first, first + n}.range(first, first + n);
        for (int64_t j = 0; j < n; ++j) dst[j] = first + j;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (at) {
            for (int64_t j = 0; j < n; ++j) {
              at.idx[j] = static_cast<int32_t>(first + j);
              at.val[j] = xp[first + j];
            }
          }
        }
        return;
      }
      core::TopK<scalar_t> topk(xp + first, n, k, segment_threads);
      topk.base = first;
      topk.pairs = at;
      topk.bits = bits;
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
  for (int64_t i = 0; i < seg.size(); ++i) TORCH_CHECK_VALUE(!nan[i], op, ": segment ", i, " contains NaN");
}

at::Tensor segmented_topk_select_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& ks,
                                     double sample_ratio, int64_t seed) {
  check_selection_input(x, kOp);
  check_sample_ratio(sample_ratio, kOp);
  const Segments seg = check_segments(x, offsets, ks);
  const at::Tensor flat = x.contiguous().view(-1);
  at::Tensor out = positions_output(seg.total());
  select_segments(flat, seg, sample_ratio, seed, out.data_ptr<int64_t>(), core::Pairs{}, kOp);
  return out;
}

constexpr const char* kPackOp = "segmented_topk_select_pack";

// segmented_topk_select, and the payload of its positions (pack_gathered's bytes, fp32 values) written
// into `out` by the selection's last pass: each position's index and value beside it.
at::Tensor segmented_topk_select_pack_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& ks,
                                          double sample_ratio, int64_t seed, const at::Tensor& dense, int64_t numel,
                                          int64_t flags, const at::Tensor& out, const std::optional<at::Tensor>& bits) {
  check_selection_input(x, kPackOp);
  check_sample_ratio(sample_ratio, kPackOp);
  const Segments seg = check_segments(x, offsets, ks);
  TORCH_CHECK_VALUE(x.numel() <= numel && numel <= INT32_MAX, kPackOp, ": numel ", numel,
                    " must hold x's ", x.numel(), " elements and fit int32 indices");
  const Layout lay(seg.total(), dense.numel(), at::kFloat);
  check_payload_out(out, lay, x.device(), kPackOp);
  uint64_t* words = nullptr;
  if (bits.has_value()) {
    check_selection_bits(*bits, x.numel(), x.device(), kPackOp);
    words = reinterpret_cast<uint64_t*>(bits->data_ptr<int64_t>());
  }
  if (x.scalar_type() != at::kFloat || !dense.is_cpu()) {  // the values cast as pack_gathered casts them
    const at::Tensor positions = segmented_topk_select_cpu(x, offsets, ks, sample_ratio, seed);
    pack_gathered_into(positions, x, dense, numel, at::kFloat, flags, out);
    if (words) mark_bitmap(*bits, positions);  // zeroes it first
    return positions;
  }
  if (words) bits->zero_();  // the selection ORs its blocks in
  const at::Tensor flat = x.contiguous().view(-1);
  at::Tensor positions = positions_output(seg.total());
  uint8_t* base = out.data_ptr<uint8_t>();
  write_payload_frame(out, dense, lay, numel, at::kFloat, flags);
  select_segments(flat, seg, sample_ratio, seed, positions.data_ptr<int64_t>(),
                  core::Pairs{reinterpret_cast<int32_t*>(base + kHeaderBytes),
                              reinterpret_cast<float*>(base + lay.values_offset)},
                  kPackOp, words);
  return positions;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("segmented_topk_select", &segmented_topk_select_cpu);
  m.impl("segmented_topk_select_pack", &segmented_topk_select_pack_cpu);
}

}  // namespace gradsparse
