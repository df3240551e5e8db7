// pack: one device-neutral implementation (ATen copies run on the tensors' device and stream).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace gradsparse {
namespace {

at::Tensor pack(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& dense, int64_t numel,
                at::ScalarType value_dtype, int64_t flags) {
  TORCH_CHECK_VALUE(indices.numel() == values.numel(), "pack: ", indices.numel(), " indices but ", values.numel(),
                    " values");
  TORCH_CHECK_VALUE(numel >= 0 && numel <= INT32_MAX, "pack: numel ", numel, " does not fit int32 indices");
  const Layout lay(indices.numel(), dense.numel(), value_dtype);
  at::Tensor out = at::zeros({lay.nbytes}, values.options().dtype(at::kByte));
  const std::vector<int32_t> header = {kMagic, static_cast<int32_t>(flags), static_cast<int32_t>(lay.count),
                                       static_cast<int32_t>(lay.n_dense), static_cast<int32_t>(numel),
                                       dtype_code(value_dtype), 0, 0};
  out.narrow(0, 0, kHeaderBytes).view(at::kInt).copy_(at::tensor(header, at::TensorOptions().dtype(at::kInt)));
  if (lay.count) {
    out.narrow(0, kHeaderBytes, 4 * lay.count).view(at::kInt).copy_(indices.reshape(-1));
    out.narrow(0, lay.values_offset, lay.value_size * lay.count).view(value_dtype).copy_(values.reshape(-1));
  }
  if (lay.n_dense) {
    out.narrow(0, lay.dense_offset, lay.value_size * lay.n_dense).view(value_dtype).copy_(dense.reshape(-1));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CompositeExplicitAutograd, m) {
  m.impl("pack", &pack);
}

}  // namespace gradsparse
