#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"

namespace dinopatch {

void min_distance_cpu(const float* queries, const float* bank, float* out,
                      int64_t B, int64_t L, int64_t K, int64_t D) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t b = 0; b < B; ++b) {
      const float* q = queries + (b * L + l) * D;
      float best = std::numeric_limits<float>::infinity();
      for (int64_t k = 0; k < K; ++k) {
        const float* r = bank + (l * K + k) * D;
        // Direct differences: the |q|^2+|b|^2-2qb expansion cancels near zero.
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float t = q[d] - r[d];
          acc += t * t;
        }
        best = std::min(best, acc);
      }
      out[b * L + l] = std::sqrt(best);
    }
  }
}

}  // namespace dinopatch
