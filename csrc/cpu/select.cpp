// CPU selection kernels: threshold_select and topk_select.
//
// Both make one counting pass and one writing pass over the input in parallel chunks
// (at::parallel_for), so output positions come out in ascending order without a sort.
// Magnitudes are compared in float (double for double inputs), as the reference does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace gradsparse {
namespace {

constexpr int64_t kSampledMinNumel = 16384;  // keep in sync with _reference.SAMPLED_MIN_NUMEL
constexpr int64_t kMinSample = 1024;         // keep in sync with _reference.MIN_SAMPLE
constexpr int64_t kChunk = 1 << 16;

template <typename scalar_t>
using mag_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
inline mag_t<scalar_t> magnitude(scalar_t v) {
  return std::abs(static_cast<mag_t<scalar_t>>(v));
}

struct Chunks {
  int64_t size;
  int64_t count;
};

Chunks chunks_for(int64_t n) {
  int64_t count = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 8, (n + kChunk - 1) / kChunk));
  int64_t size = (n + count - 1) / count;
  return {size, (n + size - 1) / size};
}

// |x| >= t as a branch-free integer test on IEEE bit patterns, so the loops vectorize: for
// non-negative floats the order of the bit patterns is the order of the values, and NaN is
// any pattern above infinity's. half/bfloat16 go through float.
template <typename scalar_t>
struct MagnitudeTest {
  using bits_t = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;
  static constexpr bits_t kAbs = std::is_same_v<scalar_t, double> ? 0x7fffffffffffffffull : 0x7fffffffu;
  static constexpr bits_t kInf = std::is_same_v<scalar_t, double> ? 0x7ff0000000000000ull : 0x7f800000u;
  bits_t t_bits;
  bool never;  // t is NaN: nothing compares >= NaN
  explicit MagnitudeTest(mag_t<scalar_t> t) : t_bits(0), never(std::isnan(t)) {
    if (!never && t > 0) std::memcpy(&t_bits, &t, sizeof(t));
  }
  static bits_t abs_bits(scalar_t v) {
    const mag_t<scalar_t> m = static_cast<mag_t<scalar_t>>(v);
    bits_t b;
    std::memcpy(&b, &m, sizeof(b));
    return b & kAbs;
  }
  bits_t hit(scalar_t v) const {
    const bits_t a = abs_bits(v);
    return static_cast<bits_t>((a >= t_bits) & (a <= kInf) & !never);
  }
  static bits_t is_nan(scalar_t v) { return static_cast<bits_t>(abs_bits(v) > kInf); }
};

constexpr int64_t kBlock = 64;

// Positions of |x| >= t, ascending. Sets *saw_nan when a NaN was met (if not null).
template <typename scalar_t>
at::Tensor at_least(const scalar_t* x, int64_t n, mag_t<scalar_t> t, bool* saw_nan = nullptr) {
  auto opts = at::TensorOptions().dtype(at::kLong);
  if (n == 0) return at::empty({0}, opts);
  using test_t = MagnitudeTest<scalar_t>;
  using bits_t = typename test_t::bits_t;
  const test_t test(t);
  const Chunks ch = chunks_for(n);
  std::vector<int64_t> offsets(ch.count + 1, 0);
  std::vector<char> nan(ch.count, 0);
  at::parallel_for(0, ch.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * ch.size, hi = std::min(n, lo + ch.size);
      bits_t count = 0, any_nan = 0;
      for (int64_t i = lo; i < hi; ++i) {
        count += test.hit(x[i]);
        any_nan |= test_t::is_nan(x[i]);
      }
      offsets[c + 1] = static_cast<int64_t>(count);
      nan[c] = any_nan != 0;
    }
  });
  for (int64_t c = 0; c < ch.count; ++c) offsets[c + 1] += offsets[c];
  if (saw_nan) *saw_nan = std::any_of(nan.begin(), nan.end(), [](char v) { return v != 0; });
  at::Tensor out = at::empty({offsets[ch.count]}, opts);
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, ch.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * ch.size, hi = std::min(n, lo + ch.size);
      int64_t w = offsets[c];
      for (int64_t b = lo; b < hi; b += kBlock) {
        const int64_t e = std::min(hi, b + kBlock);
        bits_t any = 0;
        for (int64_t i = b; i < e; ++i) any |= test.hit(x[i]);  // vectorized: most blocks have no hit
        if (!any) continue;
        for (int64_t i = b; i < e; ++i) {
          if (test.hit(x[i])) o[w++] = i;
        }
      }
    }
  });
  return out;
}

// Exact top-k of the candidates (ascending positions into x): largest magnitude first, ties to the
// lower position. Uses one scratch vector of candidate magnitudes.
template <typename scalar_t>
at::Tensor topk_of_candidates(const scalar_t* x, const int64_t* cand, int64_t c, int64_t k) {
  std::vector<mag_t<scalar_t>> mags(c);
  for (int64_t j = 0; j < c; ++j) mags[j] = magnitude(x[cand ? cand[j] : j]);
  std::vector<mag_t<scalar_t>> scratch(mags);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<>());
  const auto kth = scratch[k - 1];
  int64_t above = 0;
  for (auto m : mags) above += m > kth;
  int64_t ties = k - above;
  at::Tensor out = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  int64_t w = 0;
  for (int64_t j = 0; j < c && w < k; ++j) {
    const auto m = mags[j];
    if (m > kth || (m == kth && ties-- > 0)) o[w++] = cand ? cand[j] : j;
  }
  return out;
}

template <typename scalar_t>
at::Tensor topk_impl(const at::Tensor& input, int64_t k, double sample_ratio, int64_t seed) {
  const int64_t n = input.numel();
  const scalar_t* x = input.data_ptr<scalar_t>();
  if (n < kSampledMinNumel) {
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK_VALUE(!std::isnan(static_cast<double>(x[i])), "topk_select: input contains NaN");
    return topk_of_candidates(x, nullptr, n, k);
  }
  const int64_t sample_size = std::min(n, std::max<int64_t>(kMinSample, static_cast<int64_t>(std::ceil(n * sample_ratio))));
  const int64_t stride = std::max<int64_t>(1, n / sample_size);
  const int64_t start = stride > 1 ? static_cast<int64_t>(static_cast<uint64_t>(seed) % stride) : 0;
  std::vector<mag_t<scalar_t>> sample;
  sample.reserve((n - start + stride - 1) / stride);
  for (int64_t i = start; i < n; i += stride) sample.push_back(magnitude(x[i]));
  const int64_t s = static_cast<int64_t>(sample.size());
  // aim a little below the k-th magnitude (x1.25 + 4 sample positions) so that one pass usually
  // yields at least k candidates; keep in sync with _reference.sampled_topk_indices
  int64_t sample_k = std::min(s, static_cast<int64_t>(std::ceil(1.25 * static_cast<double>(k) * s / n)) + 4);
  for (int attempt = 0; attempt < 10; ++attempt) {
    std::vector<mag_t<scalar_t>> scratch(sample);
    std::nth_element(scratch.begin(), scratch.begin() + (sample_k - 1), scratch.end(), std::greater<>());
    bool saw_nan = false;
    at::Tensor cand = at_least(x, n, scratch[sample_k - 1], &saw_nan);
    TORCH_CHECK_VALUE(!saw_nan, "topk_select: input contains NaN");
    const int64_t c = cand.numel();
    if (c >= k) return c == k ? cand : topk_of_candidates(x, cand.data_ptr<int64_t>(), c, k);
    if (sample_k == s) break;
    sample_k = std::min(s, sample_k * 2);
  }
  return topk_of_candidates(x, nullptr, n, k);
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_floating_point(), op, ": expected a floating-point tensor, got ", x.scalar_type());
}

at::Tensor threshold_select_cpu(const at::Tensor& x, double threshold) {
  check_input(x, "threshold_select");
  const at::Tensor flat = x.contiguous().view(-1);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "threshold_select", [&] {
    out = at_least(flat.data_ptr<scalar_t>(), flat.numel(), static_cast<mag_t<scalar_t>>(threshold));
  });
  return out;
}

at::Tensor topk_select_cpu(const at::Tensor& x, int64_t k, double sample_ratio, int64_t seed) {
  check_input(x, "topk_select");
  TORCH_CHECK(sample_ratio > 0 && sample_ratio <= 1, "topk_select: sample_ratio must be in (0, 1], got ", sample_ratio);
  const at::Tensor flat = x.contiguous().view(-1);
  const int64_t n = flat.numel();
  auto opts = at::TensorOptions().dtype(at::kLong);
  if (k <= 0) return at::empty({0}, opts);
  if (k >= n) return at::arange(n, opts);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "topk_select", [&] {
    out = topk_impl<scalar_t>(flat, k, sample_ratio, seed);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("threshold_select", &threshold_select_cpu);
  m.impl("topk_select", &topk_select_cpu);
}

}  // namespace gradsparse
