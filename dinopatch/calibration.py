"""The decision threshold: where it comes from, and what it was measured on.

A line has only good parts to set a threshold with.  Each nominal image is
scored against a bank built without it (leave-one-out; above
:data:`MAX_FOLDS` images, that many folds), so two images already give a finite
threshold and every image serves both bank and calibration.  A fraction held
out instead (``calibration=0.2``) scores those images against a bank of the
rest.  The threshold is the ``1 - false_alarm_rate`` quantile of the held-out
scores.  It is never infinite or NaN: where it cannot be measured, fitting
fails and says why, unless the user gives one.

:class:`Threshold` carries the value with its source, which model files,
results and the CLI repeat, so a verdict always says what it was judged by.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# Above this many nominal images, leave-one-out becomes this many folds: one
# bank per fold, so calibration costs at most MAX_FOLDS bank builds.
MAX_FOLDS = 10
# Held-out scores below this fraction of the feature norm are rounding: the distances are exact only to
# 1e-4 of the largest one.
IDENTICAL_RTOL = 1e-4
METHODS = ("leave-one-out", "k-fold", "held-out", "evaluation", "user")


@dataclass(frozen=True)
class Threshold:
    """A decision threshold with its evidence.

    Attributes:
        image: threshold on the image score.
        pixel: threshold on the anomaly map, for the defect mask.
        source: how it was set: ``method`` (one of :data:`METHODS`), ``images``
            (how many it was measured on), ``false_alarm_rate``, and for an
            evaluation its split.
        scores: the held-out nominal image scores it was measured on (empty
            for a user's threshold).
        maxima: the largest map value of each of those images.
    """

    image: float
    pixel: float
    source: dict
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    maxima: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    def __post_init__(self):
        # A zero image threshold flags every part; a zero mask threshold only paints the whole part.
        for name, low in (("image", 0.0), ("pixel", -1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                    or not math.isfinite(value) or value <= low:
                raise ValueError(f"{name} threshold must be a finite number > {low:g}, got {value!r}")
        if self.source.get("method") not in METHODS:
            raise ValueError(f"threshold source {self.source.get('method')!r} must be one of {METHODS}")
        images = self.source.get("images")
        if self.source["method"] != "user" and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            raise ValueError(f"a measured threshold must say on how many images, got {images!r}")

    def describe(self) -> str:
        """The source in words, as results and the CLI print it."""
        s = self.source
        if s["method"] == "user":
            return "given by the user"
        what = f"{s['method']} on {s['images']} nominal images" if s["method"] != "evaluation" \
            else f"tuned by evaluation on {s['images']} images ({s.get('split', 'tuning split')})"
        far = s.get("false_alarm_rate")
        return what if far is None else f"{what}, false-alarm rate {far:g}"

    def at_false_alarm_rate(self, rate: float) -> "Threshold":
        """The same evidence read at another false-alarm rate (needs the calibration scores)."""
        check_rate(rate)
        if self.scores.size == 0:
            raise ValueError(f"this threshold was {self.describe()}: there are no calibration scores to "
                             "read another false-alarm rate from; give a threshold instead")
        return Threshold(_quantile(self.scores, rate), _quantile(self.maxima, rate),
                         dict(self.source, false_alarm_rate=float(rate)), self.scores, self.maxima)

    @classmethod
    def given(cls, value: float, pixel: float | None = None) -> "Threshold":
        """A user's threshold; the mask threshold defaults to the same value."""
        value = _number("threshold", value)
        return cls(value, value if pixel is None else _number("pixel threshold", pixel), {"method": "user"})


def check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"false_alarm_rate must be a number in [0, 1), got {rate!r}")
    return float(rate)


def check_calibration(calibration):
    """``"cv"`` (leave-one-out / k-fold) or a fraction in (0, 1) held out."""
    if calibration == "cv":
        return calibration
    if isinstance(calibration, bool) or not isinstance(calibration, (int, float)) or not 0.0 < calibration < 1.0:
        raise ValueError(f"calibration must be 'cv' (leave-one-out) or a fraction in (0, 1) held out, "
                         f"got {calibration!r}")
    return float(calibration)


def folds(n: int, calibration, seed: int) -> tuple[str, list[np.ndarray]]:
    """The calibration method and its held-out index sets for ``n`` nominal images.

    A held-out fraction too small to hold out one image (or too large to leave
    one for the bank) falls back to leave-one-out, and the source says so.
    """
    if n < 2:
        raise ValueError(f"a threshold needs at least 2 nominal images to be measured (got {n}): fit on more "
                         "good parts, or give one with DinoPatch(threshold=...)")
    order = np.random.default_rng(seed).permutation(n)
    if calibration != "cv":
        n_cal = int(math.floor(calibration * n))
        if 1 <= n_cal < n:
            return "held-out", [order[:n_cal]]
    k = min(n, MAX_FOLDS)
    return ("leave-one-out" if k == n else "k-fold"), np.array_split(order, k)


def calibrate(n: int, score_held_out: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], *,
              calibration="cv", false_alarm_rate: float = 0.0, seed: int = 0, scale: float = 0.0) -> Threshold:
    """Measure the threshold on nominal images.

    Args:
        n: number of nominal images.
        score_held_out: ``(train, held) -> (scores, maxima)``: the image scores
            and map maxima of images ``held`` against a bank of ``train``.
        calibration: ``"cv"`` or a fraction held out (see :func:`folds`).
        false_alarm_rate: the threshold is the ``1 - rate`` quantile (0: the maximum).
        seed: seeds the split.
        scale: the typical norm of the features the scores are distances between; held-out scores
            all within :data:`IDENTICAL_RTOL` of it are rounding, not evidence (identical images).
    """
    method, held_sets = folds(n, calibration, seed)
    everyone = np.arange(n)
    scores, maxima = [], []
    for held in held_sets:
        s, m = score_held_out(np.setdiff1d(everyone, held), np.sort(held))
        scores.append(s)
        maxima.append(m)
    scores, maxima = np.concatenate(scores), np.concatenate(maxima)
    if not (np.isfinite(scores).all() and np.isfinite(maxima).all()):
        bad = int((~np.isfinite(scores)).sum())
        raise ValueError(f"{bad} of {len(scores)} nominal images gave no finite score during calibration "
                         "(nothing valid to score: check their alignment), so no threshold can be measured")
    # Relative: identical images score rounding noise (1e-10 at 224 px), not exactly 0.
    if scores.max() <= IDENTICAL_RTOL * scale:
        raise ValueError("every nominal image scored 0 against the others, up to rounding (identical images?): a "
                         "threshold "
                         "measured on them would flag any difference; fit on varied good parts or give one")
    source = {"method": method, "images": int(len(scores)), "false_alarm_rate": check_rate(false_alarm_rate)}
    if method == "k-fold":
        source["folds"] = len(held_sets)
    return Threshold(_quantile(scores, false_alarm_rate), _quantile(maxima, false_alarm_rate), source,
                     scores, maxima)


def _quantile(values: np.ndarray, rate: float) -> float:
    # 'higher' picks a measured score, never one interpolated below the one it guards.
    return float(np.quantile(values, 1.0 - rate, method="higher"))


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)
