#include <vector>

#include "kernels.h"

namespace dinopatch {

void kcenter_greedy_cpu(const float* x, int64_t* out, int64_t L, int64_t N, int64_t D,
                        int64_t k) {
  const auto kcenter_one = active_isa().kcenter_one;
#pragma omp parallel if (L > 1)
  {
    std::vector<double> mean(D);
    std::vector<float> mind(N), dist(N);
#pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < L; ++l)
      kcenter_one(x + l * N * D, N, D, k, out + l * k, mean.data(), mind.data(), dist.data());
  }
}

}  // namespace dinopatch
