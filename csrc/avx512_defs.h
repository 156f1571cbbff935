// AVX-512 vectors and lane sets for simd_body.h, shared by isa_avx512.cpp and
// isa_avx512bf16.cpp.  Included INSIDE their ISA namespaces (after
// <immintrin.h>), so each compiles its own copy with its own flags.
using V = __m512;
constexpr int W = 16;
constexpr int QB = 4, RB = 4;  // 16 accumulators + 4 rows + temporaries of 32 registers
inline V zero() { return _mm512_setzero_ps(); }
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
// 4 rows: one 512-bit FMA per cycle, latency 4, so four independent accumulators hide the latency;
// 8 rows for 256-bit vectors: two FMAs per cycle.
using Full = Lanes512<4>;
using Half = Lanes256<8>;

// 16 x 16 floats: out[t][i] = rows[i][d + t], in registers (pack's transpose
// of a batch of 16; the compiler's version of the same tile is far slower).
#define DINOPATCH_TRANSPOSE16
inline void transpose16(const float* const* rows, int64_t d, float* out) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    const __m512 r0 = _mm512_loadu_ps(rows[i] + d), r1 = _mm512_loadu_ps(rows[i + 1] + d);
    a[i] = _mm512_unpacklo_ps(r0, r1);
    a[i + 1] = _mm512_unpackhi_ps(r0, r1);
  }
  for (int i = 0; i < 16; i += 4)
    for (int k = 0; k < 2; ++k) {
      const __m512d x = _mm512_castps_pd(a[i + k]), y = _mm512_castps_pd(a[i + 2 + k]);
      b[i + k] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
      b[i + 2 + k] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
    }
  // b[4g + m], 128-bit lane L: element 4L + o(m) of rows 4g..4g+3, with
  // o = 0, 2, 1, 3 for m = 0..3.  Gather lane L of b[m], b[4 + m], b[8 + m],
  // b[12 + m] into one vector: lanes h and h + 2 in two rounds.
  for (int m = 0; m < 4; ++m)
    for (int h = 0; h < 2; ++h) {
      const int imm = h ? 0xdd : 0x88;
      a[2 * m + h] = _mm512_shuffle_f32x4(b[m], b[4 + m], imm);
      a[8 + 2 * m + h] = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], imm);
    }
  for (int m = 0; m < 4; ++m)
    for (int h = 0; h < 2; ++h) {
      const int o = (m & 1) * 2 + (m >> 1);
      const __m512 x = a[2 * m + h], y = a[8 + 2 * m + h];
      _mm512_storeu_ps(out + (4 * h + o) * 16, _mm512_shuffle_f32x4(x, y, 0x88));
      _mm512_storeu_ps(out + (8 + 4 * h + o) * 16, _mm512_shuffle_f32x4(x, y, 0xdd));
    }
}
