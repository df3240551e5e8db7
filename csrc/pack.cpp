// pack and pack_gathered: one device-neutral implementation (ATen copies run on the tensors' device and stream),
// with a direct loop for CPU tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "common.h"
#include "pack.h"

namespace gradsparse {
namespace {

// Below this many elements a copy runs on the calling thread: a parallel region can cost more
// than the whole copy (0.1 ms for 250k pairs) on a busy machine.
constexpr int64_t kPackGrain = 1 << 20;

bool is_value_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// src cast to value_dtype into dst (suitably aligned), as ATen's copy_ rounds.
void cast_into(const at::Tensor& src, uint8_t* dst, at::ScalarType value_dtype) {
  const at::Tensor s = src.reshape(-1).contiguous();
  const int64_t n = s.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "pack_values", [&] {
    using src_t = scalar_t;
    const src_t* p = s.data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "pack_values_to", [&] {
      scalar_t* o = reinterpret_cast<scalar_t*>(dst);
      at::parallel_for(0, n, kPackGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[i] = static_cast<scalar_t>(p[i]);
      });
    });
  });
}

// CPU: every byte of the payload `out` (uninitialized) written once (header, indices, values,
// dense section, zeroed padding); `pairs(base)` writes the indices and values.
template <typename Pairs>
void pack_cpu(const at::Tensor& out, const at::Tensor& dense, const Layout& lay, const int32_t* header,
              at::ScalarType value_dtype, Pairs&& pairs) {
  uint8_t* base = out.data_ptr<uint8_t>();
  std::memcpy(base, header, kHeaderBytes);
  const int64_t indices_end = kHeaderBytes + 4 * lay.count;
  std::memset(base + indices_end, 0, lay.values_offset - indices_end);
  const int64_t dense_end = lay.dense_offset + lay.value_size * lay.n_dense;
  std::memset(base + dense_end, 0, lay.nbytes - dense_end);
  if (lay.count) pairs(base);
  cast_into(dense, base + lay.dense_offset, value_dtype);
}

// The indices (int64 or int32) as int32, into the payload's index section.
void write_indices(const at::Tensor& indices, uint8_t* base, int64_t count) {
  const at::Tensor idx = indices.reshape(-1).contiguous();
  int32_t* o = reinterpret_cast<int32_t*>(base + kHeaderBytes);
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "pack_indices", [&] {
    const index_t* p = idx.data_ptr<index_t>();
    at::parallel_for(0, count, kPackGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = static_cast<int32_t>(p[i]);
    });
  });
}

std::vector<int32_t> header_of(const Layout& lay, int64_t numel, at::ScalarType value_dtype, int64_t flags) {
  return {kMagic, static_cast<int32_t>(flags), static_cast<int32_t>(lay.count), static_cast<int32_t>(lay.n_dense),
          static_cast<int32_t>(numel), dtype_code(value_dtype), 0, 0};
}

bool cpu_pack_inputs(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& dense) {
  return indices.is_cpu() && values.is_cpu() && dense.is_cpu() &&
         (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt) &&
         is_value_type(values.scalar_type()) && is_value_type(dense.scalar_type());
}

// Any device: the payload `out` zeroed, each section copied into its view (ATen copies on the tensors' device).
void pack_generic(const at::Tensor& out, const at::Tensor& indices, const at::Tensor& values, const at::Tensor& dense,
                  const Layout& lay, const std::vector<int32_t>& header, at::ScalarType value_dtype) {
  out.zero_();
  out.narrow(0, 0, kHeaderBytes).view(at::kInt).copy_(at::tensor(header, at::TensorOptions().dtype(at::kInt)));
  if (lay.count) {
    out.narrow(0, kHeaderBytes, 4 * lay.count).view(at::kInt).copy_(indices.reshape(-1));
    out.narrow(0, lay.values_offset, lay.value_size * lay.count).view(value_dtype).copy_(values.reshape(-1));
  }
  if (lay.n_dense) {
    out.narrow(0, lay.dense_offset, lay.value_size * lay.n_dense).view(value_dtype).copy_(dense.reshape(-1));
  }
}

at::Tensor pack(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& dense, int64_t numel,
                at::ScalarType value_dtype, int64_t flags) {
  TORCH_CHECK_VALUE(indices.numel() == values.numel(), "pack: ", indices.numel(), " indices but ", values.numel(),
                    " values");
  TORCH_CHECK_VALUE(numel >= 0 && numel <= INT32_MAX, "pack: numel ", numel, " does not fit int32 indices");
  const Layout lay(indices.numel(), dense.numel(), value_dtype);
  const std::vector<int32_t> header = header_of(lay, numel, value_dtype, flags);
  at::Tensor out = at::empty({lay.nbytes}, values.options().dtype(at::kByte));
  if (cpu_pack_inputs(indices, values, dense)) {
    pack_cpu(out, dense, lay, header.data(), value_dtype, [&](uint8_t* base) {
      write_indices(indices, base, lay.count);
      cast_into(values, base + lay.values_offset, value_dtype);
    });
  } else {
    pack_generic(out, indices, values, dense, lay, header, value_dtype);
  }
  return out;
}

}  // namespace

void check_payload_out(const at::Tensor& out, const Layout& lay, const at::Device& device, const char* op) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kByte && out.dim() == 1 && out.is_contiguous() &&
                        out.numel() == lay.nbytes && out.device() == device,
                    op, ": out must be a contiguous 1-D uint8 tensor of the payload's ", lay.nbytes,
                    " bytes on the source's device, got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
}

void write_payload_frame(const at::Tensor& out, const at::Tensor& dense, const Layout& lay, int64_t numel,
                         at::ScalarType value_dtype, int64_t flags) {
  pack_cpu(out, dense, lay, header_of(lay, numel, value_dtype, flags).data(), value_dtype, [](uint8_t*) {});
}

// pack(indices, source.reshape(-1).index_select(0, indices), ...) written into `out` (a caller's
// buffer, reused between steps: no fresh pages to fault in) without the gathered tensor: on the CPU
// one loop reads each index once and writes it and source[index], cast, into the payload.
void pack_gathered_into(const at::Tensor& indices, const at::Tensor& source, const at::Tensor& dense, int64_t numel,
                        at::ScalarType value_dtype, int64_t flags, const at::Tensor& out) {
  TORCH_CHECK_VALUE(indices.dim() <= 1, "pack_gathered: indices must be 0-D or 1-D, got ", indices.dim(), "-D");
  TORCH_CHECK_VALUE(numel >= 0 && numel <= INT32_MAX, "pack_gathered: numel ", numel, " does not fit int32 indices");
  const Layout lay(indices.numel(), dense.numel(), value_dtype);
  check_payload_out(out, lay, source.device(), "pack_gathered");
  if (!(cpu_pack_inputs(indices, source, dense) && out.is_cpu())) {
    const at::Tensor values = source.reshape(-1).index_select(0, indices.reshape(-1));
    pack_generic(out, indices, values, dense, lay, header_of(lay, numel, value_dtype, flags), value_dtype);
    return;
  }
  const at::Tensor src = source.reshape(-1).contiguous();
  const int64_t size = src.numel();
  const at::Tensor idx = indices.reshape(-1).contiguous();
  pack_cpu(out, dense, lay, header_of(lay, numel, value_dtype, flags).data(), value_dtype,
                  [&](uint8_t* base) {
    int32_t* oi = reinterpret_cast<int32_t*>(base + kHeaderBytes);
    std::atomic<bool> failed{false};
    std::atomic<int64_t> bad{0};  // an index outside the source: nothing out of range is read
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "pack_gathered_indices", [&] {
      const index_t* p = idx.data_ptr<index_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "pack_gathered_source", [&] {
        using src_t = scalar_t;
        const src_t* x = src.data_ptr<src_t>();
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "pack_gathered_values", [&] {
          scalar_t* ov = reinterpret_cast<scalar_t*>(base + lay.values_offset);
          at::parallel_for(0, lay.count, kPackGrain, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) {
              const int64_t j = static_cast<int64_t>(p[i]);
              if (j < 0 || j >= size) {
                bad.store(j);
                failed.store(true);
                return;
              }
              oi[i] = static_cast<int32_t>(j);
              ov[i] = static_cast<scalar_t>(x[j]);
            }
          });
        });
      });
    });
    TORCH_CHECK_INDEX(!failed.load(), "pack_gathered: index ", bad.load(), " is out of bounds for a source of ", size,
                      " elements");
  });
}

namespace {

// segmented_topk_select_pack on any device (the CPU has its own kernel, csrc/cpu/segmented.cpp):
// segmented_topk_select, then pack_gathered of its positions (the same positions and bytes).
at::Tensor segmented_topk_select_pack(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& ks,
                                      double sample_ratio, int64_t seed, const at::Tensor& dense, int64_t numel,
                                      int64_t flags, const at::Tensor& out, const std::optional<at::Tensor>& bits) {
  static const auto select =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("gradsparse::segmented_topk_select", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>();
  TORCH_CHECK_VALUE(x.numel() <= numel && numel <= INT32_MAX, "segmented_topk_select_pack: numel ", numel,
                    " must hold x's ", x.numel(), " elements and fit int32 indices");
  const at::Tensor positions = select.call(x, offsets, ks, sample_ratio, seed);
  pack_gathered_into(positions, x, dense, numel, at::kFloat, flags, out);
  if (bits.has_value()) {
    check_selection_bits(*bits, x.numel(), x.device(), "segmented_topk_select_pack");
    mark_bitmap(*bits, positions);
  }
  return positions;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CompositeExplicitAutograd, m) {
  m.impl("pack", &pack);
  m.impl("pack_gathered", &pack_gathered_into);
  m.impl("segmented_topk_select_pack", &segmented_topk_select_pack);
}

}  // namespace gradsparse
