"""Nearest-distance functions of other libraries, timed beside ours on the same bank.

Each builder takes the fp32 bank ``[L, K, D]`` (set-up untimed) and returns
``fn(queries [B, L, D]) -> [B, L]`` distances; a peer whose library is not
installed is left out.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def numpy_gemm(b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``|q|^2 + |b|^2 - 2 q.b`` with batched BLAS; loses accuracy near zero."""
    b_sq = (b**2).sum(-1)
    bt = b.transpose(0, 2, 1)

    def run(q):
        qt = q.transpose(1, 0, 2)  # [L, B, D]
        d2 = (qt**2).sum(-1)[:, :, None] + b_sq[:, None, :] - 2 * (qt @ bt)
        return np.sqrt(np.maximum(d2.min(-1), 0)).T

    return run


def torch_cdist(b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    tb = torch.from_numpy(b)
    return lambda q: torch.cdist(torch.from_numpy(q).transpose(0, 1), tb).amin(-1).T.numpy()


def faiss_flat(b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """One exact ``IndexFlatL2`` per location."""
    import faiss

    indices = []
    for rows in b:
        index = faiss.IndexFlatL2(b.shape[2])
        index.add(rows)
        indices.append(index)

    def run(q):
        out = np.empty(q.shape[:2], dtype=np.float32)
        for l, index in enumerate(indices):
            d2, _ = index.search(np.ascontiguousarray(q[:, l]), 1)
            out[:, l] = np.sqrt(np.maximum(d2[:, 0], 0))
        return out

    return run


def numba_plain(b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The 20-line parallel numba loop with full fastmath: the bar of our numba fallback."""
    from .numba_peer import plain_loop

    return lambda q: plain_loop(q, b)


PEERS = {
    "numpy-gemm": numpy_gemm,
    "torch.cdist": torch_cdist,
    "faiss IndexFlatL2": faiss_flat,
    "numba plain loop": numba_plain,
}


def distance_peers(b: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The installed peers over bank ``b``, by name."""
    out = {}
    for name, build in PEERS.items():
        try:
            out[name] = build(b)
        except ImportError:
            pass
    return out

