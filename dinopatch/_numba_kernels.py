"""The numba kernel of :mod:`dinopatch.kernels`: plain parallel loops.

Imported only when the kernel is used (numba takes about a second to
import); compiled functions are cached on disk.  Arguments are checked by
:mod:`dinopatch.kernels`.  numba has no float16, so an fp16 bank is widened to
float32 by the caller.
"""
from __future__ import annotations

import numba
import numpy as np

# Reassociation lets LLVM vectorise the sums; no "nnan"/"ninf", so NaN
# queries still give NaN.
_FASTMATH = {"reassoc", "contract"}


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def min_distance(q, bank, counts, h, w, steps):
    """``[B, L, D]`` f32 queries, ``[L, K, D]`` f32 bank, ``[L]`` int64 counts, ``[L]`` int32 steps -> ``[B, L]``."""
    B, L, D = q.shape
    out = np.empty((B, L), dtype=np.float32)
    for l in numba.prange(L):
        y, x, reach = l // w, l % w, steps[l]
        for b in range(B):
            best = np.float32(np.inf)
            # A NaN query or row makes the answer NaN.  Summing the squared
            # distances (all >= 0, so never inf - inf) finds one after the
            # loop; a NaN test per row would keep the minimum from being a
            # plain min that LLVM vectorises.
            total = np.float32(0.0)
            for yy in range(max(0, y - reach), min(h, y + reach + 1)):
                for xx in range(max(0, x - reach), min(w, x + reach + 1)):
                    m = yy * w + xx
                    for k in range(counts[m]):
                        acc = np.float32(0.0)
                        for d in range(D):
                            t = q[b, l, d] - bank[m, k, d]
                            acc += t * t
                        total += acc
                        best = min(best, acc)
            out[b, l] = np.sqrt(best) if total == total else np.float32(np.nan)
    return out


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def kcenter_greedy(x, k):
    """``[L, N, D]`` f32 -> ``[L, k]`` int64, the same rule as the numpy reference."""
    L, N, D = x.shape
    out = np.empty((L, k), dtype=np.int64)
    for l in numba.prange(L):
        mean = np.zeros(D, dtype=np.float64)
        for n in range(N):
            for d in range(D):
                mean[d] += x[l, n, d]
        mean /= N
        c = 0
        nearest = np.inf
        for n in range(N):
            v = 0.0
            for d in range(D):
                t = x[l, n, d] - mean[d]
                v += t * t
            if v < nearest:
                nearest = v
                c = n
        mind = np.full(N, np.inf, dtype=np.float32)
        for j in range(k):
            out[l, j] = c
            nxt = 0
            far = np.float32(-1.0)
            for n in range(N):
                acc = np.float32(0.0)
                for d in range(D):
                    t = x[l, n, d] - x[l, c, d]
                    acc += t * t
                if acc < mind[n]:
                    mind[n] = acc
                if mind[n] > far:
                    far = mind[n]
                    nxt = n
            c = nxt
    return out
