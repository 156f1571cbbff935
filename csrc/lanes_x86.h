// Lane sets of the batch kernel in simd_body.h: a vector of W queries and RB
// bank rows per register block.  Included INSIDE an x86 ISA namespace (after
// <immintrin.h>), so each ISA compiles its own copy with its own flags.  The
// three widths differ only in the intrinsics' prefix P.
#define DINOPATCH_LANES(NAME, VEC, WIDTH, P)                              \
  template <int ROWS>                                                    \
  struct NAME {                                                          \
    using V = VEC;                                                       \
    static constexpr int W = WIDTH, RB = ROWS;                           \
    static V zero() { return P##_setzero_ps(); }                         \
    static V load(const float* p) { return P##_loadu_ps(p); }            \
    static void store(float* p, V a) { P##_storeu_ps(p, a); }            \
    static V bsub(V a, float x) { return P##_sub_ps(a, P##_set1_ps(x)); } \
    static V fma(V a, V b, V c) { return P##_fmadd_ps(a, b, c); }        \
    static V min(V a, V b) { return P##_min_ps(a, b); }                  \
    static V add(V a, V b) { return P##_add_ps(a, b); }                  \
  };

DINOPATCH_LANES(Lanes128, __m128, 4, _mm)
DINOPATCH_LANES(Lanes256, __m256, 8, _mm256)
#ifdef __AVX512F__
DINOPATCH_LANES(Lanes512, __m512, 16, _mm512)
#endif
#undef DINOPATCH_LANES
