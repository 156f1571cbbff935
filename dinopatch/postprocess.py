"""From patch distances to an anomaly map, a defect mask and an image score."""
from __future__ import annotations

import cv2
import numpy as np

SCORES = ("max", "mean", "p99", "topk")


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


def segment(amap: np.ndarray, threshold: float, kernel: int = 5) -> np.ndarray:
    """Binary defect mask: threshold, then open (drop specks) and close (fill holes)."""
    mask = (amap > threshold).astype(np.uint8)
    if kernel > 1:
        se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, se)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, se)
    return mask.astype(bool)
