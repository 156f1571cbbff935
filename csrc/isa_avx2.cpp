// AVX2 inner loops (compiled with -mavx2 -mfma -mf16c; called only on CPUs
// that report avx2, fma and f16c).
#include <immintrin.h>

#include "kernels.h"

namespace dinopatch {
namespace avx2 {

using V = __m256;
constexpr int W = 8;
constexpr int QB = 2, RB = 4;  // 8 accumulators + 4 rows + temporaries of 16 registers
constexpr const char* ISA_NAME = "avx2";
inline V zero() { return _mm256_setzero_ps(); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float to_float(uint16_t x) { return _cvtsh_ss(x); }

#include "lanes_x86.h"
// 8 rows: two 256-bit FMAs per cycle, latency 4; 8 accumulators, the queries
// and a temporary fit the 16 registers.
using Full = Lanes256<8>;
using Half = Lanes128<8>;

#include "simd_body.h"

const IsaKernels table = {ISA_NAME,   packed_size, scratch_size, pack,
                          min_sq_f32, min_sq_f16,  kcenter_one};

}  // namespace avx2

const IsaKernels* isa_avx2() { return &avx2::table; }

}  // namespace dinopatch
