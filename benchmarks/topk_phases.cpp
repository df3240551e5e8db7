// CPU time of each phase of topk_select's machinery (csrc/cpu/topk_core.h), outside torch, on one
// thread: the sample, pass 1, the k-th value and pass 2, on 25M normal fp32 at five densities,
// written into an output allocated and touched once (so no page faults are counted).
//
//   g++ -O3 -std=c++17 -pthread -Wno-psabi benchmarks/topk_phases.cpp -o /tmp/topk_phases && /tmp/topk_phases
//
// Prints one line per density: mean ms over 5 calls of each phase and in all.
#include <cmath>
#include <cstdio>
#include <ctime>
#include <random>
#include <vector>

#include "../csrc/cpu/topk_core.h"

using gradsparse::select_core::TopK;

static double cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

int main() {
  const int64_t n = 25000000;
  std::vector<float> x(n);
  std::mt19937 g(1);
  std::normal_distribution<float> normal;
  for (auto& v : x) v = normal(g);
  std::vector<int64_t> out(n);  // touched once here
  for (const double density : {0.001, 0.01, 0.0625, 0.1, 0.25}) {
    const int64_t k = static_cast<int64_t>(std::ceil(density * n));
    double t[4] = {0, 0, 0, 0};
    const int rounds = 5;
    for (int r = 0; r < rounds; ++r) {
      const double t0 = cpu_ms();
      TopK<float> topk(x.data(), n, k, 1);
      topk.plan(true, 0.01, r);
      const double t1 = cpu_ms();
      topk.count();
      const double t2 = cpu_ms();
      const auto kth = topk.kth_key();
      const double t3 = cpu_ms();
      topk.write(kth, out.data());
      const double t4 = cpu_ms();
      t[0] += t1 - t0;
      t[1] += t2 - t1;
      t[2] += t3 - t2;
      t[3] += t4 - t3;
    }
    std::printf("density %-6g sample %.2f  pass 1 %.2f  k-th %.2f  pass 2 %.2f  total %.2f ms\n", density,
                t[0] / rounds, t[1] / rounds, t[2] / rounds, t[3] / rounds, (t[0] + t[1] + t[2] + t[3]) / rounds);
  }
}
