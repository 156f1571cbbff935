"""Per-location nearest-neighbour distance and k-center coreset selection.

Every backend shares one signature and is checked against the numpy
reference in ``tests/test_kernels.py``:

    min_distance(queries [B, L, D] f32, bank [L, K, D] f32) -> [B, L] f32
    kcenter_greedy(x [L, N, D] f32, k) -> [L, k] int64

Backends, fastest first: ``cuda`` (dinopatch._C_cuda, when a GPU is present),
``cpp`` (dinopatch._C), ``numba``, ``numpy``.  ``backend=None`` or ``"auto"``
takes the first available; the environment variable ``DINOPATCH_KERNEL``
overrides that choice.
"""
from __future__ import annotations

import os

import numpy as np

BACKENDS = ("cuda", "cpp", "numba", "numpy")

try:
    from . import _C
except ImportError:  # a source checkout that was never built
    _C = None


def available() -> list[str]:
    """Backends usable in this process, fastest first."""
    found = []
    if _C is not None:
        found.append("cpp")
    found.append("numpy")
    return found


def resolve(backend: str | None = None) -> str:
    """The backend a call with ``backend=`` would use."""
    if backend in (None, "auto"):
        backend = os.environ.get("DINOPATCH_KERNEL") or available()[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose from {BACKENDS}")
    if backend not in available():
        raise ValueError(f"kernel backend {backend!r} is not available here; available: {available()}")
    return backend


def _as_f32(name: str, a, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def min_distance(queries, bank, backend: str | None = None) -> np.ndarray:
    """Distance from each query to the nearest bank row at its location.

    Args:
        queries: ``[B, L, D]`` float features, one row per image and location.
        bank: ``[L, K, D]`` float nominal features, ``K`` per location.
        backend: one of :data:`BACKENDS`, or None/"auto".

    Returns:
        ``[B, L]`` float32 Euclidean distances.
    """
    q = _as_f32("queries", queries, 3)
    b = _as_f32("bank", bank, 3)
    if q.shape[1] != b.shape[0] or q.shape[2] != b.shape[2]:
        raise ValueError(f"queries {q.shape} [B,L,D] and bank {b.shape} [L,K,D] disagree on L or D")
    if b.shape[1] == 0:
        raise ValueError(f"bank {b.shape} has no rows per location (K = 0)")
    backend = resolve(backend)
    if backend == "cpp":
        return _C.min_distance(q, b)
    return min_distance_numpy(q, b)


def kcenter_greedy(x, k: int, backend: str | None = None) -> np.ndarray:
    """Greedy k-center selection, independently at each location.

    The first centre is the row nearest the location's mean; each next one is
    the row farthest from all centres chosen so far (running minimum, O(N)
    memory per location).

    Args:
        x: ``[L, N, D]`` float features.
        k: centres per location, ``1 <= k <= N``.

    Returns:
        ``[L, k]`` int64 row indices into ``x[l]``.
    """
    a = _as_f32("x", x, 3)
    k = int(k)
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k = {k} must be in [1, N = {a.shape[1]}] for x of shape {a.shape}")
    backend = resolve(backend)
    if backend == "cpp":
        return _C.kcenter_greedy(a, k)
    return kcenter_greedy_numpy(a, k)


def min_distance_numpy(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference: direct differences per location, float64 accumulation."""
    out = np.empty(q.shape[:2], dtype=np.float32)
    for l in range(b.shape[0]):
        diff = q[:, l, None, :].astype(np.float64) - b[None, l].astype(np.float64)
        out[:, l] = np.sqrt(np.einsum("bkd,bkd->bk", diff, diff).min(axis=1))
    return out


def kcenter_greedy_numpy(x: np.ndarray, k: int) -> np.ndarray:
    """Reference k-center greedy, float64 distances."""
    L, N, _ = x.shape
    out = np.empty((L, k), dtype=np.int64)
    for l in range(L):
        xl = x[l].astype(np.float64)
        c = int(np.argmin(((xl - xl.mean(axis=0)) ** 2).sum(axis=1)))
        mind = np.full(N, np.inf)
        for j in range(k):
            out[l, j] = c
            mind = np.minimum(mind, ((xl - xl[c]) ** 2).sum(axis=1))
            c = int(np.argmax(mind))
    return out
