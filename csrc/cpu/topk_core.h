// topk_select's machinery (csrc/cpu/select.cpp): the exact top-k by magnitude, ties to the lower
// position, positions ascending, at a cost that hardly depends on k. Plain C++ like select_core.h.
//
// 1. Bracket. A sample (one position per stride, csrc/select_params.h) gives two keys lo < hi
//    around the k-th largest key: about k - margin elements lie at or above hi, about k + margin
//    at or above lo, where the margin is 3 standard deviations of a sampled count plus 4 sample
//    positions. (Below kSampledMinNumel elements, or when the sample says nothing: lo = 0, hi =
//    above infinity: everything is bracketed.)
// 2. Pass 1 over x, per chunk: counts the keys >= hi ("above", AVX2 lane counters for fp32) and
//    == lo ("at lo"), and keeps the keys in (lo, hi) (few: the bracket). For small k it instead
//    scans for every key >= lo and keeps its position, tagged with its class, so that pass 2 need
//    not read x again.
// 3. If above < k <= above + bracket + at lo, the k-th key is lo or one of the bracket's keys
//    (a histogram of the bracket, then nth_element in one bucket): exact. Each chunk's count of larger keys and of keys equal to
//    the k-th follow from the same counts, so the ties allowed in each chunk (lower positions
//    first) and each chunk's output offset are known before anything is written.
// 4. Pass 2 writes each chunk's positions straight into the output: from its kept positions, or by
//    a second scan of x (large k; no scratch proportional to k).
// If the sample misled (the k-th key outside [lo, hi)) or the bracket is too large to keep, the
// k-th key is found by radix digits instead (16 bits per pass over x, only the keys in the range
// the counts already bound), then counted per chunk and written by pass 2 the same way.
//
// Costs on 25M fp32 with one thread (docs/kernels.md, benchmarks/select_bench.py): the sample, two
// passes that each cost about one read of x, plus writing k int64 positions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "../select_params.h"
#include "select_core.h"

namespace gradsparse {
namespace select_core {

#if defined(GRADSPARSE_AVX2_SCAN)
// The lane counters of count_bracket's AVX2 loops (count_f32_avx2, count_keep_f32_avx2): for each
// 8-lane group of fp32, the keys >= hi and == lo are counted and NaN is noted; the keys and the lanes
// in (lo, hi) are handed back.
struct BracketLanes {
  __m256i abs_mask, inf_v, lo_v, hi_m1;
  __m256i nan_v = _mm256_setzero_si256(), above_v = _mm256_setzero_si256(), at_lo_v = _mm256_setzero_si256();

  __attribute__((target("avx2"))) BracketLanes(uint32_t lo, uint32_t hi)
      : abs_mask(_mm256_set1_epi32(0x7fffffff)),
        inf_v(_mm256_set1_epi32(0x7f800000)),
        lo_v(_mm256_set1_epi32(static_cast<int32_t>(lo))),
        hi_m1(_mm256_set1_epi32(static_cast<int32_t>(hi - 1))) {}  // key >= hi as key > hi - 1

  // The keys of x[0, 8) into `keys`; returns the lanes in (lo, hi) as a mask.
  __attribute__((target("avx2"))) __m256i group(const float* x, __m256i& keys) {
    const __m256i a = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), abs_mask);
    nan_v = _mm256_or_si256(nan_v, _mm256_cmpgt_epi32(a, inf_v));
    const __m256i ge_hi = _mm256_cmpgt_epi32(a, hi_m1);
    above_v = _mm256_sub_epi32(above_v, ge_hi);  // lanes count at most 2^19 (chunks <= 2^22 elements)
    at_lo_v = _mm256_sub_epi32(at_lo_v, _mm256_cmpeq_epi32(a, lo_v));
    keys = a;
    return _mm256_andnot_si256(ge_hi, _mm256_cmpgt_epi32(a, lo_v));
  }

  // Adds the lanes' counts to above and at_lo, and whether a NaN was seen to nan.
  __attribute__((target("avx2"))) void add_to(int64_t& above, int64_t& at_lo, bool& nan) const {
    alignas(32) int32_t lanes[2][8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), above_v);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), at_lo_v);
    for (int l = 0; l < 8; ++l) {
      above += lanes[0][l];
      at_lo += lanes[1][l];
    }
    nan |= _mm256_movemask_epi8(nan_v) != 0;
  }
};

// count_bracket's full 64-element blocks of fp32 with AVX2: lane counters for the two counts, and
// the rare blocks with a key in (lo, hi) handed to `in` element by element. Returns the end of the
// blocks done.
template <typename In>
__attribute__((target("avx2"))) int64_t count_f32_avx2(const float* x, int64_t b, int64_t end, uint32_t lo,
                                                       uint32_t hi, int64_t& above, int64_t& at_lo, bool& nan,
                                                       In& in) {
  BracketLanes lanes(lo, hi);
  for (; b + 64 <= end; b += 64) {
    prefetch_ahead(x + b, 64 * sizeof(float));
    uint64_t in_mask = 0;
    for (int j = 0; j < 64; j += 8) {
      __m256i a;
      const __m256i inside = lanes.group(x + b + j, a);
      in_mask |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(inside)))) << j;
    }
    for (; in_mask; in_mask &= in_mask - 1) {
      const int64_t i = b + __builtin_ctzll(in_mask);
      uint32_t key;
      std::memcpy(&key, x + i, sizeof(key));
      in(i, key & 0x7fffffffu);
    }
  }
  lanes.add_to(above, at_lo, nan);
  return b;
}

// For every 8-lane mask, the lanes set, packed to the front: AVX2 has no compress store, so a
// permutation from this table packs a group's kept lanes (count_keep_f32_avx2).
struct LeftPack {
  alignas(32) int32_t lanes[256][8];
  constexpr LeftPack() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int j = 0;
      for (int l = 0; l < 8; ++l) {
        if ((m >> l) & 1) lanes[m][j++] = l;
      }
    }
  }
};
inline constexpr LeftPack kLeftPack{};

// Room for a block's 64 more keys at keys[kept]: true when there is (the vector grown, doubling,
// up to limit + 64), false when kept has reached limit or growing failed (then out_of_memory is set).
inline bool room_for_block(std::vector<uint32_t>& keys, int64_t kept, int64_t limit, bool& out_of_memory) {
  if (kept + 64 <= static_cast<int64_t>(keys.size())) return true;
  if (kept >= limit) return false;
  try {
    keys.resize(static_cast<size_t>(std::min(limit + 64, std::max(2 * kept, kept + 64))));
  } catch (const std::bad_alloc&) {
    out_of_memory = true;
    return false;
  }
  return true;
}

// count_f32_avx2 that also keeps the bracket's keys: each 8-lane group's keys in (lo, hi) are packed
// to the front by a permutation and stored at keys[kept] without a branch (room for 64 more is made
// before each block), and `bracket` counts them. It stops before a block once `limit` keys are
// kept, or when the room cannot be made (out_of_memory); keys.size() is then larger than kept.
// Returns the end of the blocks done. At 25 % a sample leaves about 3 % of ResNet-50's gradients in
// the brackets, and one call per kept key cost ~3.6 ns each (docs/benchmarks.md).
__attribute__((target("avx2"))) inline int64_t count_keep_f32_avx2(const float* x, int64_t b, int64_t end,
                                                                  uint32_t lo, uint32_t hi, int64_t& above,
                                                                  int64_t& at_lo, int64_t& bracket, bool& nan,
                                                                  std::vector<uint32_t>& keys, int64_t& kept,
                                                                  int64_t limit, bool& out_of_memory) {
  BracketLanes lanes(lo, hi);
  for (; b + 64 <= end; b += 64) {
    prefetch_ahead(x + b, 64 * sizeof(float));
    if (!room_for_block(keys, kept, limit, out_of_memory)) break;
    uint32_t* dst = keys.data() + kept;
    for (int j = 0; j < 64; j += 8) {
      __m256i a;
      const int m = _mm256_movemask_ps(_mm256_castsi256_ps(lanes.group(x + b + j, a)));
      const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.lanes[m]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(a, order));
      dst += __builtin_popcount(static_cast<unsigned>(m));
    }
    const int64_t got = dst - (keys.data() + kept);
    kept += got;
    bracket += got;
  }
  lanes.add_to(above, at_lo, nan);
  return b;
}
#endif

// Over [begin, end): adds the count of keys >= hi to `above` and of keys == lo to `at_lo`, and
// calls in(i, key) for every key in (lo, hi), in ascending order (lo < hi <= kInf + 1). Returns
// true if a NaN was seen (then the counts are meaningless: the caller refuses the input).
template <typename scalar_t, typename In>
bool count_bracket(const scalar_t* x, int64_t begin, int64_t end, typename Key<scalar_t>::bits_t lo,
                   typename Key<scalar_t>::bits_t hi, int64_t& above, int64_t& at_lo, In&& in) {
  using K = Key<scalar_t>;
  using bits_t = typename K::bits_t;
  bool nan = false;
  int64_t b = begin;
#if defined(GRADSPARSE_AVX2_SCAN)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx2()) b = count_f32_avx2(x, b, end, lo, hi, above, at_lo, nan, in);
  }
#endif
  for (; b < end; b += 64) {
    const int64_t e = std::min(end, b + 64);
    int64_t ge_hi = 0, eq_lo = 0;
    bits_t any_in = 0, any_nan = 0;
    for (int64_t i = b; i < e; ++i) {  // vectorized: most blocks have no key in (lo, hi)
      const bits_t a = K::of(x[i]);
      ge_hi += a >= hi;
      eq_lo += a == lo;
      any_in |= static_cast<bits_t>((a > lo) & (a < hi));
      any_nan |= static_cast<bits_t>(a > K::kInf);
    }
    above += ge_hi;
    at_lo += eq_lo;
    nan |= any_nan != 0;
    if (!any_in) continue;
    for (int64_t i = b; i < e; ++i) {
      const bits_t a = K::of(x[i]);
      if ((a > lo) & (a < hi)) in(i, a);
    }
  }
  return nan;
}

// Where pass 2 also writes a payload's pairs (segmented_topk_select_pack): beside every position it
// writes, the same position as an int32 index and its fp32 value, at the same place in two more
// arrays (idx, val: null for positions alone). The pointers advance with the positions' output.
struct Pairs {
  int32_t* idx = nullptr;
  float* val = nullptr;
  explicit operator bool() const { return idx != nullptr; }
};

// Where pass 2 also marks every position it writes in a bitmap (segmented_topk_select_pack's
// `bits`: bit p % 64 of word p / 64 for bucket position p; the words zeroed beforehand): one OR per
// 64-element block from the block's mask, not one store per position. [lo, hi) is the range of
// positions this writer's chunk owns: a word wholly inside it is written by no other chunk (a plain
// OR); a word it shares with a neighbouring chunk or segment, which another worker may be writing,
// takes an atomic OR.
struct BitSink {
  uint64_t* words = nullptr;
  int64_t lo = 0, hi = 0;
  explicit operator bool() const { return words != nullptr; }
  void or_word(int64_t w, uint64_t m) const {
    if (!m) return;
    if (64 * w >= lo && 64 * w + 64 <= hi) {
      words[w] |= m;
    } else {
      __atomic_fetch_or(words + w, m, __ATOMIC_RELAXED);
    }
  }
  // The 64 positions from p: bit j of m marks p + j (every marked position inside [lo, hi)).
  void block(int64_t p, uint64_t m) const {
    const int sh = static_cast<int>(p & 63);
    or_word(p >> 6, m << sh);
    if (sh) or_word((p >> 6) + 1, m >> (64 - sh));
  }
  void bit(int64_t p) const { or_word(p >> 6, uint64_t(1) << (p & 63)); }
  // Every position of [a, b).
  void range(int64_t a, int64_t b) const {
    for (; a < b && (a & 63); ++a) bit(a);
    for (; a + 64 <= b; a += 64) or_word(a >> 6, ~uint64_t(0));
    for (; a < b; ++a) bit(a);
  }
};

// Writes base + j for every set bit j of m, ascending; returns the advanced output pointer. With
// kPairs, also base + j and xb[j] into pairs (xb: the block's values; base + j fits int32).
template <bool kPairs = false>
inline int64_t* write_bits(int64_t* out, int64_t base, uint64_t m, const float* xb = nullptr, Pairs* pairs = nullptr) {
  for (; m; m &= m - 1) {
    const int j = __builtin_ctzll(m);
    *out++ = base + j;
    if constexpr (kPairs) {
      *pairs->idx++ = static_cast<int32_t>(base + j);
      *pairs->val++ = xb[j];
    }
  }
  return out;
}

// Masks with at least this many bits are written 8 at a time (write_bits_dense).
constexpr int kDenseBits = 12;

// Keeps the lowest `allow` set bits of m; allow is reduced by the bits kept.
inline uint64_t lowest_bits(uint64_t m, int64_t& allow) {
  const int64_t count = __builtin_popcountll(m);
  if (count <= allow) {
    allow -= count;
    return m;
  }
  uint64_t kept = 0;
  for (; allow > 0; --allow, m &= m - 1) kept |= m & (~m + 1);
  return kept;
}

#if defined(GRADSPARSE_AVX2_SCAN)
// For every byte value, the positions of its set bits, packed to the front.
struct BitPositions {
  alignas(32) int32_t of[256][8] = {};
  constexpr BitPositions() {
    for (int m = 0; m < 256; ++m) {
      int w = 0;
      for (int j = 0; j < 8; ++j) {
        if (m >> j & 1) of[m][w++] = j;
      }
    }
  }
};
inline constexpr BitPositions kBitPositions{};

// write_bits for dense masks, 8 bits at a time through kBitPositions: stores 8 positions per byte
// and advances by the byte's count, so it may write up to 7 entries past the last position:
// only where out + 64 <= the caller's end.
// With kPairs, the pairs the same way: the byte's indices (its bit positions + base + q) and its
// values (the block's 8 values permuted by the same bit positions), 8 of each per store.
template <bool kPairs = false>
__attribute__((target("avx2"))) inline int64_t* write_bits_dense(int64_t* out, int64_t base, uint64_t m,
                                                                 const float* xb = nullptr, Pairs* pairs = nullptr) {
  for (int q = 0; q < 64; q += 8) {
    const uint32_t byte = static_cast<uint32_t>(m >> q) & 0xffu;
    const __m256i at = _mm256_load_si256(reinterpret_cast<const __m256i*>(kBitPositions.of[byte]));
    const __m256i base_v = _mm256_set1_epi64x(base + q);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(at)), base_v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4),
                        _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(at, 1)), base_v));
    const int count = __builtin_popcount(byte);
    out += count;
    if constexpr (kPairs) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs->idx),
                          _mm256_add_epi32(at, _mm256_set1_epi32(static_cast<int32_t>(base + q))));
      _mm256_storeu_ps(pairs->val, _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + q), at));
      pairs->idx += count;
      pairs->val += count;
    }
  }
  return out;
}

// write_top's full 64-element blocks of fp32 with AVX2. Returns the end of the blocks done.
template <bool kPairs = false>
__attribute__((target("avx2"))) inline int64_t write_f32_avx2(const float* x, int64_t b, int64_t end, uint32_t kth,
                                                              int64_t& allow, int64_t base, int64_t*& out,
                                                              const int64_t* out_end, Pairs* pairs = nullptr,
                                                              const BitSink* sink = nullptr) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i kth_v = _mm256_set1_epi32(static_cast<int32_t>(kth));
  for (; b + 64 <= end; b += 64) {
    prefetch_ahead(x + b, 64 * sizeof(float));
    uint64_t gt = 0;
    __m256i any_eq = _mm256_setzero_si256();
    for (int j = 0; j < 64; j += 8) {
      const __m256i a =
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b + j)), abs_mask);
      any_eq = _mm256_or_si256(any_eq, _mm256_cmpeq_epi32(a, kth_v));
      gt |= static_cast<uint64_t>(static_cast<uint32_t>(
                _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, kth_v)))))
            << j;
    }
    if (allow > 0 && !_mm256_testz_si256(any_eq, any_eq)) {
      uint64_t eq = 0;
      for (int j = 0; j < 64; ++j) {
        uint32_t key;
        std::memcpy(&key, x + b + j, sizeof(key));
        eq |= static_cast<uint64_t>((key & 0x7fffffffu) == kth) << j;
      }
      gt |= lowest_bits(eq, allow);
    }
    if (sink) sink->block(base + b, gt);
    out = __builtin_popcountll(gt) >= kDenseBits && out + 64 <= out_end
              ? write_bits_dense<kPairs>(out, base + b, gt, x + b, pairs)
              : write_bits<kPairs>(out, base + b, gt, x + b, pairs);
  }
  return b;
}
#endif

// Pass 2 by scanning x: writes into [out, out_end), ascending, base + the position of every key > kth
// and of the first `allow` keys == kth over [begin, end) (x holds no NaN). Returns the advanced
// output pointer. With kPairs (fp32 only), also every such position's pair into `pairs`.
template <typename scalar_t, bool kPairs = false>
int64_t* write_top(const scalar_t* x, int64_t begin, int64_t end, typename Key<scalar_t>::bits_t kth, int64_t allow,
                   int64_t base, int64_t* out, const int64_t* out_end, Pairs* pairs = nullptr,
                   const BitSink* sink = nullptr) {
  using K = Key<scalar_t>;
  static_assert(!kPairs || std::is_same_v<scalar_t, float>, "pairs are written from fp32 only");
  int64_t b = begin;
#if defined(GRADSPARSE_AVX2_SCAN)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx2()) b = write_f32_avx2<kPairs>(x, b, end, kth, allow, base, out, out_end, pairs, sink);
  }
#endif
  scan(x, b, end, kth, K::kInf, [&](int64_t i, typename K::bits_t key) {
    if (key > kth || allow-- > 0) {
      if (sink) sink->bit(base + i);
      *out++ = base + i;
      if constexpr (kPairs) {
        *pairs->idx++ = static_cast<int32_t>(base + i);
        *pairs->val++ = x[i];
      }
    }
  });
  return out;
}

// A chunk's pass-1 results. Kept positions are relative to the chunk (below 2^22) with the class
// in the top bits: none = key >= hi, kAtLo = key == lo, kInBracket = key in (lo, hi).
template <typename bits_t>
struct alignas(64) ChunkCounts {  // own cache line: neighbouring chunks are filled by different workers
  static constexpr uint32_t kAtLo = 1u << 30, kInBracket = 1u << 31, kPosition = kAtLo - 1;
  int64_t above = 0, at_lo = 0, bracket = 0;  // counts of keys >= hi, == lo, in (lo, hi)
  std::vector<bits_t> keys;                   // the bracket's keys in position order, up to key_limit
  int64_t key_limit = 0;
  uint32_t* pos = nullptr;  // kept positions (when keep_positions), up to pos_limit; else null
  int64_t pos_size = 0, pos_capacity = 0, pos_limit = 0;
  // with keep_values (fp32, pairs written): each kept position's value bits, at the same place as it,
  // so pass 2 writes the pair's value without reading x again
  uint32_t* val = nullptr;
  bool keep_values = false;
  bool nan = false;
  // after the k-th key is known: keys larger than it, equal ties allowed, output offset
  int64_t larger = 0, equal = 0, allow = 0, offset = 0;

  ChunkCounts() = default;
  ChunkCounts(const ChunkCounts&) = delete;
  ChunkCounts& operator=(const ChunkCounts&) = delete;
  ~ChunkCounts() { drop_positions(); }
  void drop_positions() {
    std::free(pos);
    std::free(val);
    pos = val = nullptr;
    pos_size = pos_capacity = pos_limit = 0;
  }
  // Room for `more` positions (and values), or false (positions dropped: pass 2 scans this chunk again).
  bool reserve(int64_t more) {
    if (pos_size + more <= pos_capacity) return true;
    const int64_t want = std::min(pos_limit, std::max(pos_size + more, 2 * pos_capacity));
    const size_t bytes = static_cast<size_t>(want) * sizeof(uint32_t);
    void* p = want >= pos_size + more ? std::realloc(pos, bytes) : nullptr;
    if (p) pos = static_cast<uint32_t*>(p);
    void* v = p && keep_values ? std::realloc(val, bytes) : nullptr;
    if (v) val = static_cast<uint32_t*>(v);
    if (!p || (keep_values && !v)) {
      drop_positions();
      return false;
    }
    pos_capacity = want;
    return true;
  }
};

#if defined(GRADSPARSE_AVX2_SCAN)
// count()'s small-k pass (keep_positions) over full 64-element blocks of fp32 with AVX2: a block's
// keys >= lo (NaN included) as a 64-bit mask, in as few instructions as scan_f32_avx2's (most blocks
// have none); in a block with some, each is classified without a branch as the scalar callback does
// (counted >= hi, == lo or in between; its position, tagged with the class, and a bracket key
// stored), with room for 64 positions and keys made once per block instead of once per hit. It
// stops before a block where that room cannot be made (the caller's scalar scan then goes on with
// its own limits). Returns the end of the blocks done. At 1 % about one element in 80 is a hit:
// the room checked per hit cost ~3 ms of pass 1 over ResNet-50's buckets (docs/benchmarks.md).
__attribute__((target("avx2"))) inline int64_t count_positions_f32_avx2(
    const float* x, int64_t first, int64_t end, uint32_t lo, uint32_t hi, int64_t& above, int64_t& at_lo,
    int64_t& bracket, bool& nan, std::vector<uint32_t>& keys, int64_t& kept, int64_t& key_limit,
    ChunkCounts<uint32_t>& cc) {
  using Counts = ChunkCounts<uint32_t>;
  constexpr uint32_t kInf = 0x7f800000u;
  const __m256i lo_m1 = _mm256_set1_epi32(static_cast<int32_t>(lo - 1));  // lo == 0: -1, below every key
  int64_t b = first, n_above = 0, n_at_lo = 0, n_inside = 0;
  uint32_t any_nan = 0;
  const bool keep_values = cc.keep_values;
  for (; b + 64 <= end; b += 64) {
    prefetch_ahead(x + b, 64 * sizeof(float));
    const uint64_t hits = mask_at_least_f32_avx2(x + b, lo_m1);
    if (!hits) continue;
    bool out_of_memory = false;
    if (!room_for_block(keys, kept, key_limit, out_of_memory)) {
      if (out_of_memory) key_limit = 0;
      break;
    }
    if (!cc.pos || !cc.reserve(64)) break;  // b - first + 64 <= pos_limit: only out of memory fails
    const uint32_t base = static_cast<uint32_t>(b - first);
    uint32_t* pos = cc.pos + cc.pos_size;
    uint32_t* key = keys.data() + kept;
    uint32_t* value = keep_values ? cc.val + cc.pos_size : nullptr;  // the hits' value bits beside them
    for (uint64_t m = hits; m; m &= m - 1) {
      const int j = __builtin_ctzll(m);
      uint32_t k;
      std::memcpy(&k, x + b + j, sizeof(k));
      if (keep_values) *value++ = k;
      k &= 0x7fffffffu;
      const uint32_t ge_hi = k >= hi, is_lo = k == lo, inside = !(ge_hi | is_lo);
      any_nan |= k > kInf;
      n_above += ge_hi;
      n_at_lo += is_lo;
      *key = k;
      key += inside;
      *pos++ = (base + j) | (is_lo * Counts::kAtLo) | (inside * Counts::kInBracket);
    }
    cc.pos_size = pos - cc.pos;
    const int64_t got = key - (keys.data() + kept);
    kept += got;
    n_inside += got;
  }
  above += n_above;
  at_lo += n_at_lo;
  bracket += n_inside;
  nan |= any_nan != 0;
  return b;
}
#endif

enum class Status { kOk, kNaN };

template <typename scalar_t>
struct TopK {
  using K = Key<scalar_t>;
  using bits_t = typename K::bits_t;
  using Counts = ChunkCounts<bits_t>;
  // The sample's positions drawn and prefetched per block (below): 256 rather than 64 took the
  // sample over ResNet-50's 54 tensors from 4.3-4.7 to 3.3-3.6 ms (512: 3.2-3.9; topk_phases.cpp,
  // three runs each, 2026-12-02).
  static constexpr int64_t kPrefetch = 256;
  // The sample's ranks are found through a histogram of its keys' top 12 bits (sign bit always 0,
  // exponent, first mantissa bits), built while sampling, and nth_element inside one bucket.
  static constexpr int kSampleShift = 8 * sizeof(bits_t) - 13;
  static constexpr int64_t kSampleDigits = int64_t(1) << 12;
  // Pass 1 keeps positions when at most n / kKeepPositionsBelow hits are expected (else pass 2
  // scans x again: cheaper than writing and reading that many positions, and no scratch).
  static constexpr int64_t kKeepPositionsBelow = 32;
  // The bracket reaches this many standard deviations of a sampled count (plus 4 sample
  // positions) each side of the k-th key's expected place in the sample.
  static constexpr double kMarginDeviations = 3.0;

  const scalar_t* x;
  int64_t n, k;
  int threads;
  Chunking ch;
  bits_t lo = 0, hi = K::kInf + 1;  // unsampled: everything in the bracket, all of it kept
  int64_t expect_hits, expect_keys, key_limit;
  bool keep_positions = true;
  int64_t base = 0;  // added to every position written (a segment's offset in a larger tensor)
  Pairs pairs;       // fp32 only: where pass 2 also writes each position's pair (none by default)
  uint64_t* bits = nullptr;  // where pass 2 also marks each position it writes (BitSink; none by default)
  bits_t selected_kth = 0;  // after run: the k-th largest key, the smallest selected
  std::vector<std::unique_ptr<Counts>> chunks;

  TopK(const scalar_t* x_, int64_t n_, int64_t k_, int threads_)
      : x(x_), n(n_), k(k_), threads(usable_threads(threads_, n_)), ch(n_, threads), expect_hits(n_),
        expect_keys(n_), key_limit(n_) {}

  // ---- 1. the bracket from a sample

  // lo and hi from a sample of about sample_ratio * n positions, one drawn in each stride of x
  // (sample_position, csrc/select_params.h). Returns the number of elements expected in [lo, hi).
  int64_t bracket_from_sample(double sample_ratio, int64_t seed) {
    const int64_t wanted = static_cast<int64_t>(std::ceil(static_cast<double>(n) * sample_ratio));
    const int64_t sample_size = std::min(n, std::max<int64_t>(kMinSample, wanted));
    const int64_t stride = std::max<int64_t>(1, n / sample_size);
    const uint32_t seed32 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
    const int64_t s = sample_strata(n, stride);
    const double r = static_cast<double>(k) * static_cast<double>(s) / static_cast<double>(n);
    const double margin = kMarginDeviations * std::sqrt(r * std::max(0.0, 1.0 - r / static_cast<double>(s))) + 4.0;
    const int64_t r_hi = static_cast<int64_t>(std::floor(r - margin));
    const int64_t r_lo = static_cast<int64_t>(std::ceil(r + margin));
    std::vector<bits_t> keys(s);
    std::vector<int64_t> hist(static_cast<size_t>(threads) * kSampleDigits, 0);
    const int64_t pieces = std::min<int64_t>(threads, std::max<int64_t>(1, s / 16384));
    for_chunks(pieces, static_cast<int>(pieces), [&](int64_t piece, int worker) {
      int64_t* h = hist.data() + static_cast<int64_t>(worker) * kSampleDigits;
      // One cache line per sampled element, too far apart for the hardware prefetcher. In blocks of
      // kPrefetch strata: the block's positions are drawn first (from locals, which the histogram's
      // stores cannot alias), all prefetched, then read. A ring drawing one position kPrefetch ahead
      // per element cost 0.5-1 ms more over ResNet-50's sample (3.4-5.8 against 3.1-4.4 ms, one thread).
      const scalar_t* const xs = x;
      const int64_t size = n, step = stride;
      const int64_t j0 = s * piece / pieces, e = s * (piece + 1) / pieces;
      int64_t at[kPrefetch];
      for (int64_t b = j0; b < e; b += kPrefetch) {
        const int64_t m = std::min<int64_t>(kPrefetch, e - b);
        for (int64_t i = 0; i < m; ++i) at[i] = sample_position(b + i, step, size, seed32);
        for (int64_t i = 0; i < m; ++i) __builtin_prefetch(xs + at[i]);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t j = b + i;
          const bits_t key = std::min<bits_t>(K::of(xs[at[i]]), K::kInf);  // NaN: pass 1 refuses it
          keys[j] = key;
          ++h[key >> kSampleShift];
        }
      }
    });
    fold_histograms(hist, threads, kSampleDigits);
    const auto rank = [&](int64_t rr) -> bits_t {
      const auto [bucket, larger] = find_bucket(hist.data(), kSampleDigits, rr);
      std::vector<bits_t> sub;
      sub.reserve(hist[bucket]);
      for (const bits_t key : keys) {
        if (static_cast<int64_t>(key >> kSampleShift) == bucket) sub.push_back(key);
      }
      const int64_t at = rr - larger - 1;
      std::nth_element(sub.begin(), sub.begin() + at, sub.end(), std::greater<>());
      return sub[at];
    };
    lo = r_lo <= s ? rank(r_lo) : 0;
    hi = r_hi >= 1 ? rank(r_hi) : K::kInf + 1;
    hi = std::max<bits_t>(hi, lo + 1);
    return static_cast<int64_t>(std::ceil((r_lo - r_hi) * static_cast<double>(n) / static_cast<double>(s)));
  }

  // ---- 2. pass 1

  // Counts every chunk against lo and hi, keeping the bracket's keys (expect_keys expected, up to
  // key_limit in all) and, with keep_positions, every position of a key >= lo (expect_hits
  // expected). Returns false on NaN.
  bool count() {
    chunks.resize(ch.count);
    for (auto& c : chunks) c = std::make_unique<Counts>();
    const double share_of = 1.0 / static_cast<double>(std::max<int64_t>(1, n));
    for_chunks(ch.count, threads, [&](int64_t ci, int) {
      Counts& cc = *chunks[ci];
      const int64_t first = ch.lo(ci), last = ch.hi(ci);
      const double share = static_cast<double>(last - first) * share_of;
      cc.key_limit = static_cast<int64_t>(static_cast<double>(key_limit) * share) + 64;
      int64_t above = 0, at_lo = 0, bracket = 0;
      // No exception may leave a worker: out of memory = too many keys (key_limit 0: kth_key falls back
      // to radix).
      std::vector<bits_t>& keys = cc.keys;
      const int64_t expected = std::min(cc.key_limit,
                                        static_cast<int64_t>(static_cast<double>(expect_keys) * share * 1.2) + 64);
      if (!keep_positions) {  // only the bracket's keys reach `in`: each appended
        try {
          keys.reserve(expected);
        } catch (const std::bad_alloc&) {
          cc.key_limit = 0;
        }
        int64_t from = first;
        bool nan = false;
#if defined(GRADSPARSE_AVX2_SCAN)
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (has_avx2() && cc.key_limit > 0) {  // most blocks, keys packed without a call each
            int64_t kept = 0;
            bool out_of_memory = false;
            from = count_keep_f32_avx2(x, first, last, lo, hi, above, at_lo, bracket, nan, keys, kept,
                                       cc.key_limit, out_of_memory);
            keys.resize(static_cast<size_t>(std::min(kept, cc.key_limit)));
            if (out_of_memory) cc.key_limit = 0;
          }
        }
#endif
        cc.nan = nan | count_bracket(x, from, last, lo, hi, above, at_lo, [&](int64_t, bits_t key) {
          ++bracket;
          if (static_cast<int64_t>(keys.size()) < cc.key_limit) {
            try {
              keys.push_back(key);
            } catch (const std::bad_alloc&) {
              cc.key_limit = 0;
            }
          }
        });
      } else {
        // Every key >= lo reaches the scan's callback, classified without a branch; the bracket's keys
        // go into room made ahead, each stored at the next free place, which advances only for a key
        // kept (small k: 0.2-0.8 ms less over ResNet-50's buckets at 1 %, docs/benchmarks.md).
        int64_t kept = 0;
        const auto room = [&]() -> bool {  // at least one free place, or false (keeping stopped)
          if (kept < static_cast<int64_t>(keys.size())) return true;
          if (kept >= cc.key_limit) return false;
          try {
            keys.resize(std::min<int64_t>(cc.key_limit, std::max<int64_t>(64, 2 * kept)));
          } catch (const std::bad_alloc&) {
            cc.key_limit = 0;
            return false;
          }
          return true;
        };
        try {
          keys.resize(expected);
        } catch (const std::bad_alloc&) {
          cc.key_limit = 0;
        }
        cc.pos_limit = last - first;
        if constexpr (std::is_same_v<scalar_t, float>) cc.keep_values = static_cast<bool>(pairs);
        cc.reserve(static_cast<int64_t>(static_cast<double>(expect_hits) * share * 1.1) + 64);
        int64_t from = first;
        bool nan = false;
#if defined(GRADSPARSE_AVX2_SCAN)
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (has_avx2() && cc.key_limit > 0) {  // most blocks, positions and keys packed without a call each
            from = count_positions_f32_avx2(x, first, last, lo, hi, above, at_lo, bracket, nan, keys, kept,
                                            cc.key_limit, cc);
          }
        }
#endif
        cc.nan = nan | scan(x, from, last, lo, K::kInf, [&](int64_t i, bits_t key) {  // key >= lo
          const uint32_t ge_hi = key >= hi, is_lo = key == lo, in_bracket = !(ge_hi | is_lo);
          above += ge_hi;
          at_lo += is_lo;
          bracket += in_bracket;
          if (room()) {
            keys[kept] = key;
            kept += in_bracket;
          }
          const uint32_t tag = (is_lo * Counts::kAtLo) | (in_bracket * Counts::kInBracket);
          if (cc.pos && cc.reserve(1)) {
            if (cc.keep_values) std::memcpy(cc.val + cc.pos_size, x + i, sizeof(uint32_t));  // fp32 only
            cc.pos[cc.pos_size++] = static_cast<uint32_t>(i - first) | tag;
          }
        });
        keys.resize(kept);
      }
      cc.above = above;
      cc.at_lo = at_lo;
      cc.bracket = bracket;
    });
    return std::none_of(chunks.begin(), chunks.end(), [](const auto& cc) { return cc->nan; });
  }

  // ---- 3. the k-th largest key

  // From pass 1's counts when they bracket it (sets each chunk's larger/equal); else radix.
  bits_t kth_key() {
    int64_t above = 0, bracket = 0, at_lo = 0;
    bool all_keys = true;
    for (const auto& cc : chunks) {
      above += cc->above;
      bracket += cc->bracket;
      at_lo += cc->at_lo;
      all_keys &= static_cast<int64_t>(cc->keys.size()) == cc->bracket;
    }
    if (above >= k) return by_radix(hi, K::kInf, k);                       // the sample's hi was too low
    if (above + bracket + at_lo < k) return by_radix(0, lo - 1, k - above - bracket - at_lo);  // lo too high
    const int64_t need = k - above;
    if (need > bracket) {  // the k-th key is lo
      for (auto& cc : chunks) {
        cc->larger = cc->above + cc->bracket;
        cc->equal = cc->at_lo;
      }
      return lo;
    }
    if (!all_keys) return by_radix(lo + 1, hi - 1, need);  // the bracket was too large to keep
    const bits_t kth = bracket_kth(need);
    for (auto& cc : chunks) {
      int64_t larger = 0, equal = 0;
      for (const bits_t key : cc->keys) {
        larger += key > kth;
        equal += key == kth;
      }
      cc->larger = cc->above + larger;
      cc->equal = equal;
    }
    return kth;
  }

  // The need-th largest of the bracket's keys (all kept): a histogram of key - lo - 1 cut to at most
  // 2^12 buckets, then nth_element inside the bucket that holds it.
  bits_t bracket_kth(int64_t need) const {
    const bits_t span = hi - lo - 1;  // keys - lo - 1 lie in [0, span)
    const int bits = span ? static_cast<int>(8 * sizeof(bits_t)) -
                                (sizeof(bits_t) == 8 ? __builtin_clzll(span) : __builtin_clz(static_cast<uint32_t>(span)))
                          : 0;
    const int shift = std::max(0, bits - 12);
    std::vector<int64_t> hist((span >> shift) + 1, 0);
    for (const auto& cc : chunks) {
      for (const bits_t key : cc->keys) ++hist[(key - lo - 1) >> shift];
    }
    const auto [bucket, larger] = find_bucket(hist.data(), static_cast<int64_t>(hist.size()), need);
    std::vector<bits_t> sub;
    sub.reserve(hist[bucket]);
    for (const auto& cc : chunks) {
      for (const bits_t key : cc->keys) {
        if (static_cast<int64_t>((key - lo - 1) >> shift) == bucket) sub.push_back(key);
      }
    }
    const int64_t r = need - larger - 1;
    std::nth_element(sub.begin(), sub.begin() + r, sub.end(), std::greater<>());
    return sub[r];
  }

  // The need-th largest key among those in [rlo, rhi] (1 <= need <= their count), 16 bits of it
  // per pass over x; then every chunk's larger/equal counted by one more pass. Kept positions
  // are dropped (pass 2 scans x).
  bits_t by_radix(bits_t rlo, bits_t rhi, int64_t need) {
    std::vector<int64_t> hist;
    while (rlo < rhi) {
      const bits_t diff = rlo ^ rhi;
      const int width = static_cast<int>(8 * sizeof(bits_t)) -
                        (sizeof(bits_t) == 8 ? __builtin_clzll(diff) : __builtin_clz(static_cast<uint32_t>(diff)));
      const int w = std::min(16, width), shift = width - w;
      const int64_t digits = int64_t(1) << w;
      hist.assign(static_cast<size_t>(threads) * digits, 0);
      for_chunks(ch.count, threads, [&](int64_t ci, int tid) {
        int64_t* h = hist.data() + static_cast<int64_t>(tid) * digits;
        scan(x, ch.lo(ci), ch.hi(ci), rlo, rhi, [&](int64_t, bits_t key) { ++h[(key >> shift) & (digits - 1)]; });
      });
      fold_histograms(hist, threads, digits);
      const auto [digit, larger] = find_bucket(hist.data(), digits, need);
      need -= larger;
      const bits_t prefix = width >= static_cast<int>(8 * sizeof(bits_t)) ? 0 : (rlo >> width) << width;
      const bits_t first = prefix | (static_cast<bits_t>(digit) << shift);
      rlo = std::max(rlo, first);
      rhi = std::min<bits_t>(rhi, first | ((bits_t(1) << shift) - 1));
    }
    const bits_t kth = rlo;
    for_chunks(ch.count, threads, [&](int64_t ci, int) {
      Counts& cc = *chunks[ci];
      cc.drop_positions();
      cc.larger = cc.equal = 0;
      count_bracket(x, ch.lo(ci), ch.hi(ci), kth, kth + 1, cc.larger, cc.equal, [](int64_t, bits_t) {});
    });
    return kth;
  }

  // ---- 4. pass 2

  // Ties allowed per chunk (lower positions first) and output offsets; then every chunk's positions.
  void write(bits_t kth, int64_t* out) {
    int64_t larger = 0;
    for (const auto& cc : chunks) larger += cc->larger;
    int64_t ties = k - larger, offset = 0;
    for (auto& cc : chunks) {
      cc->allow = std::min(cc->equal, ties);
      ties -= cc->allow;
      cc->offset = offset;
      offset += cc->larger + cc->allow;
    }
    for_chunks(ch.count, threads, [&](int64_t ci, int) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (pairs) return write_chunk<true>(kth, out, ci);
      }
      write_chunk<false>(kth, out, ci);
    });
  }

  // Chunk ci's share of pass 2 (and, with kPairs, of `pairs`, at the same offsets as `out`).
  template <bool kPairs>
  void write_chunk(bits_t kth, int64_t* out, int64_t ci) {
    Counts& cc = *chunks[ci];
    const int64_t first = base + ch.lo(ci);
    int64_t* o = out + cc.offset;
    Pairs at;  // this chunk's place in the pairs
    if constexpr (kPairs) at = Pairs{pairs.idx + cc.offset, pairs.val + cc.offset};
    int64_t allow = cc.allow;
    const BitSink sink{bits, first, first + (ch.hi(ci) - ch.lo(ci))};
    if (cc.pos) {  // the chunk's kept positions, classified against lo and hi
      // Without a branch per position (at 1 % about 40 % of them are in the bracket, and a branch on
      // the class mispredicted): every position is written at o, which advances only for one kept;
      // the write stays inside this chunk's output (end), which the last one kept fills. Every
      // bracket key is larger than lo; if the k-th key is lo, they are kept without looking (they
      // may not all have been kept), else they all were kept (kth_key), in position order.
      const bits_t* key = cc.keys.data();
      const int64_t n_keys = static_cast<int64_t>(cc.keys.size());
      const bool kth_is_lo = kth == lo;
      int64_t* const end = out + cc.offset + cc.larger + cc.allow;
      int64_t next_key = 0;
      for (int64_t j = 0; j < cc.pos_size; ++j) {
        const uint32_t p = cc.pos[j];
        const bool in_bracket = (p & Counts::kInBracket) != 0, at_lo = (p & Counts::kAtLo) != 0;
        const bits_t kk = kth_is_lo ? kth + 1 : (next_key < n_keys ? key[next_key] : bits_t(0));
        next_key += in_bracket;
        const bool tie = (in_bracket & (kk == kth)) | (at_lo & kth_is_lo);
        const bool take = tie & (allow > 0);
        allow -= take;
        const bool at_or_above_hi = !(in_bracket | at_lo);
        const bool keep = at_or_above_hi | (in_bracket & (kk > kth)) | take;
        if (o < end) {
          const int64_t position = p & Counts::kPosition;
          *o = first + position;
          if constexpr (kPairs) {  // the value pass 1 kept beside the position (keep_values)
            const int64_t slot = o - (out + cc.offset);
            at.idx[slot] = static_cast<int32_t>(first + position);
            std::memcpy(at.val + slot, cc.val + j, sizeof(float));
          }
        }
        if (bits && keep) sink.bit(first + (p & Counts::kPosition));
        o += keep;
      }
      cc.drop_positions();
      return;
    }
    write_top<scalar_t, kPairs>(x, ch.lo(ci), ch.hi(ci), kth, allow, base, o, out + cc.offset + cc.larger + cc.allow,
                                &at, bits ? &sink : nullptr);
  }

  // ---- all of it

  // lo, hi and what pass 1 expects: from a sample, or (not sampled) everything in the bracket.
  void plan(bool sampled, double sample_ratio, int64_t seed) {
    if (!sampled) return;
    expect_keys = bracket_from_sample(sample_ratio, seed);
    expect_hits = k + expect_keys;
    key_limit = std::min(n, std::max<int64_t>(1 << 16, 16 * expect_keys));
    // lo = 0: the sample's k-th magnitude is zero (a tensor mostly of exact zeros, e.g. an embedding's
    // gradient, whose rows outside the batch are zero). Every position is >= lo, so keeping them
    // would store all of x; pass 1 then only counts (the zeros are "at lo") and pass 2 scans x.
    keep_positions = expect_hits <= n / kKeepPositionsBelow && lo > 0;
  }

  // Exact top-k positions into alloc(k) (see the top of this file).
  template <typename Alloc>
  Status run(bool sampled, double sample_ratio, int64_t seed, Alloc&& alloc) {
    plan(sampled, sample_ratio, seed);
    if (!count()) return Status::kNaN;
    const bits_t kth = kth_key();
    selected_kth = kth;
    write(kth, alloc(k));
    return Status::kOk;
  }
};

}  // namespace select_core
}  // namespace gradsparse
