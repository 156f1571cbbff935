"""Drift: noticing that good parts stop looking like the good parts the model was fitted on.

Lighting ages, a camera shifts, a supplier changes material: the scores of good
parts creep up until false rejects climb.  The model file carries the good
parts' reference distributions: their held-out image scores (the calibration
scores) and, per good image, the statistics of :data:`STATISTICS` measured by
:func:`part_statistics` (:class:`Reference`).  A :class:`Monitor` follows the
parts on the line with one-sided CUSUM charts on the standardised
statistics and raises a flag, with its reason, when one of them has moved.
The score is followed over the parts judged good, the conditions (brightness,
contrast, scale) over every part the aligner placed.

The charts (Page's CUSUM): for each statistic ``x`` with reference mean ``mu``
and standard deviation ``sd``, ``z = clip((x - mu) / sd, -CLIP, CLIP)``, and
``S+ = max(0, S+ + z - K)`` (``S- = max(0, S- - z - K)``); the flag rises
when one ``S`` exceeds ``H``.  ``K = 0.5`` aims at a shift of one standard
deviation; ``H = 12`` with the clip at 4 means no single odd part, nor three,
can raise it.  The score has only the upward chart (a lower score is not a
problem); brightness, contrast and scale have both.  The flag stays up once
raised: it means "check the line, then update or refit the model".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np

from .data import as_image

# What is measured per part besides its score: mean and standard deviation of the gray levels of the
# part's canonical frame (its valid pixels), and the aligner's scale (canonical px per input px).
STATISTICS = ("brightness", "contrast", "scale")
# CUSUM reference value and decision interval, in standard deviations, and the clip of one part's z.
K = 0.5
H = 12.0
CLIP = 4.0
# A reference spread of zero (identical good parts) would make any change infinite: the spread is at least
# this share of the mean.
MIN_RELATIVE_SD = 0.01
# Side of the small canonical frame the statistics are measured on.
STAT_SIDE = 64


def part_statistics(image: np.ndarray, alignment, size: int) -> dict[str, float]:
    """Brightness, contrast and scale of one part as the aligner placed it.

    Args:
        image: the input image, uint8 ``[H, W]`` or ``[H, W, 3]``.
        alignment: its :class:`~dinopatch.align.Alignment` (the forward matrix into a ``size`` px frame).
        size: the model's canonical frame side (``image_size``).

    Returns:
        ``{"brightness", "contrast", "scale"}``: gray mean and standard deviation over the frame's pixels
        that came from the image, measured on a :data:`STAT_SIDE` px copy of the canonical frame.
    """
    gray = as_image(image)
    if gray.ndim == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGR2GRAY)
    m = np.asarray(alignment.matrix, np.float64) * (STAT_SIDE / size)
    frame = cv2.warpAffine(gray.astype(np.float32), m, (STAT_SIDE, STAT_SIDE), flags=cv2.INTER_LINEAR)
    valid = cv2.warpAffine(np.ones_like(gray, np.float32), m, (STAT_SIDE, STAT_SIDE), flags=cv2.INTER_NEAREST) > 0
    pixels = frame[valid] if valid.any() else frame.ravel()
    return {"brightness": float(pixels.mean()), "contrast": float(pixels.std()), "scale": float(alignment.scale)}


@dataclass(frozen=True)
class Reference:
    """The good parts' statistics, as fit measured them: ``values`` float64 ``[N, len(names)]``."""

    names: tuple[str, ...]
    values: np.ndarray

    @classmethod
    def measure(cls, images: list[np.ndarray], alignments: list, size: int) -> "Reference":
        """The statistics of the good images (``alignments``: the aligner's, one per image)."""
        rows = [part_statistics(im, al, size) for im, al in zip(images, alignments)]
        return cls(STATISTICS, np.array([[r[n] for n in STATISTICS] for r in rows], np.float64))

    def state(self) -> tuple[dict, dict]:
        """Header entry and arrays of the model file."""
        return {"statistics": list(self.names)}, {"drift_reference": self.values}

    @classmethod
    def from_state(cls, header, arrays: dict) -> "Reference | None":
        """The reference of a model file, checked (ValueError); None for files written before drift existed."""
        values = arrays.get("drift_reference")
        if header is None and values is None:
            return None
        if not isinstance(header, dict) or set(header) != {"statistics"} or values is None:
            raise ValueError(f"drift reference header {header!r} or its array is missing or malformed")
        names = header["statistics"]
        if not isinstance(names, list) or not names or len(set(names)) != len(names) \
                or not set(names) <= set(STATISTICS):
            raise ValueError(f"drift statistics {names!r} are not distinct names among {STATISTICS}")
        if values.dtype != np.float64 or values.ndim != 2 or values.shape[1] != len(names) or values.shape[0] < 1 \
                or not np.isfinite(values).all():
            raise ValueError(f"drift reference {values.dtype}{list(values.shape)} is not finite float64 "
                             f"[N, {len(names)}]")
        return cls(tuple(names), values)


def charts(reference: Reference | None, scores: np.ndarray) -> dict[str, tuple[float, float, float, tuple[int, ...]]]:
    """Statistic -> (reference mean, spread, slack, directions watched), from the good parts' values.

    A reference measured on n good parts is itself uncertain: the spread is the sample's standard deviation
    raised to its one-sided 95% upper bound (``1 + 1.645 / sqrt(2 (n - 1))``), and the slack added to the
    chart's ``k`` is two standard errors of the reference mean (``2 / sqrt(n)`` spreads), so a small good set
    does not make the line look drifted.
    """
    columns = {"score": (np.asarray(scores, np.float64), (1,))}
    if reference is not None:
        columns.update({n: (reference.values[:, i], (1, -1)) for i, n in enumerate(reference.names)})
    out = {}
    for name, (values, directions) in columns.items():
        values = values[np.isfinite(values)]
        n = len(values)
        if n < 2:
            continue
        mu = float(values.mean())
        sd = float(values.std(ddof=1)) * (1.0 + 1.645 / math.sqrt(2.0 * (n - 1)))
        out[name] = (mu, max(sd, MIN_RELATIVE_SD * abs(mu), 1e-9), 2.0 / math.sqrt(n), directions)
    return out


class Monitor:
    """Running CUSUM charts over the parts judged good; one per statistic and direction.

    Args:
        reference: the model's :class:`Reference` (None: the score alone is watched).
        scores: the good parts' held-out image scores (the model's calibration scores).
        k, h, clip: the chart's parameters, in standard deviations (module constants by default).
    """

    def __init__(self, reference: Reference | None, scores, *, k: float = K, h: float = H, clip: float = CLIP):
        self.k, self.h, self.clip = float(k), float(h), float(clip)
        self.charts = charts(reference, scores)
        self.sums = {(n, d): 0.0 for n, (*_, dirs) in self.charts.items() for d in dirs}
        self.good = 0
        self.parts = 0
        self.flag = False
        self.reason: str | None = None
        self.first_flag_part: int | None = None

    @classmethod
    def for_model(cls, det, **chart) -> "Monitor":
        """The monitor of a fitted detector's reference distributions."""
        model = det.model_
        return cls(model.drift, model.threshold.scores, **chart)

    def update(self, score, statistics: dict | None, good: bool, aligned: bool = True) -> dict:
        """Take one part; its record's ``drift`` field.

        The score chart takes only parts judged ``good`` (a defect's score is the detector's business); the
        charts of the conditions (brightness, contrast, scale: the station's, not the part's) take every part
        the aligner placed, so that a lighting change that makes good parts fail is seen as what it is.

        Returns:
            ``{"flag", "reason", "statistics"}``: the flag as it stands after this part, why it rose,
            and this part's statistics (what :func:`replay` reads back).
        """
        self.parts += 1
        self.good += bool(good)
        values = dict(statistics or {}, score=score)
        for (name, direction), total in self.sums.items():
            x = values.get(name)
            if x is None or not math.isfinite(x) or not (good if name == "score" else aligned):
                continue
            mu, sd, slack, _ = self.charts[name]
            z = min(max((x - mu) / sd, -self.clip), self.clip)
            total = max(0.0, total + direction * z - self.k - slack)
            self.sums[name, direction] = total
            if total > self.h and not self.flag:
                self.flag, self.first_flag_part = True, self.parts
                self.reason = (f"{name} {'up' if direction > 0 else 'down'}: {name} {x:.4g} against {mu:.4g} +- "
                               f"{sd:.3g} at fit (CUSUM {total:.1f} > {self.h:g} at part {self.parts}); check the "
                               "line, then update or refit the model")
        return {"flag": self.flag, "reason": self.reason,
                "statistics": None if statistics is None else {n: round(v, 6) for n, v in statistics.items()}}

    def observe(self, image: np.ndarray, result, size: int) -> dict:
        """:meth:`update` with one scored part: ``result`` its Result, ``image`` the input it was scored on,
        ``size`` the model's canonical frame side."""
        aligned = bool(result.aligned)
        return self.update(float(result.score), part_statistics(image, result.alignment, size),
                           aligned and not bool(result.is_anomaly), aligned)

    def summary(self) -> dict:
        """The run so far: the flag, its reason, where it rose, each chart's sum, the parameters."""
        return {"flag": self.flag, "reason": self.reason, "first_flag_part": self.first_flag_part,
                "parts": self.parts, "good_parts": self.good,
                "cusum": {f"{n}{'+' if d > 0 else '-'}": round(s, 3) for (n, d), s in self.sums.items()},
                "reference": {n: {"mean": mu, "sd": sd, "slack": slack}
                              for n, (mu, sd, slack, _) in self.charts.items()},
                "parameters": {"k": self.k, "h": self.h, "clip": self.clip}}

    def describe(self) -> str:
        """One line for the command line."""
        if not self.flag:
            return f"drift: none over {self.good} good parts of {self.parts}"
        return f"DRIFT from part {self.first_flag_part}: {self.reason}"


def take(monitor: Monitor, record: dict) -> None:
    """Update ``monitor`` with one ``predictions.jsonl`` record (an error record does not count)."""
    if record.get("error") is not None:
        return
    stats = (record.get("drift") or {}).get("statistics")
    aligned = record.get("aligned") is True
    score = record.get("score")
    monitor.update(math.nan if score is None else float(score), stats, aligned and record.get("is_anomaly") is False,
                   aligned)


def replay(monitor: Monitor, lines: Iterable[str]) -> Monitor:
    """Feed the records of a ``predictions.jsonl`` (its lines) to ``monitor``, in order; a torn last line is
    left out (a run killed while writing)."""
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            take(monitor, record)
    return monitor
