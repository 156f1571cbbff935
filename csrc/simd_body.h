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
// PF: prefetch the rows two blocks ahead in step; one query block per row
// block issues them.  On a shared Zen 4 this measured 0-25% faster with the
// bank in DRAM (noisy); 1-8 blocks ahead, L1 or L2, and 8x2, 6x4, 8x3 or 16x1
// register blocks made no clear difference.
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
      for (int j = 0; j < RN; ++j) __builtin_prefetch(r + (2 * RN + j) * D + d);
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
  // The remaining < QB queries in blocks of 4, 2, 1.
  if (QB > 4 && i + 4 <= nq) {
    block<4, RN, true>(q + i * qs, qs, r, D, best + i);
    i += 4;
  }
  if (i + 2 <= nq) {
    block<2, RN, true>(q + i * qs, qs, r, D, best + i);
    i += 2;
  }
  if (i < nq) block<1, RN, true>(q + i * qs, qs, r, D, best + i);
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
  // Batches are compute-bound per row but stall on the first touch of each
  // row block; so while a block is computed, the same share of the memory
  // that follows these rows (in a full bank, the next location: the caller's
  // next work item) is fetched into L2, in address order.  Measured with the
  // bank in DRAM, one thread: batch 16 1.38 -> 1.80, batch 4 0.62 -> 1.2 G
  // vector-pairs/s.
  constexpr int64_t line = 64 / sizeof(T);
  for (; r + RB <= nrows; r += RB) {
    const T* ahead = rows + (nrows + r) * D;
    for (int64_t e = 0; e < RB * D; e += line) __builtin_prefetch(ahead + e, 0, 2);
    row_block<RB>(q, qs, nq, rows + r * D, D, best);
  }
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

// Greedy k-center at one location (see kcenter_greedy_cpu); compiled per ISA
// so the double-precision set-up loops are vectorised too.  mean: D doubles,
// mind and dist: N floats of scratch.
void kcenter_one(const float* x, int64_t N, int64_t D, int64_t k, int64_t* out, double* mean,
                 float* mind, float* dist) {
  // First centre: the row nearest the mean, in double like the numpy
  // reference, so the result does not depend on a random draw.
  for (int64_t d = 0; d < D; ++d) mean[d] = 0.0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) mean[d] += x[n * D + d];
  for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<double>(N);
  int64_t c = 0;
  double nearest = __builtin_inf();
  for (int64_t n = 0; n < N; ++n) {
    // Eight partial sums: independent chains the compiler can vectorise.
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int j = 0; j < 8; ++j) {
        const double t = x[n * D + d + j] - mean[d + j];
        part[j] += t * t;
      }
    double v = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; d < D; ++d) {
      const double t = x[n * D + d] - mean[d];
      v += t * t;
    }
    if (v < nearest) {
      nearest = v;
      c = n;
    }
  }
  for (int64_t n = 0; n < N; ++n) mind[n] = __builtin_inff();
  for (int64_t j = 0; j < k; ++j) {
    out[j] = c;
    sq_dist(x + c * D, x, N, D, dist);
    // Running minimum over the centres so far; the next centre is the
    // farthest row, the first index on ties (as np.argmax).
    int64_t next = 0;
    float far = -1.f;
    for (int64_t n = 0; n < N; ++n) {
      const float v = dist[n] < mind[n] ? dist[n] : mind[n];
      mind[n] = v;
      if (v > far) {
        far = v;
        next = n;
      }
    }
    c = next;
  }
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

const IsaKernels table = {ISA_NAME, min_sq_f32, min_sq_f16, kcenter_one, sum};
