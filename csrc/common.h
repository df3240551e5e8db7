// Wire format and argument checks shared by the CPU and CUDA kernels; the layout is documented
// in gradsparse/payload.py and must stay identical to it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

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

}  // namespace gradsparse
