// CPU unpack_add. Layout and header checks: csrc/common.h (= gradsparse/payload.py);
// pack is device-neutral: csrc/pack.cpp.
//
// Every payload is validated (header, sizes, indices strictly ascending and inside [0, numel))
// before anything is written, so a malformed payload leaves the destination unchanged.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "../common.h"
#include "prefetch.h"

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
  check_payload_tensor(p, rank);
  const uint8_t* base = p.data_ptr<uint8_t>();
  int32_t h[kHeaderInts];
  std::memcpy(h, base, kHeaderBytes);
  const int64_t count = check_header(h, p.numel(), rank, numel, value_dtype, n_dense);
  const Layout lay(count, n_dense, value_dtype);
  const int32_t* idx = reinterpret_cast<const int32_t*>(base + kHeaderBytes);
  if (count) {
    TORCH_CHECK_VALUE(idx[0] >= 0 && idx[count - 1] < numel, "unpack_add: payload ", rank, " index out of range [0, ",
                      numel, ")");
    // block by block without a branch per index (the loop vectorizes), then the first offender in a bad block
    constexpr int64_t kCheckBlock = 4096;
    for (int64_t b = 1; b < count; b += kCheckBlock) {
      const int64_t e = std::min(count, b + kCheckBlock);
      int bad = 0;
      for (int64_t j = b; j < e; ++j) bad |= idx[j] <= idx[j - 1];
      if (!bad) continue;
      for (int64_t j = b; j < e; ++j) {
        TORCH_CHECK_VALUE(idx[j] > idx[j - 1], "unpack_add: payload ", rank,
                          " indices are not strictly ascending (duplicate or unordered index) at position ", j);
      }
    }
  }
  return {h[1], idx, base + lay.values_offset, base + lay.dense_offset, count};
}

constexpr int64_t kOutChunk = 1 << 14;  // output elements per chunk: 64 KiB of float, stays in L2

at::Tensor unpack_add_cpu(at::TensorList payloads, at::Tensor& out, at::ScalarType value_dtype,
                          const std::optional<at::Tensor>& dense_index, double alpha, bool overwrite) {
  check_destination(out);
  const int64_t numel = out.numel();
  const at::Tensor didx = dense_positions(dense_index, out);
  const int64_t n_dense = didx.defined() ? didx.numel() : 0;
  std::vector<Parsed> parsed;
  parsed.reserve(payloads.size());
  for (size_t r = 0; r < payloads.size(); ++r) parsed.push_back(parse(payloads[r], r, numel, value_dtype, n_dense));
  int64_t flags = 0;
  for (const Parsed& p : parsed) flags |= p.flags;

  // Dense positions in ascending order (stable: equal positions keep their order, as index_add_ does).
  // The reducer's are ascending already (its whole tensors in bucket order): then they are used as
  // they are, without a sort per call (12K positions: about 0.2 ms).
  std::vector<int64_t> dense_order(n_dense);
  std::vector<int64_t> dense_sorted;
  const int64_t* ds = n_dense ? didx.data_ptr<int64_t>() : nullptr;
  for (int64_t j = 0; j < n_dense; ++j) dense_order[j] = j;
  if (n_dense && !std::is_sorted(ds, ds + n_dense)) {
    const int64_t* d = ds;
    std::stable_sort(dense_order.begin(), dense_order.end(), [&](int64_t a, int64_t b) { return d[a] < d[b]; });
    dense_sorted.resize(n_dense);
    for (int64_t j = 0; j < n_dense; ++j) dense_sorted[j] = d[dense_order[j]];
    ds = dense_sorted.data();
  }

  // The output is processed chunk by chunk: zero it (if asked), then add every rank's pairs that
  // fall in it, rank by rank, while the chunk is in cache. Chunks are disjoint, so they run in
  // parallel, and each element still receives its additions in rank order (sparse, then dense).
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "unpack_add_out", [&] {
    using out_t = scalar_t;
    out_t* o = out.data_ptr<out_t>();
    const out_t a = static_cast<out_t>(alpha);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "unpack_add_values", [&] {
      const int64_t chunks = (numel + kOutChunk - 1) / kOutChunk;
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const int64_t lo = c * kOutChunk, hi = std::min(numel, lo + kOutChunk);
          if (overwrite) std::fill(o + lo, o + hi, out_t(0));
          // the next chunk's lines asked for (to be written) while this one takes its pairs: 11.2-12.7 ->
          // 9.9-11.5 ms over ResNet-50's buckets at 0.1 % and 1 %, caches flushed (op_bench, docs/benchmarks.md)
          if (c + 1 < end) prefetch_for_write(o + hi, (std::min(numel, hi + kOutChunk) - hi) * sizeof(out_t));
          const int64_t* dfirst = std::lower_bound(ds, ds + n_dense, lo);
          const int64_t* dlast = std::lower_bound(dfirst, ds + n_dense, hi);
          for (const Parsed& p : parsed) {
            // numel <= INT32_MAX here: every payload's header matched it
            const int32_t* first = std::lower_bound(p.indices, p.indices + p.count, static_cast<int32_t>(lo));
            const int32_t* last = std::lower_bound(first, p.indices + p.count, static_cast<int32_t>(hi));
            const scalar_t* vals = reinterpret_cast<const scalar_t*>(p.values);
            for (const int32_t* i = first; i != last; ++i) o[*i] += static_cast<out_t>(vals[i - p.indices]) * a;
            const scalar_t* dense = reinterpret_cast<const scalar_t*>(p.dense);
            for (const int64_t* i = dfirst; i != dlast; ++i) {
              o[*i] += static_cast<out_t>(dense[dense_order[i - ds]]) * a;
            }
          }
        }
      });
    });
  });
  return at::scalar_tensor(flags, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("unpack_add", &unpack_add_cpu);
}

}  // namespace gradsparse
