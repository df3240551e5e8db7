// Wire format and argument checks shared by the CPU and CUDA kernels. The layout is documented in
// gradsparse/payload.py; tests/tools/test_constants.py checks the constants below against it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace gradsparse {

constexpr int32_t kMagic = 0x47535031;  // "GSP1"
constexpr int64_t kHeaderInts = 8;
constexpr int64_t kHeaderBytes = kHeaderInts * 4;

inline int32_t dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return 1;
    case c10::kHalf: return 2;
    case c10::kBFloat16: return 3;
    case c10::kDouble: return 4;
    default: TORCH_CHECK_VALUE(false, "gradsparse: unsupported value dtype ", t);
  }
}

inline int64_t align8(int64_t n) { return (n + 7) / 8 * 8; }

struct Layout {
  int64_t count, n_dense, value_size, values_offset, dense_offset, nbytes;
  Layout(int64_t count_, int64_t n_dense_, c10::ScalarType dtype)
      : count(count_), n_dense(n_dense_), value_size(static_cast<int64_t>(c10::elementSize(dtype))) {
    values_offset = align8(kHeaderBytes + 4 * count);
    dense_offset = values_offset + value_size * count;
    nbytes = align8(dense_offset + value_size * n_dense);
  }
};

// Checks one payload's header against what the receiver expects; returns its pair count.
inline int64_t check_header(const int32_t* h, int64_t payload_bytes, int64_t rank, int64_t numel,
                            c10::ScalarType value_dtype, int64_t n_dense) {
  TORCH_CHECK_VALUE(h[0] == kMagic, "unpack_add: payload ", rank, " has a bad magic: not a gradsparse payload");
  TORCH_CHECK_VALUE(h[5] == dtype_code(value_dtype), "unpack_add: payload ", rank, " value dtype code ", h[5],
                    " does not match ", value_dtype);
  TORCH_CHECK_VALUE(h[4] == numel, "unpack_add: payload ", rank, " is for ", h[4], " elements, expected ", numel);
  TORCH_CHECK_VALUE(h[3] == n_dense, "unpack_add: payload ", rank, " carries ", h[3], " dense values, expected ",
                    n_dense);
  const int64_t count = h[2];
  TORCH_CHECK_VALUE(count >= 0 && count <= numel, "unpack_add: payload ", rank, " count ", count, " outside [0, ",
                    numel, "]");
  const Layout lay(count, n_dense, value_dtype);
  TORCH_CHECK_VALUE(payload_bytes >= lay.nbytes, "unpack_add: payload ", rank, " truncated: ", payload_bytes,
                    " bytes, needs ", lay.nbytes);
  return count;
}

// A payload's tensor: contiguous 1-D uint8 holding at least a header.
inline void check_payload_tensor(const at::Tensor& p, int64_t rank) {
  TORCH_CHECK_VALUE(p.scalar_type() == c10::kByte && p.dim() == 1 && p.is_contiguous(),
                    "unpack_add: payload ", rank, " must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK_VALUE(p.numel() >= kHeaderBytes, "unpack_add: payload ", rank, " of ", p.numel(),
                    " bytes is shorter than the header");
}

// Selection inputs: any floating-point tensor.
inline void check_selection_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_floating_point(), op, ": expected a floating-point tensor, got ", x.scalar_type());
}

// topk_select's sample_ratio.
inline void check_sample_ratio(double sample_ratio, const char* op) {
  TORCH_CHECK(sample_ratio > 0 && sample_ratio <= 1, op, ": sample_ratio must be in (0, 1], got ", sample_ratio);
}

// segmented_topk_select's segments, read on the host: segment i is [offset[i], offset[i+1]) of the
// flat input and keeps count[i] = clamp(ks[i], 0, its length) positions, written from out[i].
struct Segments {
  std::vector<int64_t> offset, count, out;
  int64_t size() const { return static_cast<int64_t>(count.size()); }
  int64_t length(int64_t i) const { return offset[i + 1] - offset[i]; }
  int64_t total() const { return out.back(); }
};

inline Segments check_segments(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& ks) {
  const char* op = "segmented_topk_select";
  TORCH_CHECK_VALUE(offsets.scalar_type() == c10::kLong && ks.scalar_type() == c10::kLong, op,
                    ": offsets and ks must be int64, got ", offsets.scalar_type(), " and ", ks.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && ks.dim() == 1 && offsets.numel() == ks.numel() + 1, op,
                    ": expected 1-D offsets with one more element than ks (segment i is [offsets[i], offsets[i+1])),",
                    " got ", offsets.sizes(), " and ", ks.sizes());
  const at::Tensor o = offsets.to(c10::kCPU).contiguous(), k = ks.to(c10::kCPU).contiguous();
  const int64_t* off = o.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  Segments seg;
  seg.offset.assign(off, off + o.numel());
  seg.count.resize(k.numel());
  seg.out.assign(k.numel() + 1, 0);
  TORCH_CHECK_VALUE(seg.offset.front() >= 0 && seg.offset.back() <= x.numel(), op, ": offsets must lie in [0, ",
                    x.numel(), "], got ", seg.offset.front(), " .. ", seg.offset.back());
  for (int64_t i = 0; i < k.numel(); ++i) {
    TORCH_CHECK_VALUE(seg.offset[i] <= seg.offset[i + 1], op, ": offsets must not decrease, got ", seg.offset[i],
                      " then ", seg.offset[i + 1], " at segment ", i);
    seg.count[i] = std::min(std::max<int64_t>(kp[i], 0), seg.length(i));
    seg.out[i + 1] = seg.out[i] + seg.count[i];
  }
  return seg;
}

// The segments of a compensation pass with candidates (dgc_compensate_candidates,
// residual_compensate_candidates), read on the host: segment s is [offset[s], offset[s+1]) of the
// piece (offset[0] == 0, offset[S] == numel: the offsets given, less the first of them, `base`), its
// candidates are the positions with a magnitude key >= floor_key[s] (the smallest float at or above
// floors[s]; collect[s] false for a floor of +inf: nothing), of which the first cap[s] are kept and
// reported as base + their position in the piece (a piece of a bucket: bucket coordinates). A
// segment given a cap of -1 is skipped (skip[s]; cap[s] is then 0): neither read nor written, and
// nothing collected, so one call can cover a whole bucket with the tensors sent whole left out.
struct CandidateSegments {
  int64_t base = 0;
  std::vector<int64_t> offset, cap;
  std::vector<uint32_t> floor_key;
  std::vector<char> collect, skip;
  int64_t size() const { return static_cast<int64_t>(cap.size()); }
  // The maximal runs [first, end) of the piece (its coordinates) that no skipped segment interrupts.
  std::vector<std::pair<int64_t, int64_t>> runs() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (int64_t s = 0; s < size(); ++s) {
      if (skip[s] || offset[s] == offset[s + 1]) continue;
      if (!out.empty() && out.back().second == offset[s]) {
        out.back().second = offset[s + 1];
      } else {
        out.emplace_back(offset[s], offset[s + 1]);
      }
    }
    return out;
  }
};

// The float key (bit pattern of the magnitude) at and above which |v| >= floor holds exactly for
// every float v: the smallest float at or above floor (rounded up, so no float below the floor
// passes); 0 for floor <= 0. NaN and +inf floors are the caller's.
inline uint32_t floor_key_of(double floor) {
  if (!(floor > 0)) return 0;
  if (floor > static_cast<double>(std::numeric_limits<float>::max())) return 0x7f800000u;  // only inf (and NaN)
  float f = static_cast<float>(floor);  // nearest; may be below the floor
  if (static_cast<double>(f) < floor) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

inline CandidateSegments check_candidate_segments(int64_t numel, const at::Tensor& offsets, const at::Tensor& floors,
                                                  const at::Tensor& caps, const char* op) {
  TORCH_CHECK_VALUE(offsets.scalar_type() == c10::kLong && caps.scalar_type() == c10::kLong &&
                        floors.scalar_type() == c10::kDouble,
                    op, ": offsets and caps must be int64 and floors float64, got ", offsets.scalar_type(), ", ",
                    caps.scalar_type(), " and ", floors.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && floors.dim() == 1 && caps.dim() == 1 && offsets.numel() >= 1 &&
                        floors.numel() == offsets.numel() - 1 && caps.numel() == floors.numel(),
                    op, ": expected 1-D offsets with one more element than floors and caps (one per segment), got ",
                    offsets.sizes(), ", ", floors.sizes(), " and ", caps.sizes());
  const at::Tensor o = offsets.to(c10::kCPU).contiguous(), f = floors.to(c10::kCPU).contiguous(),
                   c = caps.to(c10::kCPU).contiguous();
  const int64_t segments = f.numel();
  CandidateSegments seg;
  seg.offset.assign(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
  seg.cap.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + segments);
  seg.floor_key.resize(segments);
  seg.collect.resize(segments);
  seg.skip.resize(segments);
  TORCH_CHECK_VALUE(seg.offset.front() >= 0 && seg.offset.back() - seg.offset.front() == numel, op,
                    ": offsets must span the gradient's ", numel, " elements from a first offset >= 0, got ",
                    seg.offset.front(), " .. ", seg.offset.back());
  seg.base = seg.offset.front();
  for (int64_t& o : seg.offset) o -= seg.base;
  const double* fp = f.data_ptr<double>();
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK_VALUE(seg.offset[s] <= seg.offset[s + 1], op, ": offsets must not decrease, got ", seg.offset[s],
                      " then ", seg.offset[s + 1], " at segment ", s);
    TORCH_CHECK_VALUE(seg.cap[s] >= -1, op, ": caps must be >= 0 (or -1: skip the segment), got ", seg.cap[s],
                      " at segment ", s);
    seg.skip[s] = seg.cap[s] == -1;
    if (seg.skip[s]) seg.cap[s] = 0;
    TORCH_CHECK_VALUE(!std::isnan(fp[s]), op, ": floor of segment ", s, " is NaN (use +inf to collect nothing)");
    seg.collect[s] = !seg.skip[s] && fp[s] != std::numeric_limits<double>::infinity();
    seg.floor_key[s] = seg.collect[s] ? floor_key_of(fp[s]) : 0;
  }
  return seg;
}

// segmented_topk_select_candidates' candidate lists, sizes read on the host: segment s has
// stored[s] = min(counts[s], caps[s]) entries of `candidates` from start[s], and is complete (they
// are all of its candidates) when counts[s] <= caps[s]. The positions themselves are checked by
// the kernels (inside the segment, ascending) before they are used.
struct CandidateLists {
  std::vector<int64_t> count, start, stored;
  std::vector<char> complete;
};

// segmented_topk_select_candidates' optional values: x at each candidate (x's dtype and device, 1-D, one per
// candidate); returns whether they were given.
inline bool check_candidate_values(const at::Tensor& x, const at::Tensor& candidates,
                                   const std::optional<at::Tensor>& values, const char* op) {
  if (!values.has_value() || !values->defined()) return false;
  TORCH_CHECK_VALUE(values->scalar_type() == x.scalar_type() && values->device() == x.device() &&
                        values->dim() == 1 && values->numel() == candidates.numel(),
                    op, ": values must be 1-D, one per candidate (", candidates.numel(), "), with x's dtype (",
                    x.scalar_type(), ") and device (", x.device(), "), got ", values->sizes(), " ",
                    values->scalar_type(), " on ", values->device());
  return true;
}

inline CandidateLists check_candidate_lists(const Segments& seg, const at::Tensor& x, const at::Tensor& candidates,
                                            const at::Tensor& counts, const at::Tensor& caps, const char* op) {
  const int64_t segments = seg.size();
  TORCH_CHECK_VALUE(candidates.scalar_type() == c10::kLong && counts.scalar_type() == c10::kLong &&
                        caps.scalar_type() == c10::kLong,
                    op, ": candidates, counts and caps must be int64, got ", candidates.scalar_type(), ", ",
                    counts.scalar_type(), " and ", caps.scalar_type());
  TORCH_CHECK_VALUE(candidates.dim() == 1 && counts.dim() == 1 && caps.dim() == 1 && counts.numel() == segments &&
                        caps.numel() == segments,
                    op, ": expected 1-D candidates and one count and one cap per segment (", segments, "), got ",
                    candidates.sizes(), ", ", counts.sizes(), " and ", caps.sizes());
  TORCH_CHECK_VALUE(candidates.device() == x.device(), op, ": candidates must be on x's device (", x.device(),
                    "), got ", candidates.device());
  const at::Tensor n = counts.to(c10::kCPU).contiguous(), c = caps.to(c10::kCPU).contiguous();
  const int64_t *np = n.data_ptr<int64_t>(), *cp = c.data_ptr<int64_t>();
  CandidateLists lists;
  lists.count.assign(np, np + segments);
  lists.start.assign(segments + 1, 0);
  lists.stored.resize(segments);
  lists.complete.resize(segments);
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK_VALUE(np[s] >= 0 && cp[s] >= 0, op, ": counts and caps must be >= 0, got ", np[s], " and ", cp[s],
                      " at segment ", s);
    lists.stored[s] = std::min(np[s], cp[s]);
    lists.complete[s] = np[s] <= cp[s];
    lists.start[s + 1] = lists.start[s] + lists.stored[s];
  }
  TORCH_CHECK_VALUE(candidates.numel() == lists.start[segments], op, ": expected min(counts[s], caps[s]) summed = ",
                    lists.start[segments], " candidates, got ", candidates.numel(),
                    " (pass the compensation pass's positions, shifted by the piece's offset in x)");
  return lists;
}

// unpack_add's destination: float32/float64, contiguous, 1-D.
inline void check_destination(const at::Tensor& out) {
  TORCH_CHECK_VALUE(out.scalar_type() == c10::kFloat || out.scalar_type() == c10::kDouble,
                    "unpack_add: the destination must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1 && out.is_contiguous(), "unpack_add: the destination must be contiguous and 1-D");
}

// The positions of the dense section in the destination, as contiguous int64 on its device,
// checked to lie inside it; undefined when there is no dense section.
inline at::Tensor dense_positions(const std::optional<at::Tensor>& dense_index, const at::Tensor& out) {
  if (!dense_index.has_value() || !dense_index->defined() || dense_index->numel() == 0) return at::Tensor();
  at::Tensor positions = dense_index->to(out.device(), c10::kLong).contiguous();
  TORCH_CHECK_VALUE(positions.min().item<int64_t>() >= 0 && positions.max().item<int64_t>() < out.numel(),
                    "unpack_add: dense_index outside the destination");
  return positions;
}

// dgc_compensate's arguments: fp32 contiguous state of the gradient's size, on its device.
inline void check_dgc_args(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g) {
  TORCH_CHECK_VALUE(u.scalar_type() == c10::kFloat && v.scalar_type() == c10::kFloat,
                    "dgc_compensate: momentum and velocity must be float32");
  TORCH_CHECK_VALUE(u.is_contiguous() && v.is_contiguous(), "dgc_compensate: state must be contiguous");
  TORCH_CHECK_VALUE(u.numel() == g.numel() && v.numel() == g.numel(), "dgc_compensate: state has ", u.numel(), "/",
                    v.numel(), " elements, the gradient ", g.numel());
  TORCH_CHECK_VALUE(g.is_floating_point(), "dgc_compensate: expected a floating-point gradient, got ", g.scalar_type());
  TORCH_CHECK_VALUE(g.device() == u.device() && v.device() == u.device(), "dgc_compensate: tensors on different devices");
}

// Whether two tensors' bytes overlap; whether they start at the same address.
inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}
inline bool same_start(const at::Tensor& a, const at::Tensor& b) { return a.data_ptr() == b.data_ptr(); }

// dgc_compensate_into's arguments: as dgc_compensate's, plus fp32 contiguous outputs of the same
// size and device, each either its input itself (in place) or not overlapping u or v or the other.
inline void check_dgc_into_args(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, const at::Tensor& u_out,
                                const at::Tensor& v_out) {
  check_dgc_args(u, v, g);
  check_dgc_args(u_out, v_out, g);
  TORCH_CHECK_VALUE(!(u_out.numel() && overlaps(u_out, v_out)), "dgc_compensate_into: u_out and v_out overlap");
  TORCH_CHECK_VALUE(!(u_out.numel() && ((overlaps(u_out, u) && !same_start(u_out, u)) || overlaps(u_out, v))),
                    "dgc_compensate_into: u_out must be u itself or not overlap u and v");
  TORCH_CHECK_VALUE(!(v_out.numel() && ((overlaps(v_out, v) && !same_start(v_out, v)) || overlaps(v_out, u))),
                    "dgc_compensate_into: v_out must be v itself or not overlap u and v");
}

// residual_compensate_into's arguments: fp32 contiguous residual r and output r_out of the
// gradient's size, on its device; r_out is r itself (in place) or does not overlap it.
inline void check_residual_into_args(const at::Tensor& r, const at::Tensor& g, const at::Tensor& r_out) {
  const char* op = "residual_compensate_into";
  TORCH_CHECK_VALUE(r.scalar_type() == c10::kFloat && r_out.scalar_type() == c10::kFloat, op,
                    ": the residual and r_out must be float32, got ", r.scalar_type(), " and ", r_out.scalar_type());
  TORCH_CHECK_VALUE(r.is_contiguous() && r_out.is_contiguous(), op, ": the residual and r_out must be contiguous");
  TORCH_CHECK_VALUE(r.numel() == g.numel() && r_out.numel() == g.numel(), op, ": the residual and r_out have ",
                    r.numel(), " and ", r_out.numel(), " elements, the gradient ", g.numel());
  TORCH_CHECK_VALUE(g.is_floating_point(), op, ": expected a floating-point gradient, got ", g.scalar_type());
  TORCH_CHECK_VALUE(g.device() == r.device() && r_out.device() == r.device(), op, ": tensors on different devices");
  TORCH_CHECK_VALUE(!(r_out.numel() && overlaps(r_out, r) && !same_start(r_out, r)), op,
                    ": r_out must be r itself or not overlap r");
}

// dgc_zero_compensate's list of positions to zero: a contiguous 1-D int64 tensor on the state's
// device (its values are checked by each device's kernel).
inline void check_zeroed(const at::Tensor& zeroed, const at::Tensor& state, const char* op) {
  TORCH_CHECK_VALUE(zeroed.scalar_type() == c10::kLong && zeroed.dim() == 1 && zeroed.is_contiguous(), op,
                    ": zeroed must be a contiguous 1-D int64 tensor, got ", zeroed.scalar_type(), " ", zeroed.dim(),
                    "-D");
  TORCH_CHECK_VALUE(zeroed.device() == state.device(), op, ": zeroed is on ", zeroed.device(), ", the state on ",
                    state.device());
}

// A selection bitmap (segmented_topk_select_pack's bits, dgc_mask_compensate's): bit p % 64 of word
// p / 64 (as the int64's two's-complement bits) marks position p; a contiguous 1-D int64 tensor of at
// least ceil(numel / 64) words (`exact`: exactly that many) on `device`.
inline int64_t bitmap_words(int64_t numel) { return (numel + 63) / 64; }
inline void check_selection_bits(const at::Tensor& bits, int64_t numel, const c10::Device& device, const char* op,
                                 bool exact = true) {
  TORCH_CHECK_VALUE(bits.scalar_type() == c10::kLong && bits.dim() == 1 && bits.is_contiguous(), op,
                    ": bits must be a contiguous 1-D int64 tensor, got ", bits.scalar_type(), " ", bits.dim(), "-D");
  TORCH_CHECK_VALUE(exact ? bits.numel() == bitmap_words(numel) : bits.numel() >= bitmap_words(numel), op,
                    ": bits has ", bits.numel(), " words, ", exact ? "" : "at least ", bitmap_words(numel),
                    " are needed for ", numel, " positions (one bit each)");
  TORCH_CHECK_VALUE(bits.device() == device, op, ": bits is on ", bits.device(), ", the data on ", device);
}

}  // namespace gradsparse
