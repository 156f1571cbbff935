"""From patch distances to an anomaly map, a defect mask and an image score."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .result import PatchDistances, Result

SCORES = ("max", "mean", "p99", "topk")
# Beyond these a map is one blur and a mask one blob at any canonical size: settings
# that large come from an edited file or a typo, not from tuning.
MAX_SIGMA = 64.0
MAX_MORPH_KERNEL = 64


def anomaly_map(distances: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Patch distances ``[h, w]`` -> smoothed float32 map at the size of ``valid``.

    Args:
        distances: per-patch nearest-neighbour distances.
        valid: ``[S, S]`` weights in [0, 1], 0 where the canonical image is padding.
        sigma: Gaussian smoothing in pixels of the canonical frame (0: none).
    """
    size = valid.shape[::-1]
    amap = cv2.resize(distances.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        amap = cv2.GaussianBlur(amap, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    # Padding is copied image content, not the part: nothing there is a defect.
    return amap * valid


def image_score(amap: np.ndarray, valid: np.ndarray, method: str = "max", topk: float = 0.01) -> float:
    """One number per image from its map, over valid pixels only.

    ``topk`` is the fraction of the valid pixels averaged by ``method="topk"``.
    """
    values = amap[valid > 0.5]
    if values.size == 0:
        return float("nan")
    if method == "max":
        return float(values.max())
    if method == "mean":
        return float(values.mean())
    if method == "p99":
        return float(np.percentile(values, 99))
    if method == "topk":
        k = max(1, int(round(topk * values.size)))
        return float(np.partition(values, values.size - k)[-k:].mean())
    raise ValueError(f"unknown image score {method!r}; choose from {SCORES}")


def scores_and_maxima(post: "PostProcess", distances: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image scores by ``post`` and map maxima, float64 ``[n]``, of patch distances ``[n, h, w]`` with valid
    masks ``[n, S, S]`` (bool or 0/1): what calibration measures on held-out good parts, and load again."""
    out = [(s, image_score(m, v, "max")) for m, s, v in
           ((*post.score_map(d, v), v) for d, v in zip(distances, np.asarray(valid, np.float32)))]
    return np.array([s for s, _ in out], np.float64), np.array([m for _, m in out], np.float64)


def segment(amap: np.ndarray, threshold: float, kernel: int = 5) -> np.ndarray:
    """Binary defect mask: threshold, then open (drop specks) and close (fill holes)."""
    mask = (amap > threshold).astype(np.uint8)
    if kernel > 1:
        se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, se)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, se)
    return mask.astype(bool)


def _is_number(v) -> bool:
    """A real number (a string such as "4" or "auto" is not one: it would fail later, or pass unchecked)."""
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


@dataclass(frozen=True)
class PostProcess:
    """The post-processing settings, checked.

    Args:
        sigma: Gaussian smoothing of the map, in canonical-frame pixels.
        score: image score, one of :data:`SCORES`.
        topk: fraction of pixels averaged by ``score="topk"``.
        morph_kernel: side of the opening/closing element of the defect mask.
    """

    sigma: float = 4.0
    score: str = "max"
    topk: float = 0.01
    morph_kernel: int = 5

    def __post_init__(self):
        if not _is_number(self.sigma) or not 0.0 <= float(self.sigma) <= MAX_SIGMA:
            raise ValueError(f"sigma must be in [0, {MAX_SIGMA}] canonical pixels, got {self.sigma!r}")
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r} must be one of {SCORES}")
        if not _is_number(self.topk) or not 0.0 < float(self.topk) <= 1.0:
            raise ValueError(f"topk must be in (0, 1], got {self.topk!r}")
        if isinstance(self.morph_kernel, bool) or int(self.morph_kernel) != self.morph_kernel \
                or not 0 <= self.morph_kernel <= MAX_MORPH_KERNEL:
            raise ValueError(f"morph_kernel must be an integer in [0, {MAX_MORPH_KERNEL}], got {self.morph_kernel!r}")

    def score_map(self, distances: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
        """Canonical-frame map and image score of one image's patch distances."""
        amap = anomaly_map(distances, valid, float(self.sigma))
        return amap, image_score(amap, valid, self.score, float(self.topk))

    def judge(self, raw: PatchDistances, aligner, threshold, pixel_threshold: float | None = None) -> Result:
        """The :class:`Result` of one image: map back in the input frame, mask, verdict and p-value.

        Args:
            threshold: the :class:`~.calibration.Threshold` the image score is judged by; its
                :attr:`~.calibration.Threshold.pixel_grid`, where it has one, judges the mask.
            pixel_threshold: one map value above which a pixel is a defect, instead (default:
                ``threshold.pixel`` where there is no grid).
        """
        amap, score = self.score_map(raw.distances, raw.valid)
        amap_in = aligner.inverse_map(amap, raw.alignment, raw.shape)
        if pixel_threshold is None and threshold.pixel_grid is not None:
            # The grid goes through the same smoothing as the map, so a location's threshold is
            # compared with its map value, both in the input frame.
            surface = aligner.inverse_map(anomaly_map(threshold.pixel_grid, raw.valid, float(self.sigma)),
                                          raw.alignment, raw.shape)
            limit = float(surface.max())
        else:
            surface, limit = None, threshold.pixel if pixel_threshold is None else pixel_threshold
        outside = raw.alignment.outside_map(raw.shape)
        if outside is not None:  # an object away from the part: above the worst place and every threshold
            worst = max((v for v in (float(amap_in.max()), threshold.image, limit) if np.isfinite(v)), default=1.0)
            worst = float(np.nextafter(np.float32(worst), np.float32(np.inf)))
            amap_in = np.where(outside > 0, np.float32(worst), amap_in)
            score = max(score, worst)
        mask = segment(amap_in if surface is None else amap_in - surface, limit if surface is None else 0.0,
                       int(self.morph_kernel))
        trusted = bool(raw.alignment.trusted)
        # NaN compares False: a non-finite score never passes.
        return Result(score=score, anomaly_map=amap_in, is_anomaly=not (score <= threshold.image and trusted),
                      aligned=trusted, mask=mask,
                      alignment=raw.alignment, threshold=float(threshold.image),
                      threshold_source=threshold.describe(), p_value=threshold.p_value(score))
