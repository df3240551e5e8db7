// CPU kernel for DGC's momentum correction + local accumulation, fused into one pass.
//
// Rounds exactly like the torch ops it replaces (gradsparse/_reference.py::dgc_compensate_):
// products in float, sums in the promoted type of (float, g's dtype), stored as float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "../common.h"

namespace gradsparse {
namespace {

void dgc_compensate_cpu(at::Tensor& u, at::Tensor& v, const at::Tensor& g, double momentum, bool nesterov) {
  check_dgc_args(u, v, g);
  const at::Tensor gc = g.contiguous();
  float* up = u.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float m = static_cast<float>(momentum);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dgc_compensate", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    at::parallel_for(0, gc.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      if (nesterov) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t gi = static_cast<acc_t>(gp[i]);
          const float ui = static_cast<float>(static_cast<acc_t>(up[i]) + gi) * m;
          up[i] = ui;
          vp[i] = static_cast<float>(static_cast<acc_t>(vp[i] + ui) + gi);
        }
      } else {
        for (int64_t i = begin; i < end; ++i) {
          const float ui = static_cast<float>(static_cast<acc_t>(up[i] * m) + static_cast<acc_t>(gp[i]));
          up[i] = ui;
          vp[i] = vp[i] + ui;
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(gradsparse, CPU, m) {
  m.impl("dgc_compensate", &dgc_compensate_cpu);
}

}  // namespace gradsparse
