"""What the detector says about one image, and the raw distances it says it from."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .align import Alignment


@dataclass
class Result:
    """What :meth:`DinoPatch.predict` says about one image.

    Attributes:
        score: image anomaly score, higher = more anomalous (NaN when the image
            gave nothing to score; such a result is always an anomaly).
        anomaly_map: float32 ``[H, W]`` in the input image's frame.
        is_anomaly: ``score > threshold``, or a non-finite score, or an
            alignment that could not be trusted: a frame the detector cannot
            judge (no part in view, part cut by the border) never passes as good.
        aligned: False where alignment could not be trusted.
        mask: bool ``[H, W]`` defect pixels: map above the mask threshold of its location
            (measured on the held-out good parts, :attr:`.Threshold.pixel_grid`), cleaned by morphology.
        alignment: the alignment diagnostics (angle, scale, reason, ...).
        threshold: the image-score threshold this verdict was made with.
        threshold_source: how that threshold was set and what it promises, in words (e.g.
            ``"false-alarm rate <= 0.0769 for parts like the 12 good parts (conformal, leave-one-out);
            the maximum of their scores"``).
        p_value: conformal p-value of the score among the held-out good parts' scores,
            ``(1 + #{good scores >= score}) / (n + 1)``: small for a part unlike them.  None
            where the threshold has no calibration scores or the score is not finite.
    """

    score: float
    anomaly_map: np.ndarray
    is_anomaly: bool
    aligned: bool
    mask: np.ndarray
    alignment: Alignment
    threshold: float
    threshold_source: str
    p_value: float | None = None


@dataclass
class PatchDistances:
    """One image's nearest-neighbour distances before post-processing.

    Attributes:
        distances: float32 ``[h, w]`` per-patch distances, canonical frame.
        valid: float32 ``[S, S]`` validity of the canonical image.
        alignment: how the image was put into the canonical frame.
        shape: ``(H, W)`` of the input image.
        model: the fitted model they were measured with, so that they are
            judged by the same one even if the detector is refitted meanwhile.
    """

    distances: np.ndarray
    valid: np.ndarray
    alignment: Alignment
    shape: tuple[int, int]
    model: object = field(default=None, repr=False, compare=False)
