// The payload writers of csrc/pack.cpp that the selection kernels share (segmented_topk_select_pack),
// and the bitmap of csrc/bitmap.cpp.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace gradsparse {

// Refuses an `out` that is not a contiguous 1-D uint8 tensor of exactly lay.nbytes on `device`.
void check_payload_out(const at::Tensor& out, const Layout& lay, const at::Device& device, const char* op);

// A CPU payload's frame into `out`: the header, the zeroed padding and the dense section (cast to
// value_dtype); the indices and values are left to the caller.
void write_payload_frame(const at::Tensor& out, const at::Tensor& dense, const Layout& lay, int64_t numel,
                         at::ScalarType value_dtype, int64_t flags);

// The op pack_gathered: pack(indices, source.reshape(-1).index_select(0, indices), dense, numel,
// value_dtype, flags)'s bytes written into out.
void pack_gathered_into(const at::Tensor& indices, const at::Tensor& source, const at::Tensor& dense, int64_t numel,
                        at::ScalarType value_dtype, int64_t flags, const at::Tensor& out);

// The selection bitmap of `positions` (int64, distinct, each below 64 * bits.numel()) into bits
// (check_selection_bits): zeroed, then one bit set per position, with ATen ops on any device
// (csrc/bitmap.cpp). The CPU selection marks its bits itself (csrc/cpu/topk_core.h, BitSink).
void mark_bitmap(const at::Tensor& bits, const at::Tensor& positions);

}  // namespace gradsparse
