"""A plain parallel numba loop with full fastmath: the peer our numba fallback must keep up with.

No NaN propagation, no spatial tolerance, no ragged counts: the least a user
would write.  Its own module so that importing the bench does not import numba.
"""
import numba
import numpy as np


@numba.njit(parallel=True, fastmath=True, cache=True)
def plain_loop(q, b):
    """``[B, L, D]`` f32, ``[L, K, D]`` f32 -> ``[B, L]`` nearest distances."""
    B, L, D = q.shape
    out = np.empty((B, L), np.float32)
    for l in numba.prange(L):
        for i in range(B):
            best = np.float32(np.inf)
            for k in range(b.shape[1]):
                acc = np.float32(0.0)
                for d in range(D):
                    t = q[i, l, d] - b[l, k, d]
                    acc += t * t
                best = min(best, acc)
            out[i, l] = np.sqrt(best)
    return out
