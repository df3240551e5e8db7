// CPU segmented_topk_select_candidates: segmented_topk_select (segmented.cpp) helped by the
// candidates the compensation pass collected (dgc_compensate_candidates,
// residual_compensate_candidates). A segment whose candidate list is complete and holds at least
// its k entries has every element at or above its k-th largest magnitude among them (that k-th is
// >= the floor the candidates were collected at), so its exact top-k (ties to the lower position)
// is the top-k of the candidates: found from their keys alone (a histogram, then one pass in
// position order), on the calling thread, without reading the rest of the segment (nor, given the
// values the compensation pass kept of them, the candidates' own elements). The other
// segments run exactly as segmented_topk_select runs them (topk_core.h's TopK).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "select_core.h"
#include "select_op.h"
#include "topk_core.h"

namespace gradsparse {
namespace {

namespace core = select_core;

constexpr const char* kOp = "segmented_topk_select_candidates";

template <typename scalar_t>
double magnitude_of(typename core::Key<scalar_t>::bits_t key) {
  typename core::Key<scalar_t>::mag_t m;
  std::memcpy(&m, &key, sizeof(m));
  return static_cast<double>(m);
}

// Every candidate of every segment inside its segment and ascending: nothing is read outside x.
// Block by block without a branch per candidate (the loop vectorizes), each bad block then element by element.
void check_candidate_positions(const Segments& seg, const CandidateLists& lists, const int64_t* cand) {
  constexpr int64_t kCheckBlock = 4096;
  for (int64_t s = 0; s < seg.size(); ++s) {
    const int64_t first = seg.offset[s], end = seg.offset[s + 1];
    bool good = true;
    for (int64_t b = lists.start[s]; b < lists.start[s + 1] && good; b += kCheckBlock) {
      const int64_t e = std::min(lists.start[s + 1], b + kCheckBlock);
      int bad = b == lists.start[s] ? cand[b] < first : cand[b] <= cand[b - 1];
      for (int64_t j = b + 1; j < e; ++j) bad |= cand[j] <= cand[j - 1];
      bad |= e > b && cand[e - 1] >= end;
      good = !bad;
    }
    if (good) continue;
    int64_t previous = seg.offset[s] - 1;
    for (int64_t j = lists.start[s]; j < lists.start[s + 1]; ++j) {
      TORCH_CHECK_VALUE(cand[j] > previous && cand[j] < seg.offset[s + 1], kOp, ": candidate ", j, " (position ",
                        cand[j], ") of segment ", s, " is ",
                        cand[j] >= seg.offset[s] && cand[j] < seg.offset[s + 1] ? "not above the one before it"
                                                                                 : "outside the segment",
                        " [", seg.offset[s], ", ", seg.offset[s + 1],
                        "): candidates must be ascending positions in x, segment after segment");
      previous = cand[j];
    }
  }
}

// The exact top-k of the c candidates at cand (positions in x, ascending, every position of the
// segment whose key is >= the k-th largest among them; 0 < k <= c) into out, ascending, ties to the
// lower position; their values are x[cand[j]], or vals[j] where given (then x is not read). Returns
// the k-th largest key, or kInf + 1 if a candidate is NaN (nothing written).
// The k-th key: a histogram of (key - smallest) cut to at most 2^11 buckets, then nth_element
// inside the one bucket that holds it (the candidates lie close above the floor: few per bucket).
template <typename scalar_t>
typename core::Key<scalar_t>::bits_t top_of_candidates(const scalar_t* x, const int64_t* cand, const scalar_t* vals,
                                                       int64_t c, int64_t k, int64_t* out,
                                                       std::vector<typename core::Key<scalar_t>::bits_t>& keys,
                                                       std::vector<typename core::Key<scalar_t>::bits_t>& scratch,
                                                       std::vector<int64_t>& hist) {
  using K = core::Key<scalar_t>;
  using bits_t = typename K::bits_t;
  keys.resize(c);
  bits_t top = 0, bottom = ~bits_t(0);
  const auto take_keys = [&](const auto& value_of) {  // keys[j] of every candidate, and their range
    for (int64_t j = 0; j < c; ++j) {
      const bits_t key = K::of(value_of(j));
      keys[j] = key;
      top = std::max(top, key);
      bottom = std::min(bottom, key);
    }
  };
  if (vals != nullptr) {
    take_keys([&](int64_t j) { return vals[j]; });
  } else {
    constexpr int64_t kAhead = 32;  // candidates lie a cache line or more apart: prefetch the gather
    take_keys([&](int64_t j) {
      if (j + kAhead < c) __builtin_prefetch(x + cand[j + kAhead]);
      return x[cand[j]];
    });
  }
  if (top > K::kInf) return K::kInf + 1;
  const bits_t span = top - bottom;
  const int width = span == 0 ? 0
                    : sizeof(bits_t) == 8 ? 64 - __builtin_clzll(static_cast<uint64_t>(span))
                                          : 32 - __builtin_clz(static_cast<uint32_t>(span));
  const int shift = std::max(0, width - 11);
  hist.assign(static_cast<size_t>(span >> shift) + 1, 0);
  for (const bits_t key : keys) ++hist[(key - bottom) >> shift];
  const auto [bucket, above] = core::find_bucket(hist.data(), static_cast<int64_t>(hist.size()), k);
  bits_t kth;
  if (shift == 0) {
    kth = bottom + static_cast<bits_t>(bucket);
  } else {
    scratch.clear();
    for (const bits_t key : keys) {
      if (static_cast<int64_t>((key - bottom) >> shift) == bucket) scratch.push_back(key);
    }
    const int64_t r = k - above - 1;
    std::nth_element(scratch.begin(), scratch.begin() + r, scratch.end(), std::greater<>());
    kth = scratch[r];
  }
  int64_t larger = 0;
  for (const bits_t key : keys) larger += key > kth;
  int64_t allow = k - larger;
  for (int64_t j = 0; j < c; ++j) {
    if (keys[j] > kth || (keys[j] == kth && allow-- > 0)) *out++ = cand[j];
  }
  return kth;
}

std::tuple<at::Tensor, at::Tensor> segmented_topk_select_candidates_cpu(
    const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& ks, const at::Tensor& candidates,
    const at::Tensor& counts, const at::Tensor& caps, double sample_ratio, int64_t seed,
    const std::optional<at::Tensor>& values) {
  check_selection_input(x, kOp);
  check_sample_ratio(sample_ratio, kOp);
  const Segments seg = check_segments(x, offsets, ks);
  const CandidateLists lists = check_candidate_lists(seg, x, candidates, counts, caps, kOp);
  const bool given = check_candidate_values(x, candidates, values, kOp);
  const at::Tensor values_c = given ? values->contiguous() : at::Tensor();
  const at::Tensor cand_c = candidates.contiguous();
  const int64_t* cand = cand_c.data_ptr<int64_t>();
  check_candidate_positions(seg, lists, cand);
  const at::Tensor flat = x.contiguous().view(-1);
  at::Tensor out = positions_output(seg.total());
  at::Tensor kth = at::empty({seg.size()}, at::TensorOptions().dtype(at::kDouble));
  int64_t* o = out.data_ptr<int64_t>();
  double* kp = kth.data_ptr<double>();
  const int threads = workers();
  std::vector<char> nan(seg.size(), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), kOp, [&] {
    using K = core::Key<scalar_t>;
    const scalar_t* xp = flat.data_ptr<scalar_t>();
    const scalar_t* vp = given ? values_c.data_ptr<scalar_t>() : nullptr;
    const auto select = [&](int64_t i, int segment_threads) {  // segmented_topk_select's way
      const int64_t n = seg.length(i), k = seg.count[i], first = seg.offset[i];
      core::TopK<scalar_t> topk(xp + first, n, k, segment_threads);
      topk.base = first;
      const auto status = topk.run(n >= kSampledMinNumel, sample_ratio, seed, [&](int64_t) { return o + seg.out[i]; });
      nan[i] = status == core::Status::kNaN;
      kp[i] = magnitude_of<scalar_t>(topk.selected_kth);
    };
    std::vector<typename K::bits_t> keys, scratch;
    std::vector<int64_t> hist;
    std::vector<int64_t> side_by_side;
    for (int64_t i = 0; i < seg.size(); ++i) {
      const int64_t n = seg.length(i), k = seg.count[i], first = seg.offset[i];
      if (k == 0) {
        kp[i] = std::numeric_limits<double>::infinity();
      } else if (k == n) {
        for (int64_t j = 0; j < n; ++j) o[seg.out[i] + j] = first + j;
        kp[i] = 0.0;
      } else if (lists.complete[i] && lists.count[i] >= k) {
        const int64_t from = lists.start[i];
        const auto key = top_of_candidates(xp, cand + from, vp == nullptr ? nullptr : vp + from, lists.stored[i], k,
                                           o + seg.out[i], keys, scratch, hist);
        nan[i] = key > K::kInf;
        kp[i] = magnitude_of<scalar_t>(key);
      } else if (n >= core::kMinParallelNumel && threads > 1) {
        select(i, threads);
      } else {
        side_by_side.push_back(i);
      }
    }
    core::for_each_rethrowing(side_by_side, threads, [&](int64_t i) { select(i, 1); });
  });
  for (int64_t i = 0; i < seg.size(); ++i) {
    TORCH_CHECK_VALUE(!nan[i], "segmented_topk_select: segment ", i, " contains NaN");
  }
  return {out, kth};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("segmented_topk_select_candidates", &segmented_topk_select_candidates_cpu);
}

}  // namespace gradsparse
