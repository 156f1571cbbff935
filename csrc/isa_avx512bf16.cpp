// AVX-512 with BF16 dot products (compiled with the AVX-512 flags and
// -mavx512bf16; called only on CPUs that report avx512_bf16 too).
//
// A batch of 16 queries at a location does ~200 x 384 multiply-adds per
// query; VDPBF16PS does two per lane per instruction where the exact kernel
// needs a subtraction and an FMA for one.  So full groups of 16 queries are
// screened in bf16 and then refined exactly:
//   1. centre queries and rows on the group's mean query c (distances do not
//      change; the bf16 error scales with |q - c| |b - c|, small when the
//      rows are like the queries, e.g. a plain background);
//   2. A = |q'|^2 + |b'|^2 - 2 bf16(q') . bf16(b'), with a rigorous bound
//      |A - |q - b|^2| <= E (below);
//   3. a row can be the nearest only if A - E <= min over rows of (A + E);
//      those candidates get the exact squared distance by direct differences,
//      as every other path does (an exact match still gives exactly 0).
// A lane whose bounds are not finite (NaN or inf anywhere) is scored exactly
// against every row; a row that is a candidate for many lanes (ties) goes to
// the exact lane kernel.  The rest of a batch goes through the exact kernels.
// The screen pays where few rows survive it (the usual case); a bank of
// duplicate rows, where every row is a candidate, is slower than the exact
// kernel alone, and still exact.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace dinopatch {
namespace avx512bf16 {

#include "avx512_defs.h"

constexpr const char* ISA_NAME = "avx512bf16";
#include "simd_body.h"

constexpr int64_t kGroup = 16, kRows = 8;  // queries per group, rows per block
// A row with this many candidate lanes is refined for all 16 by the exact lane
// kernel (~1 row x 16 lanes per D cycles) rather than lane by lane (~D / 8
// cycles each with the horizontal sum).
constexpr int kDenseLanes = 8;

inline void copy_row(const float* r, int64_t D, float* out) { std::memcpy(out, r, D * sizeof(float)); }
inline void copy_row(const uint16_t* r, int64_t D, float* out) { as_f32(r, D, out); }

// One group of 16 queries in `packed`, in floats:
//   pairs  [P][16][2] bf16 of the centred queries (P = ceil(D / 2))
//   centre [S2] (S2 = D rounded up to 32, zero past D)
//   qn, qa [16] squared norm and norm of each centred query
//   rows   [16][D] the queries as given (the refinement reads them)
//   t      [D + 1][16] the queries transposed, the last row zero (pack's work
//          space, and the exact lane kernel's queries)
struct Layout {
  int64_t P, S2, pairs, centre, qn, qa, rows, t, size;
  explicit Layout(int64_t D) : P((D + 1) / 2), S2((D + 31) / 32 * 32) {
    pairs = 0;
    centre = pairs + kGroup * P;
    qn = centre + S2;
    qa = qn + kGroup;
    rows = qa + kGroup;
    t = rows + kGroup * D;
    size = t + kGroup * (D + 1);
  }
};

// Any batch of up to nq: the groups, then the rest as the exact kernels lay
// it out (fewer groups leave at least Layout::size > 15 D floats each).
int64_t bf_packed_size(int64_t nq, int64_t D) {
  return nq / kGroup * Layout(D).size + packed_size(nq % kGroup, D);
}

// A group's own scratch: a row block in bf16 (kRows x S2), its squared norms
// and norms, the lower bounds of every row (K x 16), and for the exact pass
// kRows fp32 rows with the 16 lane minima and sums.
int64_t own_scratch(int64_t K, int64_t D) {
  return kRows * Layout(D).S2 / 2 + 2 * kRows + kGroup * K + kRows * D + 2 * kGroup;
}

// Then the exact kernels' share, sized for the whole batch (a smaller item of
// the same call may have fewer groups and a larger rest).
int64_t bf_scratch_size(int64_t nq, int64_t K, int64_t D) {
  return own_scratch(K, D) + scratch_size(nq, K, D);
}

inline __mmask16 first(int64_t n) {
  return n <= 0 ? 0 : n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
}
inline V load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline V load_first(const uint16_t* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p));
}

// Two vectors of 16 floats -> 32 bf16 in order (round to nearest even).
inline __m512i to_bf16(V lo, V hi) { return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)); }

void bf_pack(const float* q, int64_t qs, int64_t nq, int64_t D, float* packed) {
  const Layout lay(D);
  // Lane i of pair p: (d = 2p, 2p + 1) of query i, as VDPBF16PS pairs them.
  alignas(64) static const uint16_t interleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                      21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26,
                                                      11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(interleave);
  const int64_t nfull = nq / kGroup;
  for (int64_t g = 0; g < nfull; ++g) {
    const float* qg = q + g * kGroup * qs;
    float* out = packed + g * lay.size;
    float* t = out + lay.t;
    float* centre = out + lay.centre;
    pack_group<kGroup>(qg, qs, kGroup, D, t);
    for (int64_t i = 0; i < kGroup; ++i) t[D * kGroup + i] = 0.f;
    for (int64_t d = 0; d < lay.S2; ++d) centre[d] = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      std::memcpy(out + lay.rows + i * D, qg + i * qs, D * sizeof(float));
      for (int64_t d = 0; d < D; ++d) centre[d] += qg[i * qs + d];
    }
    for (int64_t d = 0; d < D; ++d) centre[d] *= 1.f / kGroup;
    V qn = zero();
    uint16_t* pairs = reinterpret_cast<uint16_t*>(out + lay.pairs);
    for (int64_t p = 0; p < lay.P; ++p) {
      const V v0 = sub(load(t + 2 * p * kGroup), _mm512_set1_ps(centre[2 * p]));
      const V v1 = sub(load(t + (2 * p + 1) * kGroup), _mm512_set1_ps(centre[2 * p + 1]));
      qn = fma(v0, v0, fma(v1, v1, qn));
      _mm512_storeu_si512(pairs + p * 32, _mm512_permutexvar_epi16(order, to_bf16(v0, v1)));
    }
    store(out + lay.qn, qn);
    store(out + lay.qa, _mm512_sqrt_ps(qn));
  }
  pack(q + nfull * kGroup * qs, qs, nq - nfull * kGroup, D, packed + nfull * lay.size);
}

// Row r - centre in bf16 at out (S2 values, zero past D); returns |r - centre|^2
// of the fp32 differences the bound is stated for.
template <typename T>
inline float centre_row(const T* r, const float* centre, int64_t D, int64_t S2, uint16_t* out) {
  V n0 = zero(), n1 = zero();
  for (int64_t d = 0; d < S2; d += 32) {
    const bool whole = d + 32 <= D;  // masked loads only at the end
    const V v0 = sub(whole ? load(r + d) : load_first(r + d, D - d), load(centre + d));
    const V v1 = sub(whole ? load(r + d + 16) : load_first(r + d + 16, D - d - 16),
                     load(centre + d + 16));
    n0 = fma(v0, v0, n0);
    n1 = fma(v1, v1, n1);
    _mm512_storeu_si512(out + d, to_bf16(v0, v1));
  }
  return hsum(_mm512_add_ps(n0, n1));
}

// acc[j] = bf16 dot products of the group's 16 queries with RN rows of rb.
// PF: prefetch `ahead` (RN rows' worth of what follows the location) evenly.
template <int RN, bool PF, typename T>
inline void dots(const uint16_t* pairs, const uint16_t* rb, int64_t S2, int64_t P, V* acc,
                 const T* ahead) {
  for (int j = 0; j < RN; ++j) acc[j] = zero();
  constexpr int64_t step = 64 / (2 * RN * sizeof(T)) > 0 ? 64 / (2 * RN * sizeof(T)) : 1;
  for (int64_t p = 0; p < P; ++p) {
    if (PF && p % step == 0) __builtin_prefetch(ahead + 2 * p * RN, 0, 2);
    const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pairs + p * 32));
    for (int j = 0; j < RN; ++j) {
      int32_t pair;
      std::memcpy(&pair, rb + j * S2 + 2 * p, sizeof pair);
      acc[j] = _mm512_dpbf16_ps(acc[j], qv, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
    }
  }
}

// The error bound E of A against |q - b|^2, with s = |q'| + |b'| and the unit
// roundoffs u = 2^-24 (fp32), 2^-8 (bf16):
//   bf16 products:        (2^-7 + 2^-16) sum |q'_d b'_d| <= ... |q'| |b'|,
//   fp32 sums of D terms: gamma = 1.01 D u, on the dot product and both norms,
//   centring in fp32:     2u s^2;  the last two roundings of A: 2u s^2;
//   denormals flushed by VDPBF16PS: 2^-120 s + 1e-30.
// E = 1.01 (2 (2^-7 + 2^-16 + 1.02 gamma) |q'| |b'| + (gamma + 4u) s^2) + 2^-120 s + 1e-30.
struct Bound {
  V dot, sq;
  explicit Bound(int64_t D) {
    const float u = 0x1p-24f, gamma = 1.01f * static_cast<float>(D) * u;
    dot = _mm512_set1_ps(1.01f * 2.f * (0x1p-7f + 0x1p-16f + 1.02f * gamma));
    sq = _mm512_set1_ps(1.01f * (gamma + 4.f * u));
  }
  V operator()(V qa, V ba) const {
    const V s = _mm512_add_ps(qa, ba);
    const V e = fma(_mm512_mul_ps(dot, qa), ba, _mm512_mul_ps(sq, _mm512_mul_ps(s, s)));
    return fma(s, _mm512_set1_ps(0x1p-120f), _mm512_add_ps(e, _mm512_set1_ps(1e-30f)));
  }
};

template <typename T>
void bf_group(const float* grp, const Layout& lay, const T* rows, int64_t nrows, int64_t D,
              float* best, float* scratch) {
  const uint16_t* pairs = reinterpret_cast<const uint16_t*>(grp + lay.pairs);
  uint16_t* rb = reinterpret_cast<uint16_t*>(scratch);
  float* bn = scratch + kRows * lay.S2 / 2;
  float* ba = bn + kRows;
  float* lower = ba + kRows;
  const Bound bound(D);
  const V qn = load(grp + lay.qn), qa = load(grp + lay.qa);
  V upper = _mm512_set1_ps(__builtin_inff()), finite = zero();
  for (int64_t r = 0; r < nrows; r += kRows) {
    const int64_t n = nrows - r < kRows ? nrows - r : kRows;
    for (int64_t j = 0; j < n; ++j) {
      bn[j] = centre_row(rows + (r + j) * D, grp + lay.centre, D, lay.S2, rb + j * lay.S2);
      ba[j] = __builtin_sqrtf(bn[j]);
    }
    V acc[kRows];
    if (n == kRows)
      dots<kRows, true>(pairs, rb, lay.S2, lay.P, acc, rows + (nrows + r) * D);
    else
      for (int64_t j = 0; j < n; ++j) dots<1, false>(pairs, rb + j * lay.S2, lay.S2, lay.P, acc + j, rows);
    for (int64_t j = 0; j < n; ++j) {
      const V b2 = _mm512_set1_ps(bn[j]);
      const V a = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), acc[j], _mm512_add_ps(qn, b2));
      const V e = bound(qa, _mm512_set1_ps(ba[j]));
      const V lo = sub(a, e);
      upper = _mm512_min_ps(upper, _mm512_add_ps(a, e));
      finite = fma(lo, zero(), finite);  // NaN once a bound is NaN or infinite
      store(lower + (r + j) * kGroup, lo);
    }
  }
  // Exact distances: every row for a lane whose bounds failed, else the
  // candidates; a row that is a candidate for many lanes (ties, such as
  // duplicate rows) goes to the exact lane kernel for all 16 at once.
  const __mmask16 failed = _mm512_cmp_ps_mask(finite, finite, _CMP_UNORD_Q);
  const float* q = grp + lay.rows;
  for (int64_t i = 0; i < kGroup; ++i)
    if (failed >> i & 1) min_sq(q + i * D, 1, rows, nrows, D, best + i, nullptr);
  float* dense = lower + kGroup * nrows;
  float* lbest = dense + kRows * D;
  float* lnan = lbest + kGroup;
  reset_lanes(lbest, lnan, kGroup);
  int64_t nd = 0;
  for (int64_t j = 0; j < nrows; ++j) {
    unsigned m = _mm512_cmp_ps_mask(load(lower + j * kGroup), upper, _CMP_LE_OQ) & ~failed & 0xffffu;
    if (__builtin_popcount(m) >= kDenseLanes) {
      copy_row(rows + j * D, D, dense + nd * D);
      if (++nd == kRows) {
        group_rows<Full>(grp + lay.t, dense, nd, D, lbest, lnan, dense, false);
        nd = 0;
      }
      continue;
    }
    for (; m; m &= m - 1) {
      const int i = __builtin_ctz(m);
      keep_min(best[i], row_seq(q + i * D, rows + j * D, D));
    }
  }
  if (nd) group_rows<Full>(grp + lay.t, dense, nd, D, lbest, lnan, dense, false);
  merge_lanes(lbest, lnan, kGroup, best);
}

template <typename T>
void bf_min_sq(const float* packed, int64_t nq, const T* rows, int64_t nrows, int64_t D,
               float* best, float* scratch) {
  const Layout lay(D);
  const int64_t nfull = nq / kGroup;
  for (int64_t g = 0; g < nfull; ++g)
    bf_group(packed + g * lay.size, lay, rows, nrows, D, best + g * kGroup, scratch);
  if (nq > nfull * kGroup)
    min_sq(packed + nfull * lay.size, nq - nfull * kGroup, rows, nrows, D, best + nfull * kGroup,
           scratch + own_scratch(nrows, D));
}

void bf_min_sq_f32(const float* packed, int64_t nq, const float* rows, int64_t nrows, int64_t D,
                   float* best, float* scratch) {
  bf_min_sq(packed, nq, rows, nrows, D, best, scratch);
}

void bf_min_sq_f16(const float* packed, int64_t nq, const uint16_t* rows, int64_t nrows,
                   int64_t D, float* best, float* scratch) {
  bf_min_sq(packed, nq, rows, nrows, D, best, scratch);
}

const IsaKernels table = {ISA_NAME,      bf_packed_size, bf_scratch_size, bf_pack,
                          bf_min_sq_f32, bf_min_sq_f16,  kcenter_one};

}  // namespace avx512bf16

const IsaKernels* isa_avx512bf16() { return &avx512bf16::table; }

}  // namespace dinopatch
