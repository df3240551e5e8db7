// The selection bitmap on any device (check_selection_bits: bit p % 64 of int64 word p / 64 marks
// position p): mark_bitmap (segmented_topk_select_pack's bits where the selection does not mark them
// itself), and dgc_mask_compensate on devices without their own kernel (the CPU has one,
// csrc/cpu/dgc.cpp): the bitmap unpacked into a boolean mask, the state zeroed there, then
// dgc_compensate_into in place. Plain ATen ops, so this runs on CUDA as it is.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "common.h"
#include "pack.h"

namespace gradsparse {

void mark_bitmap(const at::Tensor& bits, const at::Tensor& positions) {
  bits.zero_();
  if (positions.numel() == 0) return;
  const at::Tensor p = positions.to(bits.device(), at::kLong);
  const at::Tensor bit = p.bitwise_and(63);
  // 1 << j, with bit 63 as the int64 it is (the minimum); distinct bits of a word add without carry
  // or overflow, so index_add_ sets exactly them
  const at::Tensor value = at::where(bit == 63, at::scalar_tensor(std::numeric_limits<int64_t>::min(), p.options()),
                                     at::bitwise_left_shift(at::ones_like(p), bit));
  bits.index_add_(0, p.bitwise_right_shift(6), value);
}

namespace {

// True at i where bit offset + i of bits is set, for i in [0, numel).
at::Tensor bitmap_mask(const at::Tensor& bits, int64_t offset, int64_t numel) {
  const at::Tensor shifts = at::arange(64, bits.options());
  const at::Tensor all = bits.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and(1).reshape(-1);
  return all.narrow(0, offset, numel).to(at::kBool);
}

at::Tensor dgc_mask_compensate(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov,
                               const at::Tensor& bits, int64_t offset) {
  static const auto compensate_into =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("gradsparse::dgc_compensate_into", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool, at::Tensor&,
                            at::Tensor&)>();
  check_dgc_into_args(u, v, g, u, v);
  TORCH_CHECK_VALUE(offset >= 0, "dgc_mask_compensate: offset must be >= 0, got ", offset);
  check_selection_bits(bits, offset + u.numel(), u.device(), "dgc_mask_compensate", /*exact=*/false);
  if (u.numel()) {
    const at::Tensor zeroed = bitmap_mask(bits, offset, u.numel());
    u.view(-1).masked_fill_(zeroed, 0);
    v.view(-1).masked_fill_(zeroed, 0);
  }
  return compensate_into.call(u, v, g, momentum, nesterov, u, v);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CompositeExplicitAutograd, m) {
  m.impl("dgc_mask_compensate", &dgc_mask_compensate);
}

}  // namespace gradsparse
