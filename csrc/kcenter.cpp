#include <limits>
#include <vector>

#include "kernels.h"

namespace dinopatch {

namespace {

float sqdist(const float* a, const float* b, int64_t D) {
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float t = a[d] - b[d];
    acc += t * t;
  }
  return acc;
}

}  // namespace

void kcenter_greedy_cpu(const float* x, int64_t* out, int64_t L, int64_t N,
                        int64_t D, int64_t k) {
#pragma omp parallel for schedule(dynamic)
  for (int64_t l = 0; l < L; ++l) {
    const float* xl = x + l * N * D;
    int64_t* ol = out + l * k;
    // First centre: the row nearest the location's mean, so the result does
    // not depend on a random draw.
    std::vector<float> mean(D, 0.f);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) mean[d] += xl[n * D + d];
    for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<float>(N);
    std::vector<float> mind(N);
    int64_t c = 0;
    float best = std::numeric_limits<float>::infinity();
    for (int64_t n = 0; n < N; ++n) {
      const float v = sqdist(xl + n * D, mean.data(), D);
      if (v < best) { best = v; c = n; }
    }
    for (int64_t n = 0; n < N; ++n) mind[n] = std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < k; ++j) {
      ol[j] = c;
      const float* cen = xl + c * D;
      int64_t next = 0;
      float far = -1.f;
      for (int64_t n = 0; n < N; ++n) {
        const float v = sqdist(xl + n * D, cen, D);
        if (v < mind[n]) mind[n] = v;
        if (mind[n] > far) { far = mind[n]; next = n; }
      }
      c = next;
    }
  }
}

}  // namespace dinopatch
