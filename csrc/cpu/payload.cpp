// CPU payload kernels: pack and unpack_add. Layout: gradsparse/payload.py.
//
// unpack_add validates every payload (header, sizes, indices strictly ascending and inside
// [0, numel)) before it writes anything, so a malformed payload leaves the destination unchanged.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

namespace gradsparse {
namespace {

constexpr int32_t kMagic = 0x47535031;  // "GSP1"
constexpr int64_t kHeaderInts = 8;
constexpr int64_t kHeaderBytes = kHeaderInts * 4;

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    case at::kDouble: return 4;
    default: TORCH_CHECK_VALUE(false, "gradsparse: unsupported value dtype ", t);
  }
}

int64_t align8(int64_t n) { return (n + 7) / 8 * 8; }

struct Layout {
  int64_t count, n_dense, value_size, values_offset, dense_offset, nbytes;
  Layout(int64_t count_, int64_t n_dense_, at::ScalarType dtype)
      : count(count_), n_dense(n_dense_), value_size(c10::elementSize(dtype)) {
    values_offset = align8(kHeaderBytes + 4 * count);
    dense_offset = values_offset + value_size * count;
    nbytes = align8(dense_offset + value_size * n_dense);
  }
};

at::Tensor pack_cpu(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& dense, int64_t numel,
                    at::ScalarType value_dtype, int64_t flags) {
  TORCH_CHECK_VALUE(indices.numel() == values.numel(), "pack: ", indices.numel(), " indices but ", values.numel(), " values");
  TORCH_CHECK_VALUE(numel >= 0 && numel <= INT32_MAX, "pack: numel ", numel, " does not fit int32 indices");
  const int32_t code = dtype_code(value_dtype);
  const Layout lay(indices.numel(), dense.numel(), value_dtype);
  at::Tensor out = at::zeros({lay.nbytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* base = out.data_ptr<uint8_t>();
  const int32_t header[kHeaderInts] = {kMagic, static_cast<int32_t>(flags), static_cast<int32_t>(lay.count),
                                       static_cast<int32_t>(lay.n_dense), static_cast<int32_t>(numel), code, 0, 0};
  std::memcpy(base, header, kHeaderBytes);
  if (lay.count) {
    out.narrow(0, kHeaderBytes, 4 * lay.count).view(at::kInt).copy_(indices.reshape(-1));
    out.narrow(0, lay.values_offset, lay.value_size * lay.count).view(value_dtype).copy_(values.reshape(-1));
  }
  if (lay.n_dense) {
    out.narrow(0, lay.dense_offset, lay.value_size * lay.n_dense).view(value_dtype).copy_(dense.reshape(-1));
  }
  return out;
}

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
  TORCH_CHECK_VALUE(h[0] == kMagic, "unpack_add: payload ", rank, " has a bad magic: not a gradsparse payload");
  TORCH_CHECK_VALUE(h[5] == dtype_code(value_dtype), "unpack_add: payload ", rank, " value dtype code ", h[5],
                    " does not match ", value_dtype);
  TORCH_CHECK_VALUE(h[4] == numel, "unpack_add: payload ", rank, " is for ", h[4], " elements, expected ", numel);
  TORCH_CHECK_VALUE(h[3] == n_dense, "unpack_add: payload ", rank, " carries ", h[3], " dense values, expected ", n_dense);
  const int64_t count = h[2];
  TORCH_CHECK_VALUE(count >= 0 && count <= numel, "unpack_add: payload ", rank, " count ", count, " outside [0, ", numel, "]");
  const Layout lay(count, n_dense, value_dtype);
  TORCH_CHECK_VALUE(p.numel() >= lay.nbytes, "unpack_add: payload ", rank, " truncated: ", p.numel(), " bytes, needs ",
                    lay.nbytes);
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
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
                    "unpack_add: the destination must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1 && out.is_contiguous(), "unpack_add: the destination must be contiguous and 1-D");
  const int64_t numel = out.numel();
  at::Tensor didx;
  int64_t n_dense = 0;
  if (dense_index.has_value() && dense_index->defined()) {
    didx = dense_index->contiguous();
    TORCH_CHECK_VALUE(didx.scalar_type() == at::kLong, "unpack_add: dense_index must be int64");
    n_dense = didx.numel();
    if (n_dense) {
      TORCH_CHECK_VALUE(didx.min().item<int64_t>() >= 0 && didx.max().item<int64_t>() < numel,
                        "unpack_add: dense_index outside the destination");
    }
  }
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
  m.impl("pack", &pack_cpu);
  m.impl("unpack_add", &unpack_add_cpu);
}

}  // namespace gradsparse
