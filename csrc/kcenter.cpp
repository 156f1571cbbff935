#include <limits>
#include <vector>

#include "kernels.h"

namespace dinopatch {

void kcenter_greedy_cpu(const float* x, int64_t* out, int64_t L, int64_t N, int64_t D,
                        int64_t k) {
  const auto sq_dist = active_isa().sq_dist;
#pragma omp parallel
  {
    std::vector<double> mean(D);
    std::vector<float> mind(N), dist(N);
#pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < L; ++l) {
      const float* xl = x + l * N * D;
      int64_t* ol = out + l * k;
      // First centre: the row nearest the location's mean (double, like the
      // numpy reference), so the result does not depend on a random draw.
      std::fill(mean.begin(), mean.end(), 0.0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < D; ++d) mean[d] += xl[n * D + d];
      for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<double>(N);
      int64_t c = 0;
      double nearest = std::numeric_limits<double>::infinity();
      for (int64_t n = 0; n < N; ++n) {
        double v = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double t = xl[n * D + d] - mean[d];
          v += t * t;
        }
        if (v < nearest) { nearest = v; c = n; }
      }
      std::fill(mind.begin(), mind.end(), std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < k; ++j) {
        ol[j] = c;
        sq_dist(xl + c * D, xl, N, D, dist.data());
        // Running minimum over the centres so far; the next centre is the
        // farthest row, the first index on ties (as np.argmax).
        int64_t next = 0;
        float far = -1.f;
        for (int64_t n = 0; n < N; ++n) {
          const float v = dist[n] < mind[n] ? dist[n] : mind[n];
          mind[n] = v;
          if (v > far) { far = v; next = n; }
        }
        c = next;
      }
    }
  }
}

}  // namespace dinopatch
