// The SIMD inner loops shared by isa_*.cpp.  Included INSIDE an ISA namespace
// that defines: V, W (lanes), QB x RB (register block: queries x bank rows),
// zero, load(float*), load(uint16_t*), store, sub, fma, hsum,
// to_float(uint16_t); and two lane sets Full and Half (a batch's
// queries across the lanes, Half::W <= Full::W), each with V, W, RB (rows per
// register block), zero, load, store, bsub(v, x) = v - broadcast(x), fma,
// min, add.
// No standard-library templates here: every symbol must stay in the ISA
// namespace so no AVX-512 code leaks into a generic caller through the linker.

inline float as_float(float x) { return x; }
inline float as_float(uint16_t x) { return to_float(x); }

// NaN-propagating running minimum.
inline void keep_min(float& best, float v) {
  if (best == best && (v < best || v != v)) best = v;
}

// A batch is scored with its queries across the lanes of a vector: a group
// of queries is packed as [D][G::W] (lane = query) and each bank value is
// broadcast against it.  Every accumulator then holds finished distances (no
// horizontal sums), and a row is read once for the whole group.  This keeps
// the core near its subtract+FMA rate, where query-major register blocks
// (4 queries x 4 rows) spend a horizontal sum on every pair and read each row
// once per block of queries instead of once per batch.

static_assert(Full::W <= kMaxLanes && Half::W <= Full::W, "pack pads to kMaxLanes");
static_assert(Full::RB <= kRowBlock && Half::RB <= kRowBlock, "a register block fits a row block");

// The lane group that starts at query q0 of nq: its queries n and lanes.
// Full::W queries at a time; 9-15 left on AVX-512 fill a padded 512-bit
// group, exactly 8 a 256-bit one; fewer than Half::W left (false) go
// query-major.
inline bool next_group(int64_t nq, int64_t q0, int64_t* n, int64_t* lanes) {
  const int64_t left = nq - q0;
  if (left < Half::W) return false;
  *n = left < Full::W ? left : Full::W;
  *lanes = *n > Half::W ? Full::W : Half::W;
  return true;
}

// n <= LANES queries as [D][LANES]; the spare lanes repeat query 0 (their
// results are never read).  Through a LANES x 16 tile of constant shape, so
// the compiler can keep it in registers (an element-wise transpose goes
// through memory and costs a noticeable share of a batch), or the ISA's own
// 16 x 16 transpose.
template <int LANES>
inline void pack_group(const float* q, int64_t qs, int64_t n, int64_t D, float* out) {
  constexpr int T = 16;
  const float* rows[LANES];
  for (int i = 0; i < LANES; ++i) rows[i] = q + (i < n ? i : 0) * qs;
  int64_t d = 0;
#ifdef DINOPATCH_TRANSPOSE16
  if (LANES == 16)
    for (; d + 16 <= D; d += 16) transpose16(rows, d, out + d * 16);
#endif
  for (; d + T <= D; d += T) {
    float tile[LANES][T];
    for (int i = 0; i < LANES; ++i)
      for (int t = 0; t < T; ++t) tile[i][t] = rows[i][d + t];
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < LANES; ++i) out[(d + t) * LANES + i] = tile[i][t];
  }
  for (; d < D; ++d)
    for (int i = 0; i < LANES; ++i) out[d * LANES + i] = rows[i][d];
}

// Floats pack and min_sq need for a batch of nq (rows of K, of D values).
int64_t packed_size(int64_t nq, int64_t D) { return (nq + kMaxLanes) * D; }
int64_t scratch_size(int64_t nq, int64_t, int64_t D) { return kRowBlock * D + 2 * (nq + kMaxLanes); }

// Lay out q (nq rows, qs floats apart) for min_sq at packed: the lane
// groups of next_group, the one at q0 from packed + q0 * D, then the
// queries left over as plain rows.
void pack(const float* q, int64_t qs, int64_t nq, int64_t D, float* packed) {
  int64_t q0 = 0, n, lanes;
  if (nq > 1)
    for (; next_group(nq, q0, &n, &lanes); q0 += n) {
      if (lanes == Full::W)
        pack_group<Full::W>(q + q0 * qs, qs, n, D, packed + q0 * D);
      else
        pack_group<Half::W>(q + q0 * qs, qs, n, D, packed + q0 * D);
    }
  for (; q0 < nq; ++q0)
    for (int64_t d = 0; d < D; ++d) packed[q0 * D + d] = q[q0 * qs + d];
}

// ||q - r_j||^2 for the G::W packed queries qt and RN consecutive rows r,
// folded into the lane minima lbest and the lane sums lnan (a NaN stays NaN
// in a sum of squares; the minimum alone would drop it).  PF: prefetch
// `ahead`, RN rows' worth of the memory after the current location, evenly
// along the loop over D; requesting the next location in one burst per block
// leaves the batch stalled on its first touch when the bank is in DRAM.
template <class G, int RN, bool PF, typename T>
inline void lane_block(const float* qt, const float* r, int64_t D, float* lbest, float* lnan,
                       const T* ahead) {
  using LV = typename G::V;
  LV acc[RN];
  for (int j = 0; j < RN; ++j) acc[j] = G::zero();
  // One cache line of `ahead` per `step` values of d.
  constexpr int64_t step = 64 / (RN * sizeof(T)) > 0 ? 64 / (RN * sizeof(T)) : 1;
  for (int64_t d = 0; d < D; ++d) {
    if (PF && d % step == 0) __builtin_prefetch(ahead + d * RN, 0, 2);
    const LV qv = G::load(qt + d * G::W);
    for (int j = 0; j < RN; ++j) {
      const LV t = G::bsub(qv, r[j * D + d]);
      acc[j] = G::fma(t, t, acc[j]);
    }
  }
  LV best = G::load(lbest), nan = G::load(lnan);
  for (int j = 0; j < RN; ++j) {
    best = G::min(best, acc[j]);
    nan = G::add(nan, acc[j]);
  }
  G::store(lbest, best);
  G::store(lnan, nan);
}

// Lane minima and NaN sums (lane_block) before the first row, and folded
// into best after the last.
inline void reset_lanes(float* lbest, float* lnan, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    lbest[i] = __builtin_inff();
    lnan[i] = 0.f;
  }
}
inline void merge_lanes(const float* lbest, const float* lnan, int64_t n, float* best) {
  for (int64_t i = 0; i < n; ++i) keep_min(best[i], lnan[i] == lnan[i] ? lbest[i] : lnan[i]);
}

// n fp32 rows r against one packed group, G::RB rows at a time (enough
// independent accumulators to cover the FMA latency).
template <class G, typename T>
inline void group_rows(const float* qt, const float* r, int64_t n, int64_t D, float* lbest,
                       float* lnan, const T* ahead, bool pf) {
  int64_t j = 0;
  for (; j + G::RB <= n; j += G::RB) {
    if (pf)
      lane_block<G, G::RB, true>(qt, r + j * D, D, lbest, lnan, ahead + j * D);
    else
      lane_block<G, G::RB, false>(qt, r + j * D, D, lbest, lnan, ahead);
  }
  for (; j < n; ++j) lane_block<G, 1, false>(qt, r + j * D, D, lbest, lnan, ahead);
}

inline const float* as_f32(const float* rows, int64_t, float*) { return rows; }
// fp16 rows are widened once per block, into L1, for all groups of the batch.
inline const float* as_f32(const uint16_t* rows, int64_t n, float* buf) {
  int64_t e = 0;
  for (; e + W <= n; e += W) store(buf + e, load(rows + e));
  for (; e < n; ++e) buf[e] = to_float(rows[e]);
  return buf;
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

// ||q_i - r_j||^2 for a QN x RN block of queries and rows, by direct
// differences (exact matches give exactly 0); QN*RN vector accumulators.
// PF: prefetch the rows two blocks ahead in step; one query block per row
// block issues them, so a bank in DRAM arrives before it is needed.  The
// distance and the register block shape are not critical: other distances,
// cache levels and shapes (8x2, 6x4, 8x3, 16x1) do about as well.
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

// Small batches (fewer queries than Half::W) are memory-bound: they go
// query-major, a QB x RB register block per step, with no transpose and no
// padded lanes.  A block of RB rows is loaded from memory once and then
// served from L1 to every query; `ahead` (may be null): the memory that
// follows the rows, fetched into L2 a block's share at a time, since batches
// stall on the first touch of each row block (one thread, bank in DRAM,
// batch 4: 0.62 -> 1.2 G vector-pairs/s).
template <typename T>
void query_major(const float* q, int64_t nq, const T* rows, int64_t nrows, int64_t D, float* best,
                 const T* ahead) {
  constexpr int64_t line = 64 / sizeof(T);
  int64_t r = 0;
  for (; r + RB <= nrows; r += RB) {
    if (ahead)
      for (int64_t e = 0; e < RB * D; e += line) __builtin_prefetch(ahead + r * D + e, 0, 2);
    row_block<RB>(q, D, nq, rows + r * D, D, best);
  }
  for (; r < nrows; ++r) row_block<1>(q, D, nq, rows + r * D, D, best);
}

// best[i] <- min(best[i], ||q_i - row||^2 over the rows), q packed by pack().
template <typename T>
void min_sq(const float* packed, int64_t nq, const T* rows, int64_t nrows, int64_t D, float* best,
            float* scratch) {
  if (nq == 1) {
    for (int64_t r = 0; r < nrows; ++r) keep_min(*best, row_seq(packed, rows + r * D, D));
    return;
  }
  int64_t lane_q = 0, n, lanes;  // queries in lane groups
  while (next_group(nq, lane_q, &n, &lanes)) lane_q += n;
  if (lane_q == 0) return query_major(packed, nq, rows, nrows, D, best, rows + nrows * D);
  float* buf = scratch;
  float* lbest = buf + kRowBlock * D;
  float* lnan = lbest + nq + kMaxLanes;
  reset_lanes(lbest, lnan, nq + kMaxLanes);
  for (int64_t r = 0; r < nrows; r += kRowBlock) {
    const int64_t nr = nrows - r < kRowBlock ? nrows - r : kRowBlock;
    const float* rb = as_f32(rows + r * D, nr * D, buf);
    // The first group prefetches the same share of what follows the rows.
    const T* ahead = rows + (nrows + r) * D;
    for (int64_t q0 = 0; next_group(nq, q0, &n, &lanes); q0 += n) {
      const float* qt = packed + q0 * D;
      if (lanes == Full::W)
        group_rows<Full>(qt, rb, nr, D, lbest + q0, lnan + q0, ahead, q0 == 0);
      else
        group_rows<Half>(qt, rb, nr, D, lbest + q0, lnan + q0, ahead, q0 == 0);
    }
    if (lane_q < nq)
      query_major<float>(packed + lane_q * D, nq - lane_q, rb, nr, D, best + lane_q, nullptr);
  }
  merge_lanes(lbest, lnan, lane_q, best);
}

void min_sq_f32(const float* packed, int64_t nq, const float* rows, int64_t nrows, int64_t D,
                float* best, float* scratch) {
  min_sq(packed, nq, rows, nrows, D, best, scratch);
}

void min_sq_f16(const float* packed, int64_t nq, const uint16_t* rows, int64_t nrows, int64_t D,
                float* best, float* scratch) {
  min_sq(packed, nq, rows, nrows, D, best, scratch);
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
