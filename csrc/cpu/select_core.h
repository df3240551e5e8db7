// Selection machinery shared by threshold_select and topk_select (csrc/cpu/select.cpp; top-k's
// own passes are in topk_core.h).
// Plain C++ (std::thread), no ATen, so that it can also be timed outside torch.
//
// Magnitudes are compared as "keys": the IEEE bit pattern of |x| (float for fp32/fp16/bf16,
// double for fp64) read as an unsigned integer. For non-negative floats the order of the keys is
// the order of the values, NaN is every key above infinity's, and -0 and +0 share key 0. Every
// test is "lo <= key <= hi", which vectorizes (SSE2, part of every x86_64) where a float compare
// with NaN semantics does not.
//
// One pass over the input (scan) finds every position whose key lies in a range, 64 elements at
// a time: a 64-bit mask of the hits, then one step per hit. Chunks of the input are scanned in
// parallel, each into its own small buffer of (position - chunk start) as uint32, so the hits
// come out in ascending order without a second pass.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <system_error>
#include <new>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "prefetch.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GRADSPARSE_AVX2_SCAN 1
#include <immintrin.h>
#endif

namespace gradsparse {
namespace select_core {

template <typename scalar_t>
struct Key {
  static constexpr bool kWide = std::is_same_v<scalar_t, double>;
  using mag_t = std::conditional_t<kWide, double, float>;
  using bits_t = std::conditional_t<kWide, uint64_t, uint32_t>;
  static constexpr bits_t kAbs = kWide ? 0x7fffffffffffffffull : 0x7fffffffu;
  static constexpr bits_t kInf = kWide ? 0x7ff0000000000000ull : 0x7f800000u;
  static constexpr int kTopShift = 8 * sizeof(bits_t) - 16;  // the top 16-bit digit: < 2^15 for keys <= kInf
  static constexpr int64_t kTopDigits = 1 << 15;

  static bits_t of(scalar_t v) {
    const mag_t m = static_cast<mag_t>(v);
    bits_t b;
    std::memcpy(&b, &m, sizeof(b));
    return b & kAbs;
  }
  // Smallest key with |x| >= t (t already rounded to mag_t, as the comparison in mag_t does);
  // kInf + 1 (nothing) for NaN.
  static bits_t at_least(mag_t t) {
    if (std::isnan(t)) return kInf + 1;
    if (!(t > 0)) return 0;
    bits_t b;
    std::memcpy(&b, &t, sizeof(b));
    return b;
  }
};

// Runs f(chunk, worker) for every chunk on `threads` workers: the calling thread and threads-1
// helper threads started for this call, which take chunks one at a time (a preempted worker
// does not hold the others up) and end with it. f must not throw.
//
// Why not at::parallel_for (OpenMP): on this shared 2-core machine, with other processes busy
// on every core, a pass over 25M floats in an OpenMP region took 12-14 ms (median) against
// 6 ms with one thread; libgomp's workers spin after each region, use up their share of the
// core and then wait a scheduler tick (4 ms) for it. Threads started per call sleep until
// needed and measured 6 ms (median) there, 3.9 ms (best). Starting one costs about 30 us, so
// callers use one worker for small inputs.
template <typename F>
void for_chunks(int64_t chunks, int threads, F&& f) {
  threads = static_cast<int>(std::min<int64_t>(std::max(1, threads), chunks));
  if (threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) f(c, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  const auto work = [&](int worker) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) f(c, worker);
  };
  std::vector<std::thread> helpers;
  helpers.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    try {
      helpers.emplace_back(work, t);
    } catch (const std::system_error&) {
      break;  // no more threads to be had: the workers already started share the chunks
    }
  }
  work(0);
  for (auto& h : helpers) h.join();
}

// Runs f(item) for every entry of items on `threads` workers (for_chunks, one item at a time), and
// rethrows in the calling thread the first exception any call threw (none may leave a worker).
template <typename F>
void for_each_rethrowing(const std::vector<int64_t>& items, int threads, F&& f) {
  std::exception_ptr error;
  std::mutex error_mutex;
  for_chunks(static_cast<int64_t>(items.size()), threads, [&](int64_t j, int) {
    try {
      f(items[j]);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

// Below this many elements one worker does the whole pass (starting a thread costs ~30 us).
constexpr int64_t kMinParallelNumel = 1 << 20;

inline int usable_threads(int threads, int64_t n) { return n >= kMinParallelNumel ? std::max(1, threads) : 1; }

// The input split into chunks of a multiple of 64 elements (at most 2^22 elements each, so
// positions inside a chunk fit uint32), a few per thread.
struct Chunking {
  int64_t n, size, count;
  Chunking(int64_t n_, int threads) : n(n_) {
    int64_t s = n / (8 * std::max(1, threads));
    s = std::min<int64_t>(std::max<int64_t>(s, 1 << 16), 1 << 22);
    size = (s + 63) / 64 * 64;
    count = std::max<int64_t>(1, (n + size - 1) / size);
  }
  int64_t lo(int64_t c) const { return c * size; }
  int64_t hi(int64_t c) const { return std::min(n, (c + 1) * size); }
};

#if defined(GRADSPARSE_AVX2_SCAN)
// The float scan's full 64-element blocks with AVX2 (8 lanes), compiled for AVX2 whatever the
// build flags and used only where the CPU has it (has_avx2). Returns the end of the blocks done.
template <typename Hit>
__attribute__((target("avx2"))) int64_t scan_f32_avx2(const float* x, int64_t b, int64_t end, uint32_t lo,
                                                      uint32_t hi, bool& nan, Hit& hit) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i lo_m1 = _mm256_set1_epi32(static_cast<int32_t>(lo - 1));
  const __m256i hi_v = _mm256_set1_epi32(static_cast<int32_t>(std::min<uint32_t>(hi, 0x7fffffffu)));
  const __m256i inf_v = _mm256_set1_epi32(0x7f800000);
  __m256i nan_v = _mm256_setzero_si256();
  for (; b + 64 <= end; b += 64) {
    prefetch_ahead(x + b, 64 * sizeof(float));
    uint64_t m = 0;
    for (int j = 0; j < 64; j += 8) {
      const __m256i a =
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b + j)), abs_mask);
      const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(a, hi_v), _mm256_cmpgt_epi32(a, lo_m1));
      nan_v = _mm256_or_si256(nan_v, _mm256_cmpgt_epi32(a, inf_v));
      m |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(in)))) << j;
    }
    while (m) {
      const int64_t i = b + __builtin_ctzll(m);
      uint32_t key;
      std::memcpy(&key, x + i, sizeof(key));
      hit(i, key & 0x7fffffffu);
      m &= m - 1;
    }
  }
  nan |= _mm256_movemask_epi8(nan_v) != 0;
  return b;
}

// The keys >= lo among x[0, 64) as a 64-bit mask (fp32, AVX2): bit j is set when the magnitude bits
// of x[j] exceed lo_m1 = lo - 1 as int32 (-1 for lo == 0: every key); NaN keys lie above infinity's
// and so are set too. Shared by the small-k pass 1 (topk_core.h) and the candidate collection
// (compensate_candidates.cpp).
__attribute__((target("avx2"))) inline uint64_t mask_at_least_f32_avx2(const float* x, __m256i lo_m1) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  uint64_t mask = 0;
  for (int j = 0; j < 64; j += 8) {
    const __m256i a = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), abs_mask);
    mask |= static_cast<uint64_t>(static_cast<uint32_t>(
                _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, lo_m1)))))
            << j;
  }
  return mask;
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// Calls hit(i, key) for every i in [begin, end) with lo <= key(x[i]) <= hi, in ascending order.
// Returns true if a NaN was seen.
template <typename scalar_t, typename Hit>
bool scan(const scalar_t* x, int64_t begin, int64_t end, typename Key<scalar_t>::bits_t lo,
          typename Key<scalar_t>::bits_t hi, Hit&& hit) {
  using K = Key<scalar_t>;
  using bits_t = typename K::bits_t;
  bits_t nan = 0;
  int64_t b = begin;
#if defined(GRADSPARSE_AVX2_SCAN)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx2()) {
      bool nan_avx2 = false;
      b = scan_f32_avx2(x, b, end, lo, hi, nan_avx2, hit);
      nan |= nan_avx2;
    }
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    // lo <= a <= hi as signed compares: keys are below 2^31; lo - 1 wraps to -1 for lo == 0
    const __m128i abs_mask = _mm_set1_epi32(0x7fffffff);
    const __m128i lo_m1 = _mm_set1_epi32(static_cast<int32_t>(lo - 1));
    const __m128i hi_v = _mm_set1_epi32(static_cast<int32_t>(std::min<bits_t>(hi, 0x7fffffffu)));
    const __m128i inf_v = _mm_set1_epi32(static_cast<int32_t>(K::kInf));
    __m128i nan_v = _mm_setzero_si128();
    for (; b + 64 <= end; b += 64) {
      uint64_t m = 0;
      for (int j = 0; j < 64; j += 4) {
        const __m128i a = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + b + j)), abs_mask);
        const __m128i in = _mm_andnot_si128(_mm_cmpgt_epi32(a, hi_v), _mm_cmpgt_epi32(a, lo_m1));
        nan_v = _mm_or_si128(nan_v, _mm_cmpgt_epi32(a, inf_v));
        m |= static_cast<uint64_t>(_mm_movemask_ps(_mm_castsi128_ps(in))) << j;
      }
      while (m) {
        const int64_t i = b + __builtin_ctzll(m);
        hit(i, K::of(x[i]));
        m &= m - 1;
      }
    }
    nan |= _mm_movemask_epi8(nan_v) != 0;
  }
#endif
  for (; b < end; b += 64) {
    const int64_t e = std::min(end, b + 64);
    bits_t any = 0;
    for (int64_t i = b; i < e; ++i) {  // vectorized: most blocks have no hit
      const bits_t a = K::of(x[i]);
      any |= static_cast<bits_t>((a >= lo) & (a <= hi));
      nan |= static_cast<bits_t>(a > K::kInf);
    }
    if (!any) continue;
    for (int64_t i = b; i < e; ++i) {
      const bits_t a = K::of(x[i]);
      if ((a >= lo) & (a <= hi)) hit(i, a);
    }
  }
  return nan != 0;
}

// A chunk's hits: positions relative to the chunk start. Stops storing (but keeps counting) past
// `limit` entries or when memory runs out: `overflow`.
struct alignas(64) Hits {  // own cache line: chunks side by side are filled by different workers
  uint32_t* pos = nullptr;
  int64_t size = 0, capacity = 0, limit = 0, count = 0;
  bool overflow = false, nan = false;

  Hits() = default;
  Hits(const Hits&) = delete;
  Hits& operator=(const Hits&) = delete;
  ~Hits() { release(); }
  void release() {
    std::free(pos);
    pos = nullptr;
    capacity = size = 0;
  }
  bool grow(int64_t want) {
    want = std::min(want, limit);
    if (want <= capacity) return false;
    auto* p = static_cast<uint32_t*>(std::realloc(pos, want * sizeof(uint32_t)));
    if (!p) return false;
    pos = p;
    capacity = want;
    return true;
  }
  void push(uint32_t p) {
    ++count;
    if (overflow) return;
    if (size == capacity && !grow(std::max<int64_t>(256, 2 * capacity))) {
      overflow = true;
      release();
      return;
    }
    pos[size++] = p;
  }
};

// Adds per-worker histograms, stored side by side (threads x digits), into the first.
inline void fold_histograms(std::vector<int64_t>& hist, int threads, int64_t digits) {
  for (int t = 1; t < threads; ++t) {
    for (int64_t d = 0; d < digits; ++d) hist[d] += hist[static_cast<int64_t>(t) * digits + d];
  }
}

// Scans every chunk for keys in [lo, hi] into per-chunk Hits. `expect` (total hits expected, for
// the first allocation) and `limit` (total entries kept before overflow) are split over the chunks
// in proportion to their length.
template <typename scalar_t>
std::vector<std::unique_ptr<Hits>> scan_chunks(const scalar_t* x, const Chunking& ch, int threads,
                                               typename Key<scalar_t>::bits_t lo, typename Key<scalar_t>::bits_t hi,
                                               int64_t expect, int64_t limit) {
  std::vector<std::unique_ptr<Hits>> out(ch.count);
  for (auto& h : out) h = std::make_unique<Hits>();
  const double n = static_cast<double>(std::max<int64_t>(1, ch.n));
  for_chunks(ch.count, threads, [&](int64_t c, int) {
    Hits& h = *out[c];
    const int64_t lo_i = ch.lo(c), hi_i = ch.hi(c);
    const double share = static_cast<double>(hi_i - lo_i) / n;
    h.limit = static_cast<int64_t>(static_cast<double>(limit) * share) + 64;
    h.grow(static_cast<int64_t>(static_cast<double>(expect) * share * 1.1) + 64);
    h.nan = scan(x, lo_i, hi_i, lo, hi, [&](int64_t i, typename Key<scalar_t>::bits_t) {
      h.push(static_cast<uint32_t>(i - lo_i));
    });
  });
  return out;
}

// The bucket of the k-th largest (1-based) in a histogram of top digits, and how many lie above it.
inline std::pair<int64_t, int64_t> find_bucket(const int64_t* hist, int64_t digits, int64_t k) {
  int64_t above = 0;
  for (int64_t d = digits - 1; d >= 0; --d) {
    if (above + hist[d] >= k) return {d, above};
    above += hist[d];
  }
  return {0, above};
}

// The k-th largest (1-based, k <= count) key of the parts, given the histogram of their top
// digits, and how many keys are larger.
template <typename bits_t, int kTopShift>
std::pair<bits_t, int64_t> kth_largest(const std::vector<const bits_t*>& parts, const std::vector<int64_t>& sizes,
                                       const int64_t* hist, int64_t digits, int64_t k) {
  const auto [bucket, above] = find_bucket(hist, digits, k);
  std::vector<bits_t> sub;
  sub.reserve(hist[bucket]);
  for (size_t p = 0; p < parts.size(); ++p) {
    const bits_t* keys = parts[p];
    for (int64_t j = 0; j < sizes[p]; ++j) {
      if ((keys[j] >> kTopShift) == static_cast<bits_t>(bucket)) sub.push_back(keys[j]);
    }
  }
  const int64_t r = k - above - 1;
  std::nth_element(sub.begin(), sub.begin() + r, sub.end(), std::greater<>());
  const bits_t kth = sub[r];
  int64_t larger = above;
  for (const bits_t key : sub) larger += key > kth;
  return {kth, larger};
}

// ---------------------------------------------------------------------------------------------
// threshold_select: positions of every lo <= key, ascending.

// `alloc(count)` returns the int64 output of `count` elements. Hit buffers: 4 bytes per hit (at
// most one n-element float scratch), freed chunk by chunk.
template <typename scalar_t, typename Alloc>
void select_at_least(const scalar_t* x, int64_t n, typename Key<scalar_t>::bits_t lo, int threads, Alloc&& alloc) {
  using K = Key<scalar_t>;
  threads = usable_threads(threads, n);
  const Chunking ch(n, threads);
  auto hits = scan_chunks(x, ch, threads, lo, K::kInf, 0, n);
  std::vector<int64_t> offsets(ch.count + 1, 0);
  for (int64_t c = 0; c < ch.count; ++c) {
    if (hits[c]->overflow) throw std::bad_alloc();
    offsets[c + 1] = offsets[c] + hits[c]->count;
  }
  int64_t* out = alloc(offsets[ch.count]);
  const auto copy = [&](int64_t c, int) {
    const uint32_t* p = hits[c]->pos;
    const int64_t base = ch.lo(c), size = hits[c]->size;
    int64_t* o = out + offsets[c];
    for (int64_t j = 0; j < size; ++j) o[j] = base + p[j];
    hits[c]->release();
  };
  for_chunks(ch.count, offsets[ch.count] >= (1 << 20) ? threads : 1, copy);
}

}  // namespace select_core
}  // namespace gradsparse
