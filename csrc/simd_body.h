// The SIMD inner loops shared by isa_*.cpp.  Included INSIDE an ISA namespace
// that defines: V, W (lanes), QB x RB (register block: queries x bank rows),
// zero, load(float*), load(uint16_t*), sub, fma, hsum, to_float(uint16_t).
// No standard-library templates here: every symbol must stay in the ISA
// namespace so no AVX-512 code leaks into a generic caller through the linker.

inline float as_float(float x) { return x; }
inline float as_float(uint16_t x) { return to_float(x); }

// NaN-propagating running minimum.
inline void keep_min(float& best, float v) {
  if (best == best && (v < best || v != v)) best = v;
}

// ||q_i - r_j||^2 for a QN x RN block of queries and rows, by direct
// differences (exact matches give exactly 0); QN*RN vector accumulators.
// PF: prefetch the next RN rows in step.  The rows are read as RN
// interleaved streams, which the hardware prefetchers follow poorly (batch 1
// reached a third of the read bandwidth without this).
template <int QN, int RN, bool PF, typename T>
inline void block(const float* q, int64_t qs, const T* r, int64_t D, float* best) {
  V acc[QN][RN];
  for (int i = 0; i < QN; ++i)
    for (int j = 0; j < RN; ++j) acc[i][j] = zero();
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    V rv[RN];
    for (int j = 0; j < RN; ++j) rv[j] = load(r + j * D + d);
    if (PF)
      for (int j = 0; j < RN; ++j) __builtin_prefetch(r + (RN + j) * D + d);
    for (int i = 0; i < QN; ++i) {
      const V qv = load(q + i * qs + d);
      for (int j = 0; j < RN; ++j) {
        const V t = sub(qv, rv[j]);
        acc[i][j] = fma(t, t, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < QN; ++i)
    for (int j = 0; j < RN; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t e = d; e < D; ++e) {
        const float t = q[i * qs + e] - as_float(r[j * D + e]);
        s += t * t;
      }
      keep_min(best[i], s);
    }
}

// One query against one row, four accumulators along D: the rows are read
// strictly in address order, which the hardware prefetchers follow at full
// bandwidth (batch 1 is memory-bound).
template <typename T>
inline float row_seq(const float* q, const T* r, int64_t D) {
  V a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
  int64_t d = 0;
  for (; d + 4 * W <= D; d += 4 * W) {
    const V t0 = sub(load(q + d), load(r + d));
    const V t1 = sub(load(q + d + W), load(r + d + W));
    const V t2 = sub(load(q + d + 2 * W), load(r + d + 2 * W));
    const V t3 = sub(load(q + d + 3 * W), load(r + d + 3 * W));
    a0 = fma(t0, t0, a0);
    a1 = fma(t1, t1, a1);
    a2 = fma(t2, t2, a2);
    a3 = fma(t3, t3, a3);
  }
  for (; d + W <= D; d += W) {
    const V t = sub(load(q + d), load(r + d));
    a0 = fma(t, t, a0);
  }
  float s = hsum(a0) + hsum(a1) + hsum(a2) + hsum(a3);
  for (; d < D; ++d) {
    const float t = q[d] - as_float(r[d]);
    s += t * t;
  }
  return s;
}

template <int RN, typename T>
inline void row_block(const float* q, int64_t qs, int64_t nq, const T* r, int64_t D, float* best) {
  int64_t i = 0;
  if (nq >= QB) {  // the first query block fetches the next rows for all
    block<QB, RN, true>(q, qs, r, D, best);
    i = QB;
  }
  for (; i + QB <= nq; i += QB) block<QB, RN, false>(q + i * qs, qs, r, D, best + i);
  switch (nq - i) {  // QB <= 4 in every ISA
    case 1: block<1, RN, true>(q + i * qs, qs, r, D, best + i); break;
    case 2: block<2, RN, true>(q + i * qs, qs, r, D, best + i); break;
    case 3: block<3, RN, true>(q + i * qs, qs, r, D, best + i); break;
    default: break;
  }
}

// Rows outer, queries inner: a block of RB rows is loaded from memory once and
// then served from L1 to every query of the batch.
template <typename T>
void min_sq(const float* q, int64_t qs, int64_t nq, const T* rows, int64_t nrows, int64_t D,
            float* best) {
  int64_t r = 0;
  if (nq == 1) {
    for (; r < nrows; ++r) keep_min(*best, row_seq(q, rows + r * D, D));
    return;
  }
  for (; r + RB <= nrows; r += RB) row_block<RB>(q, qs, nq, rows + r * D, D, best);
  for (; r < nrows; ++r) row_block<1>(q, qs, nq, rows + r * D, D, best);
}

void min_sq_f32(const float* q, int64_t qs, int64_t nq, const float* rows, int64_t nrows,
                int64_t D, float* best) {
  min_sq(q, qs, nq, rows, nrows, D, best);
}

void min_sq_f16(const float* q, int64_t qs, int64_t nq, const uint16_t* rows, int64_t nrows,
                int64_t D, float* best) {
  min_sq(q, qs, nq, rows, nrows, D, best);
}

template <int RN>
inline void dist_block(const float* c, const float* r, int64_t D, float* out) {
  V acc[RN];
  for (int j = 0; j < RN; ++j) acc[j] = zero();
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const V cv = load(c + d);
    for (int j = 0; j < RN; ++j) {
      const V t = sub(cv, load(r + j * D + d));
      acc[j] = fma(t, t, acc[j]);
    }
  }
  for (int j = 0; j < RN; ++j) {
    float s = hsum(acc[j]);
    for (int64_t e = d; e < D; ++e) {
      const float t = c[e] - r[j * D + e];
      s += t * t;
    }
    out[j] = s;
  }
}

void sq_dist(const float* c, const float* rows, int64_t nrows, int64_t D, float* out) {
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) dist_block<4>(c, rows + r * D, D, out + r);
  for (; r < nrows; ++r) dist_block<1>(c, rows + r * D, D, out + r);
}

double sum(const float* x, int64_t n) {
  V a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
  const V one = load_one();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = fma(load(x + i), one, a0);
    a1 = fma(load(x + i + W), one, a1);
    a2 = fma(load(x + i + 2 * W), one, a2);
    a3 = fma(load(x + i + 3 * W), one, a3);
  }
  double s = static_cast<double>(hsum(a0)) + hsum(a1) + hsum(a2) + hsum(a3);
  for (; i < n; ++i) s += x[i];
  return s;
}

const IsaKernels table = {ISA_NAME, min_sq_f32, min_sq_f16, sq_dist, sum};
