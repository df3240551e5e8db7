// CPU kernels for the memories' compensation passes, each fused into one pass:
// DGC's momentum correction + local accumulation, dgc_compensate (in place) and
// dgc_compensate_into (into other buffers, with the largest magnitudes of the gradient and of the
// results, for the reducer's health check); error feedback's residual add, residual_compensate_into
// (the same for r = r + g); absmax. The loops: compensate_core.h. The same passes collecting
// selection candidates: compensate_candidates.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "compensate_core.h"

namespace gradsparse {
namespace {

using namespace compensate;

// Runs range(begin, end, keys) over the kGrain chunks of [0, n) in parallel, each chunk writing
// K keys, and returns each key's maximum over the chunks: the same for any thread count, since a
// max does not depend on the order.
template <int K, typename Range>
std::array<uint64_t, K> chunked_max_keys(int64_t n, const Range& range) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<uint64_t> partial(static_cast<size_t>(chunks) * K, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) range(c * kGrain, std::min(n, (c + 1) * kGrain), partial.data() + K * c);
  });
  std::array<uint64_t, K> total{};
  for (int64_t c = 0; c < chunks; ++c) {
    for (int t = 0; t < K; ++t) total[t] = std::max(total[t], partial[K * c + t]);
  }
  return total;
}

void dgc_compensate_cpu(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov) {
  check_dgc_args(u, v, g);
  const at::Tensor gc = g.contiguous();
  float* up = u.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dgc_compensate", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    at::parallel_for(0, gc.numel(), kGrain, [&](int64_t begin, int64_t end) {
      compensate_range<scalar_t, false>(up, vp, gp, up, vp, static_cast<float>(momentum), nesterov, begin, end,
                                        nullptr);
    });
  });
}

at::Tensor dgc_compensate_into_cpu(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, double momentum,
                                   bool nesterov, at::Tensor& u_out, at::Tensor& v_out) {
  check_dgc_into_args(u, v, g, u_out, v_out);
  const at::Tensor gc = g.contiguous();
  double maxima[3] = {0, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dgc_compensate_into", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const float *up = u.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *uo = u_out.data_ptr<float>(), *vo = v_out.data_ptr<float>();
    const auto total = chunked_max_keys<3>(gc.numel(), [&](int64_t begin, int64_t end, uint64_t* keys) {
      compensate_range<scalar_t, true>(up, vp, gp, uo, vo, static_cast<float>(momentum), nesterov, begin, end, keys);
    });
    maxima[0] = magnitude_of_key<acc_t>(total[0]);
    maxima[1] = magnitude_of_key<float>(total[1]);
    maxima[2] = magnitude_of_key<float>(total[2]);
  });
  return at::tensor({maxima[0], maxima[1], maxima[2]}, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor residual_compensate_into_cpu(const at::Tensor& r, const at::Tensor& g, at::Tensor& r_out) {
  check_residual_into_args(r, g, r_out);
  const at::Tensor gc = g.contiguous();
  double maxima[2] = {0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "residual_compensate_into", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const float* rp = r.data_ptr<float>();
    float* ro = r_out.data_ptr<float>();
    const auto total = chunked_max_keys<2>(gc.numel(), [&](int64_t begin, int64_t end, uint64_t* keys) {
      residual_range<scalar_t>(rp, gp, ro, begin, end, keys);
    });
    maxima[0] = magnitude_of_key<acc_t>(total[0]);
    maxima[1] = magnitude_of_key<float>(total[1]);
  });
  return at::tensor({maxima[0], maxima[1]}, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor absmax_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_floating_point(), "absmax: expected a floating-point tensor, got ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  double result = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "absmax", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* p = xc.data_ptr<scalar_t>();
    const auto total = chunked_max_keys<1>(xc.numel(), [&](int64_t begin, int64_t end, uint64_t* keys) {
      absmax_range<scalar_t>(p, begin, end, keys);
    });
    result = magnitude_of_key<acc_t>(total[0]);
  });
  return at::scalar_tensor(result, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("absmax", &absmax_cpu);
  m.impl("dgc_compensate", &dgc_compensate_cpu);
  m.impl("dgc_compensate_into", &dgc_compensate_into_cpu);
  m.impl("residual_compensate_into", &residual_compensate_into_cpu);
}

}  // namespace gradsparse
