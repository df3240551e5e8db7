// Selection machinery shared by threshold_select and topk_select (csrc/cpu/select.cpp).
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
// parallel, each into its own small buffer of (position - chunk start) as uint32 (plus the key when
// asked), so the hits come out in ascending order without a second pass.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <system_error>
#include <new>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

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

// A chunk's hits: positions relative to the chunk start, and their keys when asked. Stops storing
// (but keeps counting) past `limit` entries or when memory runs out: `overflow`.
template <typename bits_t>
struct alignas(64) Hits {  // own cache line: chunks side by side are filled by different workers
  uint32_t* pos = nullptr;
  bits_t* keys = nullptr;
  int64_t size = 0, capacity = 0, limit = 0, count = 0;
  bool with_keys = false, overflow = false, nan = false;

  Hits() = default;
  Hits(const Hits&) = delete;
  Hits& operator=(const Hits&) = delete;
  ~Hits() { release(); }
  void release() {
    std::free(pos);
    std::free(keys);
    pos = nullptr;
    keys = nullptr;
    capacity = size = 0;
  }
  bool grow(int64_t want) {
    want = std::min(want, limit);
    if (want <= capacity) return false;
    auto* p = static_cast<uint32_t*>(std::realloc(pos, want * sizeof(uint32_t)));
    if (p) pos = p;
    if (p && with_keys) {
      auto* k = static_cast<bits_t*>(std::realloc(keys, want * sizeof(bits_t)));
      if (k) keys = k;
      p = k ? p : nullptr;
    }
    if (!p) return false;
    capacity = want;
    return true;
  }
  void push(uint32_t p, bits_t key) {
    ++count;
    if (overflow) return;
    if (size == capacity && !grow(std::max<int64_t>(256, 2 * capacity))) {
      overflow = true;
      release();
      return;
    }
    pos[size] = p;
    if (with_keys) keys[size] = key;
    ++size;
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
// in proportion to their length. With `top_hist`, also counts every hit's top 16-bit digit into
// top_hist[thread * kTopDigits + digit] (cleared here).
template <typename scalar_t>
std::vector<std::unique_ptr<Hits<typename Key<scalar_t>::bits_t>>> scan_chunks(
    const scalar_t* x, const Chunking& ch, int threads, typename Key<scalar_t>::bits_t lo,
    typename Key<scalar_t>::bits_t hi, bool with_keys, int64_t expect, int64_t limit,
    std::vector<int64_t>* top_hist) {
  using K = Key<scalar_t>;
  using bits_t = typename K::bits_t;
  std::vector<std::unique_ptr<Hits<bits_t>>> out(ch.count);
  for (auto& h : out) h = std::make_unique<Hits<bits_t>>();
  if (top_hist) top_hist->assign(static_cast<size_t>(threads) * K::kTopDigits, 0);
  const double n = static_cast<double>(std::max<int64_t>(1, ch.n));
  for_chunks(ch.count, threads, [&](int64_t c, int tid) {
    Hits<bits_t>& h = *out[c];
    const int64_t lo_i = ch.lo(c), hi_i = ch.hi(c);
    const double share = static_cast<double>(hi_i - lo_i) / n;
    h.with_keys = with_keys;
    h.limit = static_cast<int64_t>(static_cast<double>(limit) * share) + 64;
    h.grow(static_cast<int64_t>(static_cast<double>(expect) * share * 1.1) + 64);
    int64_t* hist = top_hist ? top_hist->data() + static_cast<int64_t>(tid) * K::kTopDigits : nullptr;
    h.nan = scan(x, lo_i, hi_i, lo, hi, [&](int64_t i, bits_t key) {
      h.push(static_cast<uint32_t>(i - lo_i), key);
      if (hist) ++hist[key >> K::kTopShift];
    });
  });
  if (top_hist) {
    fold_histograms(*top_hist, threads, K::kTopDigits);
    top_hist->resize(K::kTopDigits);
  }
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
  auto hits = scan_chunks(x, ch, threads, lo, K::kInf, false, 0, n, nullptr);
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

// ---------------------------------------------------------------------------------------------
// topk_select: exact top-k by magnitude, ties to the lower position, through a sampled threshold.

enum class Status { kOk, kNaN };

constexpr int64_t kSampledMinNumel = 16384;  // keep in sync with _reference.SAMPLED_MIN_NUMEL
constexpr int64_t kMinSample = 1024;         // keep in sync with _reference.MIN_SAMPLE

template <typename scalar_t>
struct TopK {
  using K = Key<scalar_t>;
  using bits_t = typename K::bits_t;
  using HitList = std::vector<std::unique_ptr<Hits<bits_t>>>;

  const scalar_t* x;
  int64_t n, k;
  int threads;
  Chunking ch;
  // kept candidates: at most one n-element float scratch (4 bytes per element) in all
  int64_t limit;

  TopK(const scalar_t* x_, int64_t n_, int64_t k_, int threads_)
      : x(x_), n(n_), k(k_), threads(usable_threads(threads_, n_)), ch(n_, threads),
        limit(std::max<int64_t>(4096, n_ * 4 / static_cast<int64_t>(sizeof(uint32_t) + sizeof(bits_t)))) {}

  static bool any_nan(const HitList& hits) {
    return std::any_of(hits.begin(), hits.end(), [](const auto& h) { return h->nan; });
  }
  static int64_t total(const HitList& hits) {
    int64_t c = 0;
    for (const auto& h : hits) c += h->count;
    return c;
  }

  // The sample_k-th largest key of the sample, given the histogram of its valid (non-NaN) keys'
  // top digits; 0 (everything) when there are fewer valid keys.
  static bits_t sample_kth(const std::vector<bits_t>& keys, const std::vector<int64_t>& hist, int64_t valid,
                           int64_t sample_k) {
    if (sample_k > valid) return 0;
    return kth_largest<bits_t, K::kTopShift>({keys.data()}, {static_cast<int64_t>(keys.size())}, hist.data(),
                                             K::kTopDigits, sample_k).first;
  }

  static constexpr int64_t kPrefetch = 64;

  template <typename Alloc>
  Status run_sampled(double sample_ratio, int64_t seed, Alloc&& alloc) {
    const int64_t wanted = static_cast<int64_t>(std::ceil(static_cast<double>(n) * sample_ratio));
    const int64_t sample_size = std::min(n, std::max<int64_t>(kMinSample, wanted));
    const int64_t stride = std::max<int64_t>(1, n / sample_size);
    const int64_t start = stride > 1 ? static_cast<int64_t>(static_cast<uint64_t>(seed) % stride) : 0;
    const int64_t s = (n - start + stride - 1) / stride;
    // aim a little below the k-th magnitude (x1.25 + 4 sample positions) so that one pass usually
    // yields at least k candidates; keep in sync with _reference.sampled_topk_indices
    int64_t sample_k = std::min(s, static_cast<int64_t>(std::ceil(1.25 * static_cast<double>(k) * s / n)) + 4);
    std::vector<bits_t> skeys(s);
    std::vector<int64_t> shist(static_cast<size_t>(threads) * K::kTopDigits, 0);
    std::vector<int64_t> top_hist;
    std::vector<int64_t> svalid(threads, 0);
    int64_t valid = 0;
    const int64_t expect = static_cast<int64_t>(1.3 * static_cast<double>(k));
    // the sample, in pieces of at least 16k positions, with one histogram per worker
    const int64_t pieces = std::min<int64_t>(threads, std::max<int64_t>(1, s / 16384));
    for_chunks(pieces, static_cast<int>(pieces), [&](int64_t piece, int worker) {
      int64_t* sh = shist.data() + static_cast<int64_t>(worker) * K::kTopDigits;
      int64_t v = 0;
      for (int64_t j = s * piece / pieces, e = s * (piece + 1) / pieces; j < e; ++j) {
        // one cache line per sampled element, too far apart for the hardware prefetcher
        if (j + kPrefetch < e) __builtin_prefetch(x + start + (j + kPrefetch) * stride);
        const bits_t key = K::of(x[start + j * stride]);
        skeys[j] = key;
        if (key <= K::kInf) {
          ++sh[key >> K::kTopShift];
          ++v;
        }
      }
      svalid[worker] += v;
    });
    for (int u = 0; u < threads; ++u) valid += svalid[u];
    fold_histograms(shist, threads, K::kTopDigits);
    shist.resize(K::kTopDigits);
    HitList hits = scan_chunks(x, ch, threads, sample_kth(skeys, shist, valid, sample_k), K::kInf, true, expect,
                               limit, &top_hist);
    if (any_nan(hits)) return Status::kNaN;
    for (int attempt = 1; total(hits) < k && attempt < 10 && sample_k < s; ++attempt) {
      sample_k = std::min(s, sample_k * 2);
      hits.clear();  // free before the next scan
      hits = scan_chunks(x, ch, threads, sample_kth(skeys, shist, valid, sample_k), K::kInf, true, expect, limit,
                         &top_hist);
    }
    if (total(hits) < k) {
      hits.clear();
      hits = scan_chunks(x, ch, threads, 0, K::kInf, true, n, limit, &top_hist);
    }
    skeys = {};
    return finish(hits, top_hist, alloc);
  }

  // Exact top-k without a sample: every element is a candidate.
  template <typename Alloc>
  Status run_exact(Alloc&& alloc) {
    std::vector<int64_t> top_hist;
    HitList hits = scan_chunks(x, ch, threads, 0, K::kInf, true, n, limit, &top_hist);
    if (any_nan(hits)) return Status::kNaN;
    return finish(hits, top_hist, alloc);
  }

  // hits: every key >= some threshold, at least k of them (top_hist counts them all).
  template <typename Alloc>
  Status finish(HitList& hits, const std::vector<int64_t>& top_hist, Alloc&& alloc) {
    const int64_t c = total(hits);
    int64_t* out = alloc(k);
    const bool overflow = std::any_of(hits.begin(), hits.end(), [](const auto& h) { return h->overflow; });
    if (!overflow) {
      int64_t w = 0;
      if (c == k) {
        for (int64_t ci = 0; ci < ch.count; ++ci) {
          const int64_t base = ch.lo(ci);
          for (int64_t j = 0; j < hits[ci]->size; ++j) out[w++] = base + hits[ci]->pos[j];
        }
        return Status::kOk;
      }
      std::vector<const bits_t*> parts;
      std::vector<int64_t> sizes;
      for (const auto& h : hits) {
        parts.push_back(h->keys);
        sizes.push_back(h->size);
      }
      const auto [kth, above] = kth_largest<bits_t, K::kTopShift>(parts, sizes, top_hist.data(), K::kTopDigits, k);
      int64_t ties = k - above;
      for (int64_t ci = 0; ci < ch.count && w < k; ++ci) {
        const int64_t base = ch.lo(ci);
        const uint32_t* pos = hits[ci]->pos;
        const bits_t* keys = hits[ci]->keys;
        const int64_t size = hits[ci]->size;
        for (int64_t j = 0; j < size; ++j) {
          const bits_t key = keys[j];
          const bool eq = key == kth;
          const bool keep = (key > kth) | (eq & (ties > 0));
          out[w] = base + pos[j];  // out has k entries and w < k here
          w += keep;
          ties -= eq & keep;
          if (w == k) break;
        }
      }
      return Status::kOk;
    }
    hits.clear();
    // Too many candidates to keep: refine the k-th key digit by digit with passes over x, then
    // write the top-k with a counting pass and a writing pass. No scratch but small histograms.
    auto [bucket, above] = find_bucket(top_hist.data(), K::kTopDigits, k);
    bits_t prefix = static_cast<bits_t>(bucket);
    int64_t need = k - above;
    std::vector<int64_t> hist;
    for (int shift = K::kTopShift - 16; shift >= 0; shift -= 16) {
      const bits_t lo = prefix << (shift + 16), hi = lo | ((bits_t(1) << (shift + 16)) - 1);
      hist.assign(static_cast<size_t>(threads) << 16, 0);
      for_chunks(ch.count, threads, [&](int64_t ci, int tid) {
        int64_t* hh = hist.data() + (static_cast<int64_t>(tid) << 16);
        scan(x, ch.lo(ci), ch.hi(ci), lo, hi, [&](int64_t, bits_t key) { ++hh[(key >> shift) & 0xffff]; });
      });
      fold_histograms(hist, threads, 1 << 16);
      const auto [digit, ab] = find_bucket(hist.data(), 1 << 16, need);
      need -= ab;
      above += ab;
      prefix = (prefix << 16) | static_cast<bits_t>(digit);
    }
    const bits_t kth = prefix;
    std::vector<int64_t> gt(ch.count, 0), eq(ch.count, 0);
    for_chunks(ch.count, threads, [&](int64_t ci, int) {
      int64_t g = 0, e = 0;
      scan(x, ch.lo(ci), ch.hi(ci), kth, K::kInf, [&](int64_t, bits_t key) {
        g += key > kth;
        e += key == kth;
      });
      gt[ci] = g;
      eq[ci] = e;
    });
    std::vector<int64_t> offset(ch.count), allow(ch.count);
    int64_t ties = k - above, w = 0;
    for (int64_t ci = 0; ci < ch.count; ++ci) {
      allow[ci] = std::min(eq[ci], ties);
      ties -= allow[ci];
      offset[ci] = w;
      w += gt[ci] + allow[ci];
    }
    for_chunks(ch.count, threads, [&](int64_t ci, int) {
      int64_t o = offset[ci], a = allow[ci];
      scan(x, ch.lo(ci), ch.hi(ci), kth, K::kInf, [&](int64_t i, bits_t key) {
        if (key > kth || a-- > 0) out[o++] = i;
      });
    });
    return Status::kOk;
  }
};

}  // namespace select_core
}  // namespace gradsparse
