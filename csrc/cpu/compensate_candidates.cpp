// CPU dgc_compensate_candidates and residual_compensate_candidates: the compensation passes of
// dgc.cpp (the same loops, compensate_core.h; the same checks, values and maxima) collecting, in
// the same pass, each segment's selection candidates: the positions whose result has a magnitude at
// or above the segment's floor (docs/kernels.md). Chunks (candidate_chunk) run in parallel, each
// over the segments it overlaps, into its own position buffer; the buffers are joined in chunk
// order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <new>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "compensate_core.h"
#include "select_core.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace gradsparse {
namespace {

using namespace compensate;

// Blocks of 64 elements: the block's results are computed and stored as compensate_core.h's loops
// do, and in the same vectorized loop its hits are noted (fp32 and bf16 gradients with AVX2: a
// 64-bit mask from the same registers; other dtypes: an "any key >= lo" flag, and a block with a
// hit is looked at again, its 64 results still in L1); only a block with a hit records positions.
// Keys are the int32 bit patterns of |v| (compensate::key_of); NaN keys lie above infinity's and so
// count as candidates (the selection then sees them and refuses the segment, as
// segmented_topk_select would).

// Growing int64 position and float value buffers whose append is a capacity test and a pointer bump
// (a std::vector's resize per block cost about 10 ns a block with a hit: a call, a fill and a size
// update). values[i] is the compensated value at data[i] (the selection then need not read it again).
struct Positions {
  int64_t* data = nullptr;
  float* values = nullptr;
  int64_t size = 0, capacity = 0;
  Positions() = default;
  Positions(const Positions&) = delete;
  Positions& operator=(const Positions&) = delete;
  ~Positions() {
    std::free(data);
    std::free(values);
  }
  // Room for `more` entries at data + size and values + size (size grows by more); returns their index.
  int64_t extend(int64_t more) {
    if (size + more > capacity) {
      const int64_t want = std::max<int64_t>({256, 2 * capacity, size + more});
      void* p = std::realloc(data, static_cast<size_t>(want) * sizeof(int64_t));
      if (!p) throw std::bad_alloc();
      data = static_cast<int64_t*>(p);
      void* q = std::realloc(values, static_cast<size_t>(want) * sizeof(float));
      if (!q) throw std::bad_alloc();
      values = static_cast<float*>(q);
      capacity = want;
    }
    const int64_t at = size;
    size += more;
    return at;
  }
};

// A chunk's candidates: for each segment the chunk overlaps (in order), the true count and the
// positions kept (absolute in the piece, at most the segment's cap per chunk).
struct ChunkCandidates {
  struct Part {
    int64_t segment, count, stored;
  };
  std::vector<Part> parts;
  Positions positions;
};

// Appends b + j and out[b + j] for every set bit j of mask (a block's hits, out the results just
// written) to part and positions: counts all, keeps at most cap in all: one extend per block, the
// bits written through local pointers.
inline void record_mask(uint64_t mask, const float* out, int64_t b, int64_t cap, ChunkCandidates::Part& part,
                        Positions& positions) {
  const int64_t hits = __builtin_popcountll(mask);
  part.count += hits;
  const int64_t take = std::min(hits, cap - part.stored);
  if (take <= 0) return;
  const int64_t at = positions.extend(take);
  int64_t* o = positions.data + at;
  float* ov = positions.values + at;
  for (int64_t t = 0; t < take; ++t, mask &= mask - 1) {
    const int64_t i = b + __builtin_ctzll(mask);
    o[t] = i;
    ov[t] = out[i];
  }
  part.stored += take;
}

// The hits of block [b, e) (results in out[b..e), keys >= lo), kept as record_mask keeps them.
inline void record_block(const float* out, int64_t b, int64_t e, int32_t lo, int64_t cap,
                         ChunkCandidates::Part& part, Positions& positions) {
  uint64_t mask = 0;
  for (int64_t i = b; i < e; ++i) mask |= static_cast<uint64_t>(key_of(out[i]) >= lo) << (i - b);
  record_mask(mask, out, b, cap, part, positions);
}

#if defined(GRADSPARSE_AVX2_COMPENSATE)
// record_block for a full block with AVX2: the 64-bit mask from 8 compares.
__attribute__((target("avx2"))) inline void record_block_avx2(const float* out, int64_t b, int32_t lo, int64_t cap,
                                                              ChunkCandidates::Part& part,
                                                              Positions& positions) {
  const __m256i lo_m1 = _mm256_set1_epi32(lo - 1);  // key >= lo as key > lo - 1 (lo - 1 >= -1)
  record_mask(select_core::mask_at_least_f32_avx2(out + b, lo_m1), out, b, cap, part, positions);
}
#endif

template <bool kAvx2>
__attribute__((always_inline)) inline void record(const float* out, int64_t b, int64_t e, int32_t lo, int64_t cap,
                                                  ChunkCandidates::Part& part, Positions& positions) {
#if defined(GRADSPARSE_AVX2_COMPENSATE)
  if constexpr (kAvx2) {
    if (e - b == 64) return record_block_avx2(out, b, lo, cap, part, positions);
  }
#endif
  record_block(out, b, e, lo, cap, part, positions);
}

// compensate_loop with kMaxima over [begin, end) of one segment, the running maxima in and out of
// maxima[0..2], and the candidates (keys of v_out >= lo) into part and positions.
template <typename scalar_t, bool kNesterov, bool kAvx2>
__attribute__((always_inline)) inline void compensate_candidates_loop(
    const float* u, const float* v, const scalar_t* g, float* u_out, float* v_out, float m, int64_t begin,
    int64_t end, uint64_t* maxima, int32_t lo, int64_t cap, ChunkCandidates::Part& part,
    Positions& positions) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using gkey_t = decltype(key_of(acc_t()));
  gkey_t g_max = static_cast<gkey_t>(maxima[0]);
  int32_t u_max = static_cast<int32_t>(maxima[1]), v_max = static_cast<int32_t>(maxima[2]);
  for (int64_t b = begin; b < end; b += 64) {
    prefetch_ahead(u + b, 64 * sizeof(float));
    prefetch_ahead(v + b, 64 * sizeof(float));
    prefetch_ahead(g + b, 64 * sizeof(scalar_t));
    const int64_t e = std::min(end, b + 64);
    int32_t any = 0;
    for (int64_t i = b; i < e; ++i) {  // vectorized
      const acc_t gi = static_cast<acc_t>(g[i]);
      float ui, vi;
      compensate_one<acc_t, kNesterov>(u[i], v[i], gi, m, ui, vi);
      u_out[i] = ui;
      v_out[i] = vi;
      g_max = std::max(g_max, key_of(gi));
      u_max = std::max(u_max, key_of(ui));
      const int32_t vk = key_of(vi);
      v_max = std::max(v_max, vk);
      any |= static_cast<int32_t>(vk >= lo);
    }
    if (any) record<kAvx2>(v_out, b, e, lo, cap, part, positions);
  }
  maxima[0] = static_cast<uint64_t>(g_max);
  maxima[1] = static_cast<uint32_t>(u_max);
  maxima[2] = static_cast<uint32_t>(v_max);
}

// residual_loop over [begin, end) of one segment, likewise (candidates: keys of r_out >= lo).
template <typename scalar_t, bool kAvx2>
__attribute__((always_inline)) inline void residual_candidates_loop(const float* r, const scalar_t* g, float* r_out,
                                                                    int64_t begin, int64_t end, uint64_t* maxima,
                                                                    int32_t lo, int64_t cap,
                                                                    ChunkCandidates::Part& part,
                                                                    Positions& positions) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using gkey_t = decltype(key_of(acc_t()));
  gkey_t g_max = static_cast<gkey_t>(maxima[0]);
  int32_t r_max = static_cast<int32_t>(maxima[1]);
  for (int64_t b = begin; b < end; b += 64) {
    prefetch_ahead(r + b, 64 * sizeof(float));
    prefetch_ahead(g + b, 64 * sizeof(scalar_t));
    const int64_t e = std::min(end, b + 64);
    int32_t any = 0;
    for (int64_t i = b; i < e; ++i) {  // vectorized
      const acc_t gi = static_cast<acc_t>(g[i]);
      const float ri = static_cast<float>(static_cast<acc_t>(r[i]) + gi);
      r_out[i] = ri;
      g_max = std::max(g_max, key_of(gi));
      const int32_t rk = key_of(ri);
      r_max = std::max(r_max, rk);
      any |= static_cast<int32_t>(rk >= lo);
    }
    if (any) record<kAvx2>(r_out, b, e, lo, cap, part, positions);
  }
  maxima[0] = static_cast<uint64_t>(g_max);
  maxima[1] = static_cast<uint32_t>(r_max);
}

#if defined(GRADSPARSE_AVX2_COMPENSATE)
template <typename scalar_t, bool kNesterov>
__attribute__((target("avx2"))) void compensate_candidates_avx2(const float* u, const float* v, const scalar_t* g,
                                                               float* u_out, float* v_out, float m, int64_t begin,
                                                               int64_t end, uint64_t* maxima, int32_t lo,
                                                               int64_t cap, ChunkCandidates::Part& part,
                                                               Positions& positions) {
  compensate_candidates_loop<scalar_t, kNesterov, true>(u, v, g, u_out, v_out, m, begin, end, maxima, lo, cap, part,
                                                        positions);
}
template <typename scalar_t>
__attribute__((target("avx2"))) void residual_candidates_avx2(const float* r, const scalar_t* g, float* r_out,
                                                             int64_t begin, int64_t end, uint64_t* maxima,
                                                             int32_t lo, int64_t cap, ChunkCandidates::Part& part,
                                                             Positions& positions) {
  residual_candidates_loop<scalar_t, true>(r, g, r_out, begin, end, maxima, lo, cap, part, positions);
}

// The fp32- and bf16-gradient passes with AVX2 intrinsics: the generic block loop above, compiled, checks
// its pointers for aliasing and folds its maxima once per 64-element block; here the maxima stay in
// vector registers over the whole range, and the block's hit mask comes from the same registers
// (one compare and one movemask per 8 elements). Products and sums round as the scalar code rounds
// them (a multiply, then an add: no FMA). The partial block at the end goes to the generic loop.
inline int32_t horizontal_max(__m256i a) __attribute__((target("avx2")));
inline int32_t horizontal_max(__m256i a) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
  return *std::max_element(lanes, lanes + 8);
}

// 8 gradient values as floats: fp32 loaded, bf16 widened (its bits are a float's top half: exact).
__attribute__((target("avx2"))) inline __m256 load8(const float* g) { return _mm256_loadu_ps(g); }
__attribute__((target("avx2"))) inline __m256 load8(const c10::BFloat16* g) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename scalar_t, bool kNesterov>
__attribute__((target("avx2"))) void compensate_candidates_f32_avx2(const float* u, const float* v, const scalar_t* g,
                                                                   float* u_out, float* v_out, float m, int64_t begin,
                                                                   int64_t end, uint64_t* maxima, int32_t lo,
                                                                   int64_t cap, ChunkCandidates::Part& part,
                                                                   Positions& positions) {
  const __m256 m_v = _mm256_set1_ps(m);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), lo_m1 = _mm256_set1_epi32(lo - 1);
  __m256i g_max = _mm256_set1_epi32(static_cast<int32_t>(maxima[0]));
  __m256i u_max = _mm256_set1_epi32(static_cast<int32_t>(maxima[1]));
  __m256i v_max = _mm256_set1_epi32(static_cast<int32_t>(maxima[2]));
  int64_t b = begin;
  for (; b + 64 <= end; b += 64) {
    prefetch_ahead(u + b, 64 * sizeof(float));
    prefetch_ahead(v + b, 64 * sizeof(float));
    prefetch_ahead(g + b, 64 * sizeof(scalar_t));
    uint64_t mask = 0;  // the block's hits
    for (int j = 0; j < 64; j += 8) {
      const __m256 gi = load8(g + b + j), u0 = _mm256_loadu_ps(u + b + j), v0 = _mm256_loadu_ps(v + b + j);
      __m256 ui, vi;
      if constexpr (kNesterov) {
        ui = _mm256_mul_ps(_mm256_add_ps(u0, gi), m_v);
        vi = _mm256_add_ps(_mm256_add_ps(v0, ui), gi);
      } else {
        ui = _mm256_add_ps(_mm256_mul_ps(u0, m_v), gi);
        vi = _mm256_add_ps(v0, ui);
      }
      _mm256_storeu_ps(u_out + b + j, ui);
      _mm256_storeu_ps(v_out + b + j, vi);
      const __m256i vk = _mm256_and_si256(_mm256_castps_si256(vi), abs_mask);
      g_max = _mm256_max_epi32(g_max, _mm256_and_si256(_mm256_castps_si256(gi), abs_mask));
      u_max = _mm256_max_epi32(u_max, _mm256_and_si256(_mm256_castps_si256(ui), abs_mask));
      v_max = _mm256_max_epi32(v_max, vk);
      mask |= static_cast<uint64_t>(static_cast<uint32_t>(
                  _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(vk, lo_m1)))))
              << j;
    }
    if (mask) record_mask(mask, v_out, b, cap, part, positions);
  }
  maxima[0] = static_cast<uint32_t>(horizontal_max(g_max));
  maxima[1] = static_cast<uint32_t>(horizontal_max(u_max));
  maxima[2] = static_cast<uint32_t>(horizontal_max(v_max));
  compensate_candidates_loop<scalar_t, kNesterov, true>(u, v, g, u_out, v_out, m, b, end, maxima, lo, cap, part,
                                                        positions);
}

template <typename scalar_t>
__attribute__((target("avx2"))) void residual_candidates_f32_avx2(const float* r, const scalar_t* g, float* r_out,
                                                                         int64_t begin, int64_t end, uint64_t* maxima,
                                                                         int32_t lo, int64_t cap,
                                                                         ChunkCandidates::Part& part,
                                                                         Positions& positions) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), lo_m1 = _mm256_set1_epi32(lo - 1);
  __m256i g_max = _mm256_set1_epi32(static_cast<int32_t>(maxima[0]));
  __m256i r_max = _mm256_set1_epi32(static_cast<int32_t>(maxima[1]));
  int64_t b = begin;
  for (; b + 64 <= end; b += 64) {
    prefetch_ahead(r + b, 64 * sizeof(float));
    prefetch_ahead(g + b, 64 * sizeof(scalar_t));
    uint64_t mask = 0;  // the block's hits
    for (int j = 0; j < 64; j += 8) {
      const __m256 gi = load8(g + b + j);
      const __m256 ri = _mm256_add_ps(_mm256_loadu_ps(r + b + j), gi);
      _mm256_storeu_ps(r_out + b + j, ri);
      const __m256i rk = _mm256_and_si256(_mm256_castps_si256(ri), abs_mask);
      g_max = _mm256_max_epi32(g_max, _mm256_and_si256(_mm256_castps_si256(gi), abs_mask));
      r_max = _mm256_max_epi32(r_max, rk);
      mask |= static_cast<uint64_t>(static_cast<uint32_t>(
                  _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(rk, lo_m1)))))
              << j;
    }
    if (mask) record_mask(mask, r_out, b, cap, part, positions);
  }
  maxima[0] = static_cast<uint32_t>(horizontal_max(g_max));
  maxima[1] = static_cast<uint32_t>(horizontal_max(r_max));
  residual_candidates_loop<scalar_t, true>(r, g, r_out, b, end, maxima, lo, cap, part, positions);
}
#endif

// Per segment, default or AVX2 build. A segment that collects nothing (floor +inf) runs the plain
// loops (no test) and merges their maxima.
template <typename scalar_t>
void compensate_candidates_range(const float* u, const float* v, const scalar_t* g, float* u_out, float* v_out,
                                 float m, bool nesterov, int64_t begin, int64_t end, uint64_t* maxima, bool collect,
                                 int32_t lo, int64_t cap, ChunkCandidates::Part& part,
                                 Positions& positions) {
  if (!collect) {
    uint64_t keys[3];
    compensate_range<scalar_t, true>(u, v, g, u_out, v_out, m, nesterov, begin, end, keys);
    for (int t = 0; t < 3; ++t) maxima[t] = std::max(maxima[t], keys[t]);
    return;
  }
#if defined(GRADSPARSE_AVX2_COMPENSATE)
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu_has_avx2()) {
      if (nesterov) {
        return compensate_candidates_f32_avx2<scalar_t, true>(u, v, g, u_out, v_out, m, begin, end, maxima, lo, cap,
                                                              part, positions);
      }
      return compensate_candidates_f32_avx2<scalar_t, false>(u, v, g, u_out, v_out, m, begin, end, maxima, lo, cap,
                                                             part, positions);
    }
  }
  if (cpu_has_avx2()) {
    if (nesterov) {
      return compensate_candidates_avx2<scalar_t, true>(u, v, g, u_out, v_out, m, begin, end, maxima, lo, cap, part,
                                                        positions);
    }
    return compensate_candidates_avx2<scalar_t, false>(u, v, g, u_out, v_out, m, begin, end, maxima, lo, cap, part,
                                                       positions);
  }
#endif
  if (nesterov) {
    return compensate_candidates_loop<scalar_t, true, false>(u, v, g, u_out, v_out, m, begin, end, maxima, lo, cap,
                                                             part, positions);
  }
  compensate_candidates_loop<scalar_t, false, false>(u, v, g, u_out, v_out, m, begin, end, maxima, lo, cap, part,
                                                     positions);
}

template <typename scalar_t>
void residual_candidates_range(const float* r, const scalar_t* g, float* r_out, int64_t begin, int64_t end,
                               uint64_t* maxima, bool collect, int32_t lo, int64_t cap, ChunkCandidates::Part& part,
                               Positions& positions) {
  if (!collect) {
    uint64_t keys[2];
    residual_range<scalar_t>(r, g, r_out, begin, end, keys);
    for (int t = 0; t < 2; ++t) maxima[t] = std::max(maxima[t], keys[t]);
    return;
  }
#if defined(GRADSPARSE_AVX2_COMPENSATE)
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu_has_avx2()) {
      return residual_candidates_f32_avx2<scalar_t>(r, g, r_out, begin, end, maxima, lo, cap, part, positions);
    }
  }
  if (cpu_has_avx2()) {
    return residual_candidates_avx2<scalar_t>(r, g, r_out, begin, end, maxima, lo, cap, part, positions);
  }
#endif
  residual_candidates_loop<scalar_t, false>(r, g, r_out, begin, end, maxima, lo, cap, part, positions);
}

// Runs range(begin, end, keys, s, part, positions) over every (chunk x segment) piece of
// [0, n), chunks in parallel, each chunk writing K maximum keys and its candidates; returns the
// maxima's keys over the chunks, and fills positions (each segment's first cap[s] candidates, in
// order) and counts (each segment's true count). The same for any thread count: a max does not
// depend on the order, and the chunks' candidates are joined in chunk order.
// Chunks are at least kGrain elements and at most a few per thread: each chunk costs two small
// allocations and a join step, which at kGrain over 25M elements (1,560 chunks) cost about 1 ms of
// a 10 ms pass with one thread.
inline int64_t candidate_chunk(int64_t n) {
  const int threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  const int64_t per = (n + 4 * threads - 1) / (4 * threads);
  return std::max<int64_t>(kGrain, (per + 63) / 64 * 64);
}

template <int K, typename Range>
std::array<uint64_t, K> chunked_candidates(int64_t n, const CandidateSegments& seg, const Range& range,
                                           at::Tensor& positions, at::Tensor& counts, at::Tensor& values) {
  const int64_t grain = candidate_chunk(n);
  const int64_t chunks = (n + grain - 1) / grain, segments = seg.size();
  std::vector<uint64_t> partial(static_cast<size_t>(chunks) * K, 0);
  std::vector<ChunkCandidates> found(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t cb = c * grain, ce = std::min(n, (c + 1) * grain);
      // the first segment that ends after cb
      int64_t s = std::upper_bound(seg.offset.begin() + 1, seg.offset.end(), cb) - (seg.offset.begin() + 1);
      ChunkCandidates& cc = found[c];
      for (; s < segments && seg.offset[s] < ce; ++s) {
        const int64_t b = std::max(cb, seg.offset[s]), e = std::min(ce, seg.offset[s + 1]);
        if (b >= e || seg.skip[s]) continue;
        cc.parts.push_back({s, 0, 0});
        range(b, e, partial.data() + K * c, s, cc.parts.back(), cc.positions);
      }
    }
  });
  std::array<uint64_t, K> total{};
  counts = at::zeros({segments}, at::TensorOptions().dtype(at::kLong));
  int64_t* count = counts.data_ptr<int64_t>();
  std::vector<int64_t> taken(segments, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int t = 0; t < K; ++t) total[t] = std::max(total[t], partial[K * c + t]);
    for (const auto& p : found[c].parts) count[p.segment] += p.count;
  }
  int64_t kept = 0;
  for (int64_t s = 0; s < segments; ++s) kept += std::min(count[s], seg.cap[s]);
  positions = at::empty({kept}, at::TensorOptions().dtype(at::kLong));
  values = at::empty({kept}, at::TensorOptions().dtype(at::kFloat));
  int64_t* out = positions.data_ptr<int64_t>();
  float* out_values = values.data_ptr<float>();
  for (const auto& cc : found) {  // chunk after chunk, each its segments in order: segment after segment
    const int64_t* from = cc.positions.data;
    const float* from_values = cc.positions.values;
    for (const auto& p : cc.parts) {
      const int64_t take = std::min(p.stored, seg.cap[p.segment] - taken[p.segment]);
      std::transform(from, from + take, out, [base = seg.base](int64_t i) { return i + base; });
      std::copy(from_values, from_values + take, out_values);
      out += take;
      out_values += take;
      taken[p.segment] += take;
      from += p.stored;
      from_values += p.stored;
    }
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dgc_compensate_candidates_cpu(
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov, at::Tensor& u_out,
    at::Tensor& v_out, const at::Tensor& offsets, const at::Tensor& floors, const at::Tensor& caps) {
  check_dgc_into_args(u, v, g, u_out, v_out);
  const CandidateSegments seg = check_candidate_segments(g.numel(), offsets, floors, caps, "dgc_compensate_candidates");
  const at::Tensor gc = g.contiguous();
  double maxima[3] = {0, 0, 0};
  at::Tensor positions, counts, values;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dgc_compensate_candidates", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const float *up = u.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *uo = u_out.data_ptr<float>(), *vo = v_out.data_ptr<float>();
    const float m = static_cast<float>(momentum);
    const auto total = chunked_candidates<3>(
        gc.numel(), seg,
        [&](int64_t begin, int64_t end, uint64_t* keys, int64_t s, ChunkCandidates::Part& part,
            Positions& found) {
          compensate_candidates_range<scalar_t>(up, vp, gp, uo, vo, m, nesterov, begin, end, keys, seg.collect[s],
                                                static_cast<int32_t>(seg.floor_key[s]), seg.cap[s], part, found);
        },
        positions, counts, values);
    maxima[0] = magnitude_of_key<acc_t>(total[0]);
    maxima[1] = magnitude_of_key<float>(total[1]);
    maxima[2] = magnitude_of_key<float>(total[2]);
  });
  return {at::tensor({maxima[0], maxima[1], maxima[2]}, at::TensorOptions().dtype(at::kDouble)), positions, counts,
          values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_compensate_candidates_cpu(
    const at::Tensor& r, const at::Tensor& g, at::Tensor& r_out, const at::Tensor& offsets, const at::Tensor& floors,
    const at::Tensor& caps) {
  check_residual_into_args(r, g, r_out);
  const CandidateSegments seg =
      check_candidate_segments(g.numel(), offsets, floors, caps, "residual_compensate_candidates");
  const at::Tensor gc = g.contiguous();
  double maxima[2] = {0, 0};
  at::Tensor positions, counts, values;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "residual_compensate_candidates", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const float* rp = r.data_ptr<float>();
    float* ro = r_out.data_ptr<float>();
    const auto total = chunked_candidates<2>(
        gc.numel(), seg,
        [&](int64_t begin, int64_t end, uint64_t* keys, int64_t s, ChunkCandidates::Part& part,
            Positions& found) {
          residual_candidates_range<scalar_t>(rp, gp, ro, begin, end, keys, seg.collect[s],
                                              static_cast<int32_t>(seg.floor_key[s]), seg.cap[s], part, found);
        },
        positions, counts, values);
    maxima[0] = magnitude_of_key<acc_t>(total[0]);
    maxima[1] = magnitude_of_key<float>(total[1]);
  });
  return {at::tensor({maxima[0], maxima[1]}, at::TensorOptions().dtype(at::kDouble)), positions, counts, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("dgc_compensate_candidates", &dgc_compensate_candidates_cpu);
  m.impl("residual_compensate_candidates", &residual_compensate_candidates_cpu);
}

}  // namespace gradsparse
