"""A tolerance for each location of the token grid, from where held-out good patches find their match.

One tolerance for the whole part is bounded by the part's residual
misalignment as a whole, but thin features wobble by one or two grid steps
while the body stays put: with tolerance 0 their locations make good parts score
like defects, and a tolerance of 2 everywhere lets small defects on the body find
a good match next door.  A tolerance map gives each location its own tolerance.

Evidence (:func:`offset_counts`): every nominal image is held out once
(folds) and each of its patches is matched against a bank of the others within
a Chebyshev tolerance of 0, 1, 2 grid steps (:data:`STEPS`); the patch's offset is
the smallest tolerance whose match is within :data:`MARGIN` of the best over all.  The
evidence is the count of held-out patches at each offset, per location:
``[L, len(STEPS)]`` integers.

Map (:func:`tolerance_map`): per location, the smallest tolerance beyond which at
most :data:`SHARE` of that location's held-out patches lie; then a location
keeps a tolerance only where one of its 8 neighbours needs at least as much
(``min(own, max over neighbours)``), so one noisy location does not get a wide
tolerance while a wobbling edge or thin feature, a line of locations, keeps its own.
The map is a pure function of the counts, so a model file stores both and its
loader derives the map again (:func:`check_offsets`).
"""
from __future__ import annotations

import numpy as np

from .bank import MemoryBank

STEPS = (0, 1, 2)
# A patch's match at a larger tolerance must be this much closer to count as displaced:
# nearer rows of pure noise differ by less.
MARGIN = 0.1
SHARE = 0.05


def offset_counts(tokens: np.ndarray, folds: list, positions=None, kernel: str | None = None) -> np.ndarray:
    """Held-out nominal patches at each offset of :data:`STEPS`, per location.

    Args:
        tokens: ``[N, h, w, D]`` nominal tokens.
        folds: index arrays partitioning ``range(N)``; each is scored against a bank of the rest.
        positions: the region the bank covers (None: the whole grid); other locations count nothing.
        kernel: the distance kernel.

    Returns:
        ``[h * w, len(STEPS)]`` int64 counts; each covered location's row sums to N.
    """
    n, h, w, _ = tokens.shape
    counts = np.zeros((h * w, len(STEPS)), np.int64)
    for held in folds:
        rest = np.setdiff1d(np.arange(n), held)
        base = MemoryBank.fit(tokens[rest], kernel=kernel, positions=positions)
        dist = np.stack([MemoryBank(base.features, (h, w), r, positions).distances(tokens[held], kernel)
                         for r in STEPS]).reshape(len(STEPS), len(held), h * w)
        covered = np.isfinite(dist[0])  # the region's locations only
        offset = np.argmax(dist <= (1 + MARGIN) * dist.min(axis=0), axis=0)  # the first tolerance close enough
        for r in range(len(STEPS)):
            counts[:, r] += ((offset == r) & covered).sum(axis=0)
    return counts


def shares(counts: np.ndarray) -> np.ndarray:
    """Share of all held-out patches at each offset (the evidence of one tolerance for the whole part)."""
    total = counts.sum()
    return counts.sum(axis=0) / max(total, 1)


def tolerance_map(counts: np.ndarray, grid: tuple[int, int], largest: int = STEPS[-1]) -> np.ndarray:
    """A tolerance per location, ``[h * w]`` int8 in ``[0, min(largest, 2)]``, from :func:`offset_counts`.

    Locations without evidence (outside the bank's region) get 0.
    """
    h, w = grid
    counts = np.asarray(counts, np.int64)
    n = counts.sum(axis=1, keepdims=True)
    beyond = n - np.cumsum(counts, axis=1)  # patches displaced beyond each tolerance
    own = np.argmax(beyond <= SHARE * n + 1e-9, axis=1).reshape(h, w)
    # Not isolated: the widest tolerance among the 8 neighbours (0 past the grid's edges).
    padded = np.pad(own, 1)
    near = np.max([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], axis=0)
    return np.minimum(np.minimum(own, near), max(0, min(largest, STEPS[-1]))).astype(np.int8).ravel()


def differs(tmap: np.ndarray, counts: np.ndarray) -> bool:
    """Whether the map gives different tolerances to the locations it has evidence for (else one value says it all)."""
    covered = np.asarray(counts).sum(axis=1) > 0
    return len(np.unique(tmap[covered])) > 1


def check_offsets(counts, grid: tuple[int, int], positions=None) -> np.ndarray:
    """A model file's offset counts, checked: shape, integers >= 0, and N patches at each covered location.

    Raises:
        ValueError: on any inconsistency (a damaged or edited file).
    """
    c = np.asarray(counts)
    L = grid[0] * grid[1]
    if c.shape != (L, len(STEPS)) or not np.issubdtype(c.dtype, np.integer) or (c.size and c.min() < 0):
        raise ValueError(f"tolerance offsets {c.dtype}{list(c.shape)} are not non-negative integers "
                         f"[{L}, {len(STEPS)}]")
    totals = c.sum(axis=1)
    covered = np.zeros(L, bool)
    covered[slice(None) if positions is None else positions] = True
    if (totals[~covered] != 0).any() or len(np.unique(totals[covered])) != 1 or totals[covered][0] < 1:
        raise ValueError("tolerance offsets do not count the same held-out images at every covered location")
    return c.astype(np.int64)
