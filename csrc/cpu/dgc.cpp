// CPU kernels for the memories' compensation passes, each fused into one pass:
// DGC's momentum correction + local accumulation, dgc_compensate (in place) and
// dgc_compensate_into (into other buffers, with the largest magnitudes of the gradient and of the
// results, for the reducer's health check); error feedback's residual add, residual_compensate_into
// (the same for r = r + g); absmax; DGC's in-place pass with the last step's memory update fused
// into it, dgc_zero_compensate (ZeroedPositions). The loops: compensate_core.h. The same passes
// collecting selection candidates: compensate_candidates.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "compensate_core.h"

namespace gradsparse {
namespace {

using namespace compensate;

// Runs range(begin, end, keys, cursor) over the kGrain chunks of [0, n) in parallel, each chunk
// writing K keys, and returns each key's maximum over the chunks: the same for any thread count,
// since a max does not depend on the order. Each thread runs its chunks in order, with one
// cursor (-1 at its first chunk) that range may keep its place in.
template <int K, typename Range>
std::array<uint64_t, K> chunked_max_keys(int64_t n, const Range& range) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<uint64_t> partial(static_cast<size_t>(chunks) * K, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    int64_t cursor = -1;
    for (int64_t c = first; c < last; ++c) {
      range(c * kGrain, std::min(n, (c + 1) * kGrain), partial.data() + K * c, cursor);
    }
  });
  std::array<uint64_t, K> total{};
  for (int64_t c = 0; c < chunks; ++c) {
    for (int t = 0; t < K; ++t) total[t] = std::max(total[t], partial[K * c + t]);
  }
  return total;
}

void dgc_compensate_cpu(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov) {
  check_dgc_args(u, v, g);
  const at::Tensor gc = g.contiguous();
  float* up = u.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dgc_compensate", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    at::parallel_for(0, gc.numel(), kGrain, [&](int64_t begin, int64_t end) {
      compensate_range<scalar_t, false>(up, vp, gp, up, vp, static_cast<float>(momentum), nesterov, begin, end,
                                        nullptr);
    });
  });
}

at::Tensor dgc_compensate_into_cpu(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, double momentum,
                                   bool nesterov, at::Tensor& u_out, at::Tensor& v_out) {
  check_dgc_into_args(u, v, g, u_out, v_out);
  const at::Tensor gc = g.contiguous();
  double maxima[3] = {0, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dgc_compensate_into", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const float *up = u.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *uo = u_out.data_ptr<float>(), *vo = v_out.data_ptr<float>();
    const auto total = chunked_max_keys<3>(gc.numel(), [&](int64_t begin, int64_t end, uint64_t* keys, int64_t&) {
      compensate_range<scalar_t, true>(up, vp, gp, uo, vo, static_cast<float>(momentum), nesterov, begin, end, keys);
    });
    maxima[0] = magnitude_of_key<acc_t>(total[0]);
    maxima[1] = magnitude_of_key<float>(total[1]);
    maxima[2] = magnitude_of_key<float>(total[2]);
  });
  return at::tensor({maxima[0], maxima[1], maxima[2]}, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor residual_compensate_into_cpu(const at::Tensor& r, const at::Tensor& g, at::Tensor& r_out) {
  check_residual_into_args(r, g, r_out);
  const at::Tensor gc = g.contiguous();
  double maxima[2] = {0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "residual_compensate_into", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const float* rp = r.data_ptr<float>();
    float* ro = r_out.data_ptr<float>();
    const auto total = chunked_max_keys<2>(gc.numel(), [&](int64_t begin, int64_t end, uint64_t* keys, int64_t&) {
      residual_range<scalar_t>(rp, gp, ro, begin, end, keys);
    });
    maxima[0] = magnitude_of_key<acc_t>(total[0]);
    maxima[1] = magnitude_of_key<float>(total[1]);
  });
  return at::tensor({maxima[0], maxima[1]}, at::TensorOptions().dtype(at::kDouble));
}

// Marks list[j0], list[j0 + 1], ... below hi in mask (byte q - lo set to 0; the index is taken
// modulo kGrain, so a position below lo in a wrong list stays inside the mask, which is then
// dropped) and returns where the slice ends; bad becomes nonzero if the slice is not
// non-decreasing from lo. One loop reads, checks and marks. Out of line, with restrict pointers,
// into a mask that is not thread_local: versions with a thread_local mask, inlined or not, took
// 19-22 ms at 25 % (25.6M elements, one thread) against 15.5 this way; gcc looked the mask's
// address up with a call to __tls_get_addr at every position, and inlined kept the loop's
// counters on the stack.
__attribute__((noinline)) int64_t mark_slice(const int64_t* __restrict list, int64_t n, int64_t j0, int64_t lo,
                                             int64_t hi, int8_t* __restrict mask, int64_t& bad) {
  int64_t j = j0, prev = lo, wrong = 0;
  for (; j < n; ++j) {
    const int64_t q = list[j];
    if (q >= hi) break;
    wrong |= q < prev;
    prev = q;
    mask[(q - lo) & (kGrain - 1)] = 0;
  }
  bad = wrong;
  return j;
}

// The positions where the state reads as zero as a chunk is compensated (dgc_zero_compensate's
// zeroed, minus its offset). Each thread runs its chunks in order with a cursor into the
// non-decreasing list: a binary search places it at the thread's first chunk (a search per chunk
// cost about 4 ms over 25.6M elements at 25 %, every probe of the 51 MB list a cache miss), then
// each chunk [begin, end) reads its slice from the cursor, checking it (non-decreasing from begin,
// below end) as it goes, and marks the slice's positions in a byte mask of the chunk (16 KB: 0
// where zeroed, -1 elsewhere), which the compensation loop reads as it reads the state. (Writing
// the zeros into the state before compensating the chunk was slower than a separate index_zero_
// pass: 20.4 against 18.6 ms at 25 %, each chunk's scattered stores waiting on lines the
// compensation then read anyway.) A wrong list is seen as a slice that fails its check or as
// slices that do not add up to the list; check() then names the first offending entry (scanning
// the list: only on that path).
struct ZeroedPositions {
  const int64_t* p;
  int64_t count, offset;
  std::atomic<int64_t> seen{0};
  std::atomic<bool> wrong{false};
  // one chunk mask per thread of the pool (a thread_local one made gcc look its address up with
  // a call to __tls_get_addr for every position marked)
  std::vector<int8_t> masks;

  ZeroedPositions(const at::Tensor& zeroed, int64_t offset_)
      : p(zeroed.data_ptr<int64_t>()),
        count(zeroed.numel()),
        offset(offset_),
        masks(count ? static_cast<size_t>(kGrain) * std::max(1, at::get_num_threads()) : 0) {}

  // The chunk's mask (one byte per element of [begin, end), 0 where zeroed, -1 elsewhere; the
  // thread's), or
  // nullptr when none of its elements is zeroed or its slice is wrong. cursor: -1 at a thread's
  // first chunk, then where the last chunk's slice ended.
  const int8_t* mark(int64_t begin, int64_t end, int64_t& cursor) {
    int8_t* mask = masks.data() + kGrain * at::get_thread_num();
    const int64_t lo = begin + offset, hi = end + offset;
    const int64_t j0 = cursor >= 0 ? cursor : std::lower_bound(p, p + count, lo) - p;
    if (j0 == count || p[j0] >= hi) {
      cursor = j0;
      return nullptr;
    }
    std::memset(mask, 0xff, static_cast<size_t>(end - begin));
    int64_t bad = 0;
    const int64_t j = mark_slice(p, count, j0, lo, hi, mask, bad);
    cursor = j;
    if (bad) {
      wrong.store(true, std::memory_order_relaxed);
      return nullptr;
    }
    seen.fetch_add(j - j0, std::memory_order_relaxed);
    return mask;
  }

  void check(int64_t numel, const char* op) const {
    if (!wrong.load() && seen.load() == count) return;
    for (int64_t j = 1; j < count; ++j) {
      TORCH_CHECK_VALUE(p[j] >= p[j - 1], op, ": zeroed must be non-decreasing, but zeroed[", j, "] = ", p[j],
                        " follows ", p[j - 1], "; every element was compensated, the state not zeroed in the chunks"
                        " those positions fall in");
    }
    for (int64_t j = 0; j < count; ++j) {
      TORCH_CHECK_INDEX(p[j] - offset >= 0 && p[j] - offset < numel, op, ": zeroed[", j, "] = ", p[j],
                        " is outside [offset, offset + numel) = [", offset, ", ", offset + numel,
                        "); every element was compensated, nothing outside the state written");
    }
  }
};

// The chunks' keep masks of dgc_mask_compensate: bit offset + i of the bitmap (check_selection_bits)
// set means u[i] and v[i] read as zero. Each chunk's 64-bit words (shifted into place where offset is
// not a multiple of 64) are expanded into the byte mask compensate_range reads, 8 bytes per table
// lookup: no list of positions is read and nothing is scattered (dgc_zero_compensate's marking of
// 6.4M positions cost about 12 ms of its 36 over 25.5M elements at 25 %, one thread).
struct ByteMasks {  // byte j of of[m]: 0 where bit j of m is set, 0xff where it is not
  uint64_t of[256];
  constexpr ByteMasks() : of() {
    for (int m = 0; m < 256; ++m) {
      uint64_t e = 0;
      for (int j = 0; j < 8; ++j) {
        if (!((m >> j) & 1)) e |= uint64_t(0xff) << (8 * j);
      }
      of[m] = e;
    }
  }
};
inline constexpr ByteMasks kExpand{};

struct MaskedBits {
  const uint64_t* words;
  int64_t n_words, offset;
  std::vector<int8_t> masks;  // one chunk mask per thread of the pool (as ZeroedPositions)

  MaskedBits(const at::Tensor& bits, int64_t offset_)
      : words(reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>())),
        n_words(bits.numel()),
        offset(offset_),
        masks(static_cast<size_t>(kGrain) * std::max(1, at::get_num_threads())) {}

  // The 64 bits from position q (those past the bitmap's end read as 0).
  uint64_t word_at(int64_t q) const {
    const int64_t w = q >> 6;
    const int sh = static_cast<int>(q & 63);
    uint64_t m = words[w] >> sh;
    if (sh && w + 1 < n_words) m |= words[w + 1] << (64 - sh);
    return m;
  }

  // The keep mask of [begin, end) (a kGrain chunk: begin a multiple of kGrain), or nullptr when no
  // element of it is zeroed.
  const int8_t* mark(int64_t begin, int64_t end) {
    int8_t* mask = masks.data() + kGrain * at::get_thread_num();
    uint64_t any = 0;
    for (int64_t i = begin; i < end; i += 64) {
      uint64_t m = word_at(offset + i);
      if (end - i < 64) m &= (uint64_t(1) << (end - i)) - 1;
      any |= m;
      int8_t* dst = mask + (i - begin);  // 64 bytes: inside the chunk's kGrain-byte mask
      for (int q = 0; q < 64; q += 8) std::memcpy(dst + q, &kExpand.of[(m >> q) & 0xff], 8);
    }
    return any ? mask : nullptr;
  }
};

// DGC's pass in place over [0, numel) with each chunk's keep mask from mark(begin, end, cursor) (nullptr:
// nothing zeroed there; cursor as chunked_max_keys keeps it); the maxima of dgc_compensate_into.
template <typename Mark>
at::Tensor masked_compensate(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov,
                             const Mark& mark) {
  const at::Tensor gc = g.contiguous();
  double maxima[3] = {0, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dgc_masked_compensate", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    float *up = u.data_ptr<float>(), *vp = v.data_ptr<float>();
    const auto range = [&](int64_t begin, int64_t end, uint64_t* keys, int64_t& cursor) {
      compensate_range<scalar_t, true>(up, vp, gp, up, vp, static_cast<float>(momentum), nesterov, begin, end, keys,
                                       mark(begin, end, cursor));
    };
    const auto total = chunked_max_keys<3>(gc.numel(), range);
    maxima[0] = magnitude_of_key<acc_t>(total[0]);
    maxima[1] = magnitude_of_key<float>(total[1]);
    maxima[2] = magnitude_of_key<float>(total[2]);
  });
  return at::tensor({maxima[0], maxima[1], maxima[2]}, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor dgc_mask_compensate_cpu(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov,
                                   const at::Tensor& bits, int64_t offset) {
  check_dgc_into_args(u, v, g, u, v);
  TORCH_CHECK_VALUE(offset >= 0, "dgc_mask_compensate: offset must be >= 0, got ", offset);
  check_selection_bits(bits, offset + u.numel(), u.device(), "dgc_mask_compensate", /*exact=*/false);
  MaskedBits z(bits, offset);
  return masked_compensate(u, v, g, momentum, nesterov,
                           [&](int64_t begin, int64_t end, int64_t&) { return z.mark(begin, end); });
}

at::Tensor dgc_zero_compensate_cpu(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov,
                                   const at::Tensor& zeroed, int64_t offset) {
  check_dgc_into_args(u, v, g, u, v);
  check_zeroed(zeroed, u, "dgc_zero_compensate");
  ZeroedPositions z(zeroed, offset);
  at::Tensor maxima = masked_compensate(
      u, v, g, momentum, nesterov, [&](int64_t begin, int64_t end, int64_t& cursor) { return z.mark(begin, end, cursor); });
  z.check(g.numel(), "dgc_zero_compensate");
  return maxima;
}

at::Tensor absmax_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_floating_point(), "absmax: expected a floating-point tensor, got ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  double result = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "absmax", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* p = xc.data_ptr<scalar_t>();
    const auto total = chunked_max_keys<1>(xc.numel(), [&](int64_t begin, int64_t end, uint64_t* keys, int64_t&) {
      absmax_range<scalar_t>(p, begin, end, keys);
    });
    result = magnitude_of_key<acc_t>(total[0]);
  });
  return at::scalar_tensor(result, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("absmax", &absmax_cpu);
  m.impl("dgc_compensate", &dgc_compensate_cpu);
  m.impl("dgc_compensate_into", &dgc_compensate_into_cpu);
  m.impl("residual_compensate_into", &residual_compensate_into_cpu);
  m.impl("dgc_zero_compensate", &dgc_zero_compensate_cpu);
  m.impl("dgc_mask_compensate", &dgc_mask_compensate_cpu);
}

}  // namespace gradsparse
