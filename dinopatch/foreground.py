"""Foreground-only tokens: the part's region of the canonical frame, and a cheap check of the rest.

With alignment on, the part sits in the same place of the canonical frame
every time and much of the frame is background, while the backbone's cost
grows with the number of tokens (attention with its square).  Fit finds the
part's region from the part itself: the union of the nominal parts'
silhouettes as the aligner measures and places them (not their bright pixels:
reflection padding pastes mirrored pieces of a part near the photo's edge into
the frame, which is why the frame is padded with the background level
instead), taken to the patch grid and dilated by a margin of whole patches that fit
measures (:mod:`.margin`; the aligner settles the half turn in image space, so
the region need not be symmetric under it).  The backbone then runs on those patches only (plus the class and
register tokens), a fixed count per model, so batches and exported shapes stay
static, and the bank holds those locations only.

Outside the region an object lying next to the part must still be seen:
:class:`Background` z-scores low-resolution pixel statistics of each patch
(mean of each channel relative to the light's plane across the frame,
standard deviation of the gray level) against the nominal images, and each
such location's map value is that z times
:attr:`Foreground.unit`, which puts a nominal background's worst location at
:data:`BACKGROUND_WEIGHT` of a nominal part's worst patch distance (both
measured on the nominal set's held-out folds at fit).  The threshold is then calibrated on these
maps like any other.

The model file keeps the samples, not the statistics: each nominal image's patch statistics and
its worst held-out patch distance (:class:`Foreground` ``stats``, ``worst``).  The background's mean,
scale and unit are derived from them again at load, so none can be edited alone.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

OPTIONS = ("auto", True, False)
# The margins (patches around the union of silhouettes) fit chooses among (:mod:`.margin`), narrowest first;
# the widest is the reference the others must agree with.
MARGINS = (0, 1, 2)
# "auto" runs foreground tokens where the region at margin GATE keeps at most this fraction of the patches:
# gathering and scattering the region costs something, so the saving in backbone time must be clear; the
# limit stays below the largest share at which the bench's foreground stage showed a gain.
AUTO_MAX_FRACTION = 0.6
GATE = 1
# Standard deviations below this (gray levels) are sensor noise, not a scale to divide by.
FLOOR = 2.0
BACKGROUND_WEIGHT = 0.5
STATS = 4  # features per location: mean B, G, R and the standard deviation of gray
_REFITS, _NEAR = 2, 3.0


def check_option(option, align: bool):
    """A valid ``foreground`` parameter; True needs alignment (the region is fixed in the aligned frame)."""
    if option not in OPTIONS or (option is not True and option is not False and option != "auto"):
        raise ValueError(f"foreground must be 'auto', True or False, got {option!r}")
    if option is True and not align:
        raise ValueError("foreground=True needs align=True: without alignment the part has no fixed region")
    return option


def region(silhouettes, grid: tuple[int, int], margin: int) -> np.ndarray:
    """The flat patch indices of the part's region.

    Args:
        silhouettes: float ``[S, S]`` canonical-frame silhouettes (see :meth:`.Aligner.silhouette`).
        grid: ``(h, w)`` patch grid of the frame.
        margin: dilation in patches.

    Returns:
        int64 ``[n]``, sorted; a patch is in if any silhouette covers any of its pixels,
        or one within ``margin`` patches does.
    """
    union = np.max(np.stack(list(silhouettes)), axis=0) > 0.5
    h, w = grid
    cells = cv2.resize(union.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0
    if margin:
        cells = cv2.dilate(cells.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
    return np.flatnonzero(cells).astype(np.int64)


def patch_stats(images: np.ndarray, valid: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Low-resolution statistics of canonical images ``[B, S, S, 3]`` uint8 with their valid masks ``[B, S, S]``
    -> float32 ``[B, h * w, 4]``.

    Per patch that lies wholly in the photo: the mean of each channel relative
    to the light's plane across the frame, and the standard deviation of the
    gray level (edges, texture).  The plane is a least-squares fit of the patch
    means over the frame's position, refitted without the patches far from it
    (the part, an object): a light whose gain or slope differs from part to
    part (brighter at one corner of the bench) does not read as an object,
    while anything a few patches wide still does.  A patch with padding in it
    shows nothing of the scene, and its statistics are NaN: it is not judged.
    """
    h, w = grid
    out = np.full((len(images), h * w, STATS), np.nan, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    position = np.stack([np.ones(h * w), (xx.ravel() + 0.5) / w - 0.5, (yy.ravel() + 0.5) / h - 0.5], 1)
    for i, (im, ok) in enumerate(zip(images, valid)):
        f = im.astype(np.float32)
        gray = cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
        # INTER_AREA at a whole number of pixels per patch is the exact mean over each patch.
        mean = cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA).reshape(h * w, 3).astype(np.float64)
        g1 = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA).reshape(-1)
        g2 = cv2.resize(gray * gray, (w, h), interpolation=cv2.INTER_AREA).reshape(-1)
        inside = cv2.resize(np.asarray(ok, np.float32), (w, h), interpolation=cv2.INTER_AREA).reshape(-1) > 1 - 1e-6
        if not inside.any():
            continue
        out[i, inside, :3] = mean[inside] - _light(position[inside], mean[inside])
        out[i, inside, 3] = np.sqrt(np.maximum(g2 - g1 * g1, 0.0))[inside]
    return out


def _light(position: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The light's plane at each patch ``[n, 3]``: least squares over ``position`` ``[n, 3]`` (1, x, y), refitted
    :data:`_REFITS` times on the patches within :data:`_NEAR` robust spreads of it, and kept within 8-bit levels
    (so a residual stays within 255, as the model file's check expects); the median where too few patches fix
    a plane."""
    keep = np.ones(len(mean), bool)
    for _ in range(_REFITS + 1):
        if keep.sum() < 3 * position.shape[1]:
            return np.broadcast_to(np.median(mean, axis=0), mean.shape)
        coef = np.linalg.lstsq(position[keep], mean[keep], rcond=None)[0]
        res = mean - position @ coef
        off = np.abs(res - np.median(res[keep], axis=0)).max(axis=1)
        # The spread has a floor of a gray level: a noiseless plane would otherwise keep nothing.
        keep = off <= max(_NEAR * 1.4826 * float(np.median(off[keep])), 1.0)
    return np.clip(position @ coef + np.median(res[keep], axis=0), 0.0, 255.0)


@dataclasses.dataclass(frozen=True)
class Background:
    """Nominal low-resolution statistics per location.

    Attributes:
        mean: float32 ``[L, 4]`` nominal mean of each statistic, over the images whose patch there lies in the
            photo; NaN where fewer than two do (nothing to judge by).
        scale: float32 ``[L, 4]`` nominal standard deviation, at least :data:`FLOOR`.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, stats: np.ndarray) -> "Background":
        """From the :func:`patch_stats` of nominal images ``[N, L, 4]`` (NaN where a patch is not judged)."""
        seen = np.isfinite(stats)
        count = seen.sum(0)
        mean = np.where(seen, stats, 0.0).sum(0) / np.maximum(count, 1)
        std = np.sqrt((np.where(seen, stats - mean, 0.0) ** 2).sum(0) / np.maximum(count, 1))
        mean[count < 2] = np.nan
        return cls(mean.astype(np.float32), np.maximum(std, FLOOR).astype(np.float32))

    def z(self, stats: np.ndarray) -> np.ndarray:
        """The worst statistic's z-score at each location: ``[B, L, 4]`` -> ``[B, L]``; 0 where the patch or the
        nominal images there are not judged."""
        return np.nan_to_num(np.abs(stats - self.mean) / self.scale, nan=0.0).max(axis=-1)


@dataclasses.dataclass(frozen=True)
class Foreground:
    """The region the backbone runs on, and how the rest of the frame is judged.

    Attributes:
        positions: int64 ``[n]`` flat patch indices of the region.
        grid: ``(h, w)`` patch grid.
        background: nominal statistics of every location (those in the region are unused).
        unit: map value of one z outside the region, in patch-distance units.
        stats: float32 ``[M, L, 4]`` the :func:`patch_stats` of the nominal images it was measured on (NaN
            where a patch has padding in it).
        worst: float32 ``[M]`` each one's largest held-out patch distance in the region, at its own place.
        parts: int64 ``[M]`` which of the good parts given to fit those images are (their indices).
        margin: fit's choice of the region's margin and its evidence (:func:`.margin.check_record`); None
            only until :func:`.margin.nominal_set` records the choice (a model's region always carries it).
    """

    positions: np.ndarray
    grid: tuple[int, int]
    background: Background
    unit: float
    stats: np.ndarray
    worst: np.ndarray
    parts: np.ndarray
    margin: dict | None = None

    @classmethod
    def fit(cls, positions: np.ndarray, grid: tuple[int, int], part: np.ndarray, stats: np.ndarray,
            folds) -> "Foreground":
        """Measure the background and its unit on nominal images.

        Args:
            positions: the region (from :func:`region`).
            part: float32 ``[N, h, w]`` held-out distances of the nominal tokens, each at its own place
                only (NaN outside the region), N >= 2.
            stats: ``[N, L, 4]`` their :func:`patch_stats`.
            folds: the held-out index sets ``part`` was measured with; the background is judged the same way.
        """
        n = len(part)
        if n < 2:
            raise ValueError("foreground tokens need at least 2 nominal images to scale the background check")
        worst = np.nanmax(part.reshape(n, -1)[:, positions], axis=1).astype(np.float32)
        return cls.from_samples(positions, grid, stats.astype(np.float32), worst, folds, np.arange(n))

    @classmethod
    def from_samples(cls, positions: np.ndarray, grid: tuple[int, int], stats: np.ndarray, worst: np.ndarray,
                     folds, parts: np.ndarray) -> "Foreground":
        """The background check derived from its samples (see the attributes): what :meth:`fit` measures, and
        what a model file is read back as."""
        outside = np.setdiff1d(np.arange(grid[0] * grid[1]), positions)
        back = 1.0
        if outside.size:
            z = np.empty((len(stats), outside.size))
            for held in folds:
                train = np.setdiff1d(np.arange(len(stats)), held)
                z[held] = Background.fit(stats[train][:, outside]).z(stats[held][:, outside])
            back = float(np.median(z.max(axis=1)))
        unit = BACKGROUND_WEIGHT * float(np.median(worst)) / max(back, 1.0)
        return cls(positions, grid, Background.fit(stats), unit, stats, worst, np.asarray(parts, np.int64))

    def of_parts(self, parts) -> "Foreground":
        """This check with the indices of the good parts its samples are of."""
        return dataclasses.replace(self, parts=np.asarray(parts, np.int64))

    @property
    def fraction(self) -> float:
        """Fraction of the patches the backbone runs on."""
        return len(self.positions) / (self.grid[0] * self.grid[1])

    def background_of(self, frames: np.ndarray, valid: np.ndarray) -> Background:
        """The :class:`Background` of canonical images ``[N, S, S, 3]`` with their valid masks (a calibration
        fold's)."""
        return Background.fit(patch_stats(frames, valid, self.grid))

    def scatter(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens ``[B, n, D]`` at the region -> grids ``[B, h, w, D]``, zero outside."""
        return scatter(tokens, self.positions, self.grid)

    def complete(self, distances: np.ndarray, images: np.ndarray, valid: np.ndarray,
                 background: Background | None = None):
        """Patch distances ``[B, h, w]`` (NaN outside the region) with the background term filled in.

        Args:
            images: the canonical images ``[B, S, S, 3]`` the distances are of, ``valid`` their masks.
            background: statistics to judge by (default: the model's; fit's
                calibration passes those of its training fold).
        """
        return self.fill(distances, patch_stats(images, valid, self.grid), background)

    def fill(self, distances: np.ndarray, stats: np.ndarray, background: Background | None = None) -> np.ndarray:
        """:meth:`complete` from the images' :func:`patch_stats` ``[B, L, 4]``."""
        z = (background or self.background).z(stats)
        out = z.reshape(distances.shape) * np.float32(self.unit)
        inside = np.zeros(self.grid[0] * self.grid[1], bool)
        inside[self.positions] = True
        inside = inside.reshape(self.grid)
        out[:, inside] = distances[:, inside]
        return out.astype(np.float32)

    def state(self) -> tuple[dict, dict]:
        """Header entry and arrays of the model file: the region, its margin and the background check's samples."""
        return ({"positions": len(self.positions), "margin": self.margin},
                {"positions": self.positions, "background_stats": self.stats, "background_worst": self.worst,
                 "background_parts": self.parts})

    @classmethod
    def from_state(cls, record: dict, arrays: dict, grid: tuple[int, int], folds) -> "Foreground":
        """:meth:`state` read back, every sample checked for form and range and the statistics derived from
        them with ``folds(m)``, the held-out sets fit used on ``m`` images (ValueError saying what is wrong);
        the margin record is :func:`.margin.check_record`'s to derive again."""
        from .backbone import check_positions

        if not isinstance(record, dict) or set(record) != {"positions", "margin"}:
            raise ValueError(f"foreground record malformed ({str(record)[:80]!r})")
        positions = check_positions(arrays["positions"], grid)
        if len(positions) != record["positions"]:
            raise ValueError("foreground positions disagree with their count")
        stats, worst, parts = arrays["background_stats"], arrays["background_worst"], arrays["background_parts"]
        m = len(worst)
        for name, a, dtype, shape in (("background_stats", stats, "float32", (m, grid[0] * grid[1], STATS)),
                                      ("background_worst", worst, "float32", (m,)),
                                      ("background_parts", parts, "int64", (m,))):
            if a.dtype.name != dtype or a.shape != shape:
                raise ValueError(f"{name} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
        if m < 2 or (np.diff(parts) <= 0).any() or parts.min() < 0:
            raise ValueError(f"background samples of {m} parts {parts[:8].tolist()}: at least 2, of distinct good "
                             "parts in fit order")
        # A patch is judged in all its statistics or none (NaN); a channel's mean lies within 255 of the light's
        # plane (kept within 8-bit levels); a gray spread within 127.5.
        judged = ~np.isnan(stats)
        seen = stats[judged.all(-1)]
        if not ((judged == judged[..., :1]).all() and np.isfinite(seen).all()
                and np.abs(seen[:, :3]).max(initial=0) <= 255
                and 0 <= seen[:, 3].min(initial=0) and seen[:, 3].max(initial=0) <= 127.5):
            raise ValueError("background statistics outside what 8-bit images give")
        if not (np.isfinite(worst).all() and (worst >= 0).all() and np.median(worst) > 0):
            raise ValueError("background check's worst part distances must be finite, >= 0, their median > 0")
        return dataclasses.replace(cls.from_samples(positions, grid, stats, worst, folds(m), parts),
                                   margin=record["margin"])


def plan(option, aligner, placed, grid: tuple[int, int]) -> dict[int, np.ndarray] | None:
    """The candidate regions to run on, ``{margin: positions}`` over :data:`MARGINS`, or None for every patch.

    ``"auto"`` is on where alignment is, at least two parts were placed, and
    the region at margin :data:`GATE` keeps at most :data:`AUTO_MAX_FRACTION` of the patches.

    Args:
        placed: the nominal images' :class:`~.align.Placement` (or the images).

    Raises:
        ValueError: ``option`` is True but no region can be measured.
    """
    if option is False or not aligner.enabled:
        return None
    sils = [s for s in map(aligner.silhouette, placed) if s is not None]
    if len(sils) < 2:
        if option is True:
            raise ValueError(f"foreground=True needs at least 2 nominal parts the aligner can place, "
                             f"got {len(sils)} of {len(placed)}")
        return None
    regions = {m: region(sils, grid, m) for m in MARGINS}
    if option == "auto" and len(regions[GATE]) > AUTO_MAX_FRACTION * grid[0] * grid[1]:
        return None
    return regions


def scatter(tokens: np.ndarray, positions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Tokens ``[B, n, D]`` at flat patch indices ``positions`` -> grids ``[B, h, w, D]``, zero elsewhere."""
    b, _, d = tokens.shape
    out = np.zeros((b, grid[0] * grid[1], d), tokens.dtype)
    out[:, positions] = tokens
    return out.reshape(b, *grid, d)
