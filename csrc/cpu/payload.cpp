// CPU unpack_add. Layout and header checks: csrc/common.h (= gradsparse/payload.py);
// pack is device-neutral: csrc/pack.cpp.
//
// Every payload is validated (header, sizes, indices strictly ascending and inside [0, numel))
// before anything is written, so a malformed payload leaves the destination unchanged.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "../common.h"

namespace gradsparse {
namespace {

struct Parsed {
  int32_t flags;
  const int32_t* indices;
  const uint8_t* values;
  const uint8_t* dense;
  int64_t count;
};

Parsed parse(const at::Tensor& p, int64_t rank, int64_t numel, at::ScalarType value_dtype, int64_t n_dense) {
  TORCH_CHECK_VALUE(p.scalar_type() == at::kByte && p.dim() == 1 && p.is_contiguous(),
                    "unpack_add: payload ", rank, " must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK_VALUE(p.numel() >= kHeaderBytes, "unpack_add: payload ", rank, " of ", p.numel(),
                    " bytes is shorter than the header");
  const uint8_t* base = p.data_ptr<uint8_t>();
  int32_t h[kHeaderInts];
  std::memcpy(h, base, kHeaderBytes);
  const int64_t count = check_header(h, p.numel(), rank, numel, value_dtype, n_dense);
  const Layout lay(count, n_dense, value_dtype);
  const int32_t* idx = reinterpret_cast<const int32_t*>(base + kHeaderBytes);
  if (count) {
    TORCH_CHECK_VALUE(idx[0] >= 0 && idx[count - 1] < numel, "unpack_add: payload ", rank, " index out of range [0, ",
                      numel, ")");
    for (int64_t j = 1; j < count; ++j) {
      TORCH_CHECK_VALUE(idx[j] > idx[j - 1], "unpack_add: payload ", rank,
                        " indices are not strictly ascending (duplicate or unordered index) at position ", j);
    }
  }
  return {h[1], idx, base + lay.values_offset, base + lay.dense_offset, count};
}

template <typename out_t, typename val_t>
void scatter(out_t* out, const int32_t* idx, const val_t* vals, int64_t count, out_t alpha) {
  // indices are unique within one payload, so chunks never touch the same element
  at::parallel_for(0, count, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) out[idx[j]] += static_cast<out_t>(vals[j]) * alpha;
  });
}

template <typename out_t, typename val_t>
void scatter_dense(out_t* out, const int64_t* idx, const val_t* vals, int64_t count, out_t alpha) {
  for (int64_t j = 0; j < count; ++j) out[idx[j]] += static_cast<out_t>(vals[j]) * alpha;
}

at::Tensor unpack_add_cpu(at::TensorList payloads, at::Tensor& out, at::ScalarType value_dtype,
                          const std::optional<at::Tensor>& dense_index, double alpha, bool overwrite) {
  check_destination(out);
  const int64_t numel = out.numel();
  const at::Tensor didx = dense_positions(dense_index, out);
  const int64_t n_dense = didx.defined() ? didx.numel() : 0;
  std::vector<Parsed> parsed;
  parsed.reserve(payloads.size());
  for (size_t r = 0; r < payloads.size(); ++r) parsed.push_back(parse(payloads[r], r, numel, value_dtype, n_dense));
  if (overwrite) out.zero_();
  int64_t flags = 0;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "unpack_add_out", [&] {
    using out_t = scalar_t;
    out_t* o = out.data_ptr<out_t>();
    const out_t a = static_cast<out_t>(alpha);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "unpack_add_values", [&] {
      for (const Parsed& p : parsed) {
        flags |= p.flags;
        scatter(o, p.indices, reinterpret_cast<const scalar_t*>(p.values), p.count, a);
        if (n_dense) scatter_dense(o, didx.data_ptr<int64_t>(), reinterpret_cast<const scalar_t*>(p.dense), n_dense, a);
      }
    });
  });
  return at::scalar_tensor(flags, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("unpack_add", &unpack_add_cpu);
}

}  // namespace gradsparse
