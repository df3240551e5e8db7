// The compensation passes' loops, shared by csrc/cpu/dgc.cpp (dgc_compensate, dgc_compensate_into,
// residual_compensate_into, absmax) and csrc/cpu/compensate_candidates.cpp (the same passes
// collecting selection candidates). Plain loops over [begin, end), inlined into a default and an
// AVX2 build chosen at run time.
//
// All round exactly like the torch ops they replace (gradsparse/_reference.py::dgc_compensate_,
// residual_compensate_into): products in float, sums in the promoted type of (float, g's dtype),
// stored as float.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gradsparse {
namespace compensate {

// Magnitudes as keys: the bit pattern of |x| read as an unsigned integer (float for fp32, fp16 and
// bf16 values, double for double). Their order is the order of the magnitudes, and NaN is every
// key above infinity's, so one integer max (which vectorizes; a float max with NaN semantics
// does not) gives the largest magnitude, or says that a NaN was there.
inline int32_t key_of(float a) {  // below 2^31: a signed max is the unsigned one, and vectorizes with SSE2
  int32_t b;
  std::memcpy(&b, &a, sizeof(b));
  return b & 0x7fffffff;
}
inline int64_t key_of(double a) {
  int64_t b;
  std::memcpy(&b, &a, sizeof(b));
  return b & 0x7fffffffffffffffll;
}
template <typename mag_t>
double magnitude_of_key(uint64_t key) {  // NaN for a NaN key
  if constexpr (std::is_same_v<mag_t, double>) {
    double d;
    std::memcpy(&d, &key, sizeof(d));
    return d;
  } else {
    const uint32_t b = static_cast<uint32_t>(key);
    float f;
    std::memcpy(&f, &b, sizeof(f));
    return f;
  }
}

// x where keep is -1 (all bits set), +0.0 where it is 0: a select written as a bit mask, which gcc
// vectorizes (sign extensions and an and per 8 elements), exact for every x (NaN and infinities
// included). The masked loop costs more than the plain one even where every byte is -1: 11.1-11.2
// against 8.0-8.3 ms over 25.6M elements, one thread (dgc_zero_compensate with an all -1 mask
// against dgc_compensate_into; the cause was not found: the loop is vectorized like the plain one).
__attribute__((always_inline)) inline float kept_or_zero(float x, int8_t keep) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  b &= static_cast<uint32_t>(static_cast<int32_t>(keep));
  std::memcpy(&x, &b, sizeof(b));
  return x;
}

// One element of the DGC pass: u_out and v_out of u_i, v_i, g_i (acc_t: the promoted type of float
// and g's dtype). Shared by every loop below, so that they all round alike.
template <typename acc_t, bool kNesterov>
__attribute__((always_inline)) inline void compensate_one(float u_i, float v_i, acc_t g_i, float m, float& u_o,
                                                          float& v_o) {
  if constexpr (kNesterov) {
    u_o = static_cast<float>(static_cast<acc_t>(u_i) + g_i) * m;
    v_o = static_cast<float>(static_cast<acc_t>(v_i + u_o) + g_i);
  } else {
    u_o = static_cast<float>(static_cast<acc_t>(u_i * m) + g_i);
    v_o = v_i + u_o;
  }
}

// u_out = m*u + g; v_out = v + u_out (Nesterov: u_out = m*(u + g); v_out = v + u_out + g) over
// [begin, end), reading u, v before writing u_out, v_out element by element (so each output may be
// its input). With kMaxima, also the largest keys of g, u_out and v_out into maxima[0..2]. With
// kZero, u and v read as zero where keep[i - begin] is 0 (-1 elsewhere; dgc_zero_compensate: the
// last step's update, applied as the state is read).
// Inlined into a default and an AVX2 build (compensate_range); AVX2 does not enable FMA, so
// products and sums round as in the default build. Nesterov is a template argument: a branch in the
// loop kept gcc from vectorizing the kMaxima loop (2x slower, measured).
template <typename scalar_t, bool kMaxima, bool kNesterov, bool kZero>
__attribute__((always_inline)) inline void compensate_loop(const float* u, const float* v, const scalar_t* g,
                                                           float* u_out, float* v_out, float m, int64_t begin,
                                                           int64_t end, uint64_t* maxima, const int8_t* keep) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  decltype(key_of(acc_t())) g_max = 0;
  int32_t u_max = 0, v_max = 0;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    float ui, vi;
    if constexpr (kZero) {
      compensate_one<acc_t, kNesterov>(kept_or_zero(u[i], keep[i - begin]), kept_or_zero(v[i], keep[i - begin]), gi,
                                       m, ui, vi);
    } else {
      compensate_one<acc_t, kNesterov>(u[i], v[i], gi, m, ui, vi);
    }
    u_out[i] = ui;
    v_out[i] = vi;
    if constexpr (kMaxima) {
      g_max = std::max(g_max, key_of(gi));
      u_max = std::max(u_max, key_of(ui));
      v_max = std::max(v_max, key_of(vi));
    }
  }
  if constexpr (kMaxima) {
    maxima[0] = static_cast<uint64_t>(g_max);
    maxima[1] = static_cast<uint32_t>(u_max);
    maxima[2] = static_cast<uint32_t>(v_max);
  }
}

// r_out = r + g over [begin, end): the sum in the promoted type of (float, g's dtype), stored as
// float, reading r[i] before writing r_out[i] (so r_out may be r); the largest keys of g and r_out
// into maxima[0..1]. Inlined into a default and an AVX2 build (residual_range), like
// compensate_loop: the SSE2 build has no 32-bit integer max, AVX2 has (vpmaxsd).
template <typename scalar_t>
__attribute__((always_inline)) inline void residual_loop(const float* r, const scalar_t* g, float* r_out,
                                                         int64_t begin, int64_t end, uint64_t* maxima) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  decltype(key_of(acc_t())) g_max = 0;
  int32_t r_max = 0;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    const float ri = static_cast<float>(static_cast<acc_t>(r[i]) + gi);
    r_out[i] = ri;
    g_max = std::max(g_max, key_of(gi));
    r_max = std::max(r_max, key_of(ri));
  }
  maxima[0] = static_cast<uint64_t>(g_max);
  maxima[1] = static_cast<uint32_t>(r_max);
}

// The largest key of x over [begin, end) into keys[0]: the reducer's health check (one read pass).
// kAbsmaxLanes partial maxima, one per position modulo kAbsmaxLanes, which gcc keeps in four
// vector registers: with a single maximum every load waits on the last max (ResNet-50's 25.6M fp32
// gradients, one thread: 2.95-3.04 ms against 2.54-2.82 this way, a sum 2.46-2.75;
// benchmarks/op_bench.py, docs/benchmarks.md).
constexpr int kAbsmaxLanes = 32;
template <typename scalar_t>
__attribute__((always_inline)) inline void absmax_loop(const scalar_t* x, int64_t begin, int64_t end,
                                                       uint64_t* keys) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using key_t = decltype(key_of(acc_t()));
  key_t lanes[kAbsmaxLanes] = {};
  int64_t i = begin;
  for (; i + kAbsmaxLanes <= end; i += kAbsmaxLanes) {
    for (int j = 0; j < kAbsmaxLanes; ++j) lanes[j] = std::max(lanes[j], key_of(static_cast<acc_t>(x[i + j])));
  }
  key_t m = 0;
  for (int j = 0; j < kAbsmaxLanes; ++j) m = std::max(m, lanes[j]);
  for (; i < end; ++i) m = std::max(m, key_of(static_cast<acc_t>(x[i])));
  keys[0] = static_cast<uint64_t>(m);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GRADSPARSE_AVX2_COMPENSATE 1
inline bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
template <typename scalar_t, bool kMaxima, bool kNesterov, bool kZero>
__attribute__((target("avx2"))) void compensate_range_avx2(const float* u, const float* v, const scalar_t* g,
                                                          float* u_out, float* v_out, float m, int64_t begin,
                                                          int64_t end, uint64_t* maxima, const int8_t* keep) {
  compensate_loop<scalar_t, kMaxima, kNesterov, kZero>(u, v, g, u_out, v_out, m, begin, end, maxima, keep);
}
template <typename scalar_t>
__attribute__((target("avx2"))) void absmax_range_avx2(const scalar_t* x, int64_t begin, int64_t end, uint64_t* keys) {
  absmax_loop<scalar_t>(x, begin, end, keys);
}
template <typename scalar_t>
__attribute__((target("avx2"))) void residual_range_avx2(const float* r, const scalar_t* g, float* r_out,
                                                        int64_t begin, int64_t end, uint64_t* maxima) {
  residual_loop<scalar_t>(r, g, r_out, begin, end, maxima);
}
#endif

template <typename scalar_t, bool kMaxima, bool kNesterov, bool kZero>
void compensate_build(const float* u, const float* v, const scalar_t* g, float* u_out, float* v_out, float m,
                      int64_t begin, int64_t end, uint64_t* maxima, const int8_t* keep) {
#if defined(GRADSPARSE_AVX2_COMPENSATE)
  if (cpu_has_avx2()) {
    return compensate_range_avx2<scalar_t, kMaxima, kNesterov, kZero>(u, v, g, u_out, v_out, m, begin, end, maxima,
                                                                       keep);
  }
#endif
  compensate_loop<scalar_t, kMaxima, kNesterov, kZero>(u, v, g, u_out, v_out, m, begin, end, maxima, keep);
}

// keep: nullptr, or one byte per element of [begin, end): 0 where u and v read as zero, -1 elsewhere.
template <typename scalar_t, bool kMaxima>
void compensate_range(const float* u, const float* v, const scalar_t* g, float* u_out, float* v_out, float m,
                      bool nesterov, int64_t begin, int64_t end, uint64_t* maxima, const int8_t* keep = nullptr) {
  if (keep) {
    if (nesterov) return compensate_build<scalar_t, kMaxima, true, true>(u, v, g, u_out, v_out, m, begin, end, maxima,
                                                                         keep);
    return compensate_build<scalar_t, kMaxima, false, true>(u, v, g, u_out, v_out, m, begin, end, maxima, keep);
  }
  if (nesterov) {
    compensate_build<scalar_t, kMaxima, true, false>(u, v, g, u_out, v_out, m, begin, end, maxima, nullptr);
  } else {
    compensate_build<scalar_t, kMaxima, false, false>(u, v, g, u_out, v_out, m, begin, end, maxima, nullptr);
  }
}

template <typename scalar_t>
void residual_range(const float* r, const scalar_t* g, float* r_out, int64_t begin, int64_t end, uint64_t* maxima) {
#if defined(GRADSPARSE_AVX2_COMPENSATE)
  if (cpu_has_avx2()) return residual_range_avx2<scalar_t>(r, g, r_out, begin, end, maxima);
#endif
  residual_loop<scalar_t>(r, g, r_out, begin, end, maxima);
}

template <typename scalar_t>
void absmax_range(const scalar_t* x, int64_t begin, int64_t end, uint64_t* keys) {
#if defined(GRADSPARSE_AVX2_COMPENSATE)
  if (cpu_has_avx2()) return absmax_range_avx2<scalar_t>(x, begin, end, keys);
#endif
  absmax_loop<scalar_t>(x, begin, end, keys);
}

// The passes run over chunks of this many elements (a multiple of 64), in parallel.
constexpr int64_t kGrain = 1 << 14;

}  // namespace compensate
}  // namespace gradsparse
