// CPU kernels of dinopatch._C.  Plain row-major arrays; shapes are checked in
// Python (dinopatch/kernels.py) and again in bindings.cpp before any pointer
// reaches here.
#pragma once
#include <cstdint>

namespace dinopatch {

// Widest vector in queries (pack's padding), and the rows min_sq takes per
// block (widened from fp16 in scratch).
constexpr int64_t kMaxLanes = 16, kRowBlock = 8;

// The SIMD inner loops, one table per instruction set (isa_*.cpp).  Each file
// is compiled with its own -m flags and only ever called after a run-time
// check of the CPU, so one build runs on CPUs with and without AVX-512.
struct IsaKernels {
  const char* name;
  // Floats of pack's output for nq queries, and of min_sq's scratch for nq
  // queries against rows of up to K.
  int64_t (*packed_size)(int64_t nq, int64_t D);
  int64_t (*scratch_size)(int64_t nq, int64_t K, int64_t D);
  // Lay out nq queries (q + i * q_stride) for min_sq into packed: a batch goes
  // across the vector lanes.
  void (*pack)(const float* q, int64_t q_stride, int64_t nq, int64_t D, float* packed);
  // best[i] <- min(best[i], ||q_i - row_r||^2 over r < nrows), q packed by pack.
  // NaN propagates: a NaN query (or row) leaves best[i] NaN.
  void (*min_sq_f32)(const float* packed, int64_t nq, const float* rows, int64_t nrows,
                     int64_t D, float* best, float* scratch);
  void (*min_sq_f16)(const float* packed, int64_t nq, const uint16_t* rows, int64_t nrows,
                     int64_t D, float* best, float* scratch);
  // Greedy k-center at one location x [N, D] -> out [k]; scratch: mean [D],
  // mind and dist [N].
  void (*kcenter_one)(const float* x, int64_t N, int64_t D, int64_t k, int64_t* out,
                      double* mean, float* mind, float* dist);
};

const IsaKernels* isa_generic();
#ifdef DINOPATCH_X86_ISAS
const IsaKernels* isa_avx2();
const IsaKernels* isa_avx512();
#endif
#ifdef DINOPATCH_BF16
const IsaKernels* isa_avx512bf16();
#endif

// The instruction sets this CPU and build support, best first.
const char* const* supported_isas(int* n);
// Select by name (one of supported_isas); returns false when not supported.
bool set_isa(const char* name);
const IsaKernels& active_isa();

// out[b, l] = min over locations m within radius Chebyshev steps of l on the
// h x w grid, and rows k < counts[m] (K when counts is null), of
// ||queries[b, l] - bank[m, k]||_2.  The radius at l is radii[l] (a tolerance
// map, each value in [0, max(h, w)]), or `radius` everywhere when radii is null.
void min_distance_cpu(const float* queries, const float* bank, const int64_t* counts, float* out,
                      int64_t B, int64_t L, int64_t K, int64_t D, int64_t h, int64_t w,
                      int64_t radius, const int32_t* radii);
void min_distance_cpu(const float* queries, const uint16_t* bank, const int64_t* counts,
                      float* out, int64_t B, int64_t L, int64_t K, int64_t D, int64_t h,
                      int64_t w, int64_t radius, const int32_t* radii);

// For each location l, k indices into x[l] chosen by greedy k-center.
void kcenter_greedy_cpu(const float* x, int64_t* out, int64_t L, int64_t N, int64_t D, int64_t k);

}  // namespace dinopatch
