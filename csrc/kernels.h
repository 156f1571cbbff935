// CPU kernels of dinopatch._C.  Plain row-major float32 arrays; shapes are
// checked in Python (dinopatch/kernels.py) before any pointer reaches here.
#pragma once
#include <cstdint>

namespace dinopatch {

// out[b, l] = min_k || queries[b, l, :] - bank[l, k, :] ||_2
void min_distance_cpu(const float* queries, const float* bank, float* out,
                      int64_t B, int64_t L, int64_t K, int64_t D);

// For each location l, k indices into x[l] chosen by greedy k-center.
void kcenter_greedy_cpu(const float* x, int64_t* out, int64_t L, int64_t N,
                        int64_t D, int64_t k);

}  // namespace dinopatch
