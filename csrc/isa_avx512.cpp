// AVX-512 inner loops (compiled with -mavx512f/bw/vl/dq -mfma -mf16c; called
// only on CPUs that report all of them).
#include <immintrin.h>

#include "kernels.h"

namespace dinopatch {
namespace avx512 {

using V = __m512;
constexpr int W = 16;
constexpr int QB = 4, RB = 4;  // 16 accumulators + 4 rows + temporaries of 32 registers
constexpr const char* ISA_NAME = "avx512";
inline V zero() { return _mm512_setzero_ps(); }
inline V load_one() { return _mm512_set1_ps(1.f); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store(float* p, V a) { _mm512_storeu_ps(p, a); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(V a) { return _mm512_reduce_add_ps(a); }
inline float to_float(uint16_t x) { return _cvtsh_ss(x); }

#include "lanes_x86.h"
// 4 rows: one 512-bit FMA per cycle, latency 4 (more rows measured slower);
// 8 rows for 256-bit vectors: two FMAs per cycle.
using Full = Lanes512<4>;
using Half = Lanes256<8>;

#include "simd_body.h"

}  // namespace avx512

const IsaKernels* isa_avx512() { return &avx512::table; }

}  // namespace dinopatch
