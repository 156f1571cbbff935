#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace dinopatch {

namespace {

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// isa: read once per call, so pack, the buffer sizes and min_sq agree even if
// set_isa runs meanwhile.
template <typename T, typename Fn>
void run(const IsaKernels& isa, Fn min_sq, const float* queries, const T* bank, const int64_t* counts, float* out,
         int64_t B, int64_t L, int64_t K, int64_t D, int64_t h, int64_t w, int64_t radius,
         const int32_t* radii) {
  // Work items are (location, chunk of the batch).  A whole batch per item
  // reads each bank tile once for all its queries; the batch is split only
  // when there are too few locations to keep every thread busy.
  const int64_t want = 4 * static_cast<int64_t>(max_threads());
  int64_t chunks = L >= want ? 1 : std::min<int64_t>(B, (want + L - 1) / L);
  const int64_t chunk = (B + chunks - 1) / chunks;
  chunks = (B + chunk - 1) / chunk;
  const int64_t items = L * chunks;
  const int64_t run = std::max<int64_t>(1, std::min<int64_t>(8, items / want));
  // One item: no team, so a busy machine cannot stall it on a sleeping thread.
#pragma omp parallel if (items > 1)
  {
    std::vector<float> best(chunk), packed(isa.packed_size(chunk, D)),
        scratch(isa.scratch_size(chunk, K, D));
    // Runs of up to 8 consecutive items per thread: min_sq prefetches the
    // next location's rows into this core's L2.
#pragma omp for schedule(dynamic, run)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t l = it / chunks, b0 = (it % chunks) * chunk;
      const int64_t nq = std::min(chunk, B - b0);
      std::fill(best.begin(), best.begin() + nq, std::numeric_limits<float>::infinity());
      const int64_t y = l / w, x = l % w, r = radii ? radii[l] : radius;
      // Packed once per item for every neighbouring location it is scored at;
      // also a contiguous copy: the batch's queries lie L*D floats apart, a
      // power-of-two multiple for the usual grids, in the same cache sets.
      isa.pack(queries + (b0 * L + l) * D, L * D, nq, D, packed.data());
      for (int64_t yy = std::max<int64_t>(0, y - r); yy <= std::min(h - 1, y + r); ++yy)
        for (int64_t xx = std::max<int64_t>(0, x - r); xx <= std::min(w - 1, x + r); ++xx) {
          const int64_t m = yy * w + xx;
          min_sq(packed.data(), nq, bank + m * K * D, counts ? counts[m] : K, D, best.data(),
                 scratch.data());
        }
      for (int64_t i = 0; i < nq; ++i) out[(b0 + i) * L + l] = std::sqrt(best[i]);
    }
  }
}

}  // namespace

void min_distance_cpu(const float* queries, const float* bank, const int64_t* counts, float* out,
                      int64_t B, int64_t L, int64_t K, int64_t D, int64_t h, int64_t w,
                      int64_t radius, const int32_t* radii) {
  const IsaKernels& isa = active_isa();
  run(isa, isa.min_sq_f32, queries, bank, counts, out, B, L, K, D, h, w, radius, radii);
}

void min_distance_cpu(const float* queries, const uint16_t* bank, const int64_t* counts,
                      float* out, int64_t B, int64_t L, int64_t K, int64_t D, int64_t h,
                      int64_t w, int64_t radius, const int32_t* radii) {
  const IsaKernels& isa = active_isa();
  run(isa, isa.min_sq_f16, queries, bank, counts, out, B, L, K, D, h, w, radius, radii);
}

}  // namespace dinopatch
