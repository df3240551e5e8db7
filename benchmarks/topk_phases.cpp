// CPU time of each phase of topk_select's machinery (csrc/cpu/topk_core.h), outside torch, on one
// thread: the sample, pass 1, the k-th value and pass 2, on normal fp32 at five densities, written
// into an output allocated and touched once (so no page faults are counted).
//
// With no argument: one tensor of 25M elements. With a file of tensor sizes (whitespace-separated),
// every tensor selects its own share one after the other, as segmented_topk_select does a bucket's
// parameters, and the phases are summed over them; e.g. ResNet-50's compressed parameters:
//
//   g++ -O3 -std=c++17 -pthread -Wno-psabi benchmarks/topk_phases.cpp -o /tmp/topk_phases && /tmp/topk_phases
//   python -c "import math; from gradsparse.model_shapes import resnet50;
//       print(*[math.prod(s) for _, s in resnet50() if math.prod(s) >= 4096])" > /tmp/sizes.txt
//   (one command: the line break is inside the quotes)
//   /tmp/topk_phases /tmp/sizes.txt
//
// With --pairs after the arguments above (or alone), pass 2 also writes each position's int32 index
// and fp32 value beside it, as segmented_topk_select_pack writes a payload's pairs:
//
//   /tmp/topk_phases /tmp/sizes.txt --pairs
//
// Prints one line per density: mean ms over 5 calls of each phase and in all.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../csrc/cpu/topk_core.h"

using gradsparse::select_core::TopK;

static double cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

int main(int argc, char** argv) {
  std::vector<int64_t> sizes;
  const bool pairs = argc > 1 && std::string(argv[argc - 1]) == "--pairs";
  if (pairs) --argc;
  if (argc > 1) {
    std::ifstream in(argv[1]);
    for (int64_t s; in >> s;) sizes.push_back(s);
    if (sizes.empty()) {
      std::fprintf(stderr, "no sizes in %s\n", argv[1]);
      return 1;
    }
  } else {
    sizes.push_back(25000000);
  }
  int64_t n = 0;
  for (const int64_t s : sizes) n += s;
  std::vector<float> x(n);
  std::mt19937 g(1);
  std::normal_distribution<float> normal;
  for (auto& v : x) v = normal(g);
  std::vector<int64_t> out(n);  // touched once here
  std::vector<int32_t> indices(pairs ? n : 0);
  std::vector<float> values(pairs ? n : 0);
  std::printf("%zu tensor(s), %lld elements%s\n", sizes.size(), static_cast<long long>(n),
              pairs ? ", pass 2 writing pairs" : "");
  for (const double density : {0.001, 0.01, 0.0625, 0.1, 0.25}) {
    double t[4] = {0, 0, 0, 0};
    const int rounds = 5;
    for (int r = 0; r < rounds; ++r) {
      int64_t offset = 0;
      for (const int64_t size : sizes) {
        const int64_t k = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(density * size)));
        const double t0 = cpu_ms();
        TopK<float> topk(x.data() + offset, size, k, 1);
        if (pairs) topk.pairs = gradsparse::select_core::Pairs{indices.data() + offset, values.data() + offset};
        topk.plan(size >= gradsparse::kSampledMinNumel, 0.01, r);
        const double t1 = cpu_ms();
        topk.count();
        const double t2 = cpu_ms();
        const auto kth = topk.kth_key();
        const double t3 = cpu_ms();
        topk.write(kth, out.data() + offset);
        const double t4 = cpu_ms();
        t[0] += t1 - t0;
        t[1] += t2 - t1;
        t[2] += t3 - t2;
        t[3] += t4 - t3;
        offset += size;
      }
    }
    std::printf("density %-6g sample %.2f  pass 1 %.2f  k-th %.2f  pass 2 %.2f  total %.2f ms\n", density,
                t[0] / rounds, t[1] / rounds, t[2] / rounds, t[3] / rounds, (t[0] + t[1] + t[2] + t[3]) / rounds);
  }
}
