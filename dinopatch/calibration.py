"""The decision threshold: where it comes from, and what it was measured on.

A line has only good parts to set a threshold with.  Each nominal image is
scored against a bank built without it (leave-one-out; above
:data:`.nominal.MAX_FOLDS` images, that many folds: the nominal set's one
fold plan), so two images already give a finite threshold and every image
serves both bank and calibration.  A fraction held
out instead (``calibration=0.2``) scores those images against a bank of the
rest.  It is never infinite or NaN: where it cannot be measured, fitting
fails and says why, unless the user gives one.

The held-out scores are a conformal calibration set.  The threshold for
``false_alarm_rate=a`` over ``n`` scores is the ``ceil((n + 1)(1 - a))``-th
smallest of them: a new good part exchangeable with those ``n`` scores above it
with probability at most ``a``.  Where ``n`` is too small for ``a``
(that rank is above ``n``), the threshold is the maximum, which promises
``1 / (n + 1)``, and fit warns with the rate it can promise; ``a = 0`` asks for
the maximum on purpose.  A score's p-value is ``(1 + #{scores >= s}) / (n + 1)``.  The defect mask is
judged against each patch location's own level: the held-out distances there give
that location's typical distance, and their largest excess over it a margin at the
same rate, so no labelled defect is needed.
Leave-one-out and k-fold scores come from banks one fold smaller than the
model's, so the model's own scores run lower and the promise errs on the safe side.

:class:`Threshold` carries the value with its source, which model files,
results and the CLI repeat, so a verdict always says what it was judged by.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .metrics import best_f1_threshold, f1_of
from .postprocess import PostProcess, scores_and_maxima

if TYPE_CHECKING:
    from .nominal import NominalSet

# Held-out scores below this fraction of the feature norm are rounding: the distances are exact only to
# 1e-4 of the largest one.
IDENTICAL_RTOL = 1e-4
METHODS = ("leave-one-out", "k-fold", "held-out", "evaluation", "user")


@dataclass(frozen=True)
class Threshold:
    """A decision threshold with its evidence.

    Attributes:
        image: threshold on the image score.
        pixel: one threshold on the anomaly map (the conformal quantile of the held-out
            maps' maxima): the defect mask's where there is no :attr:`pixel_grid`, and
            the scale that map pictures are drawn on.
        source: how it was set: ``method`` (one of :data:`METHODS`), ``images``
            (how many it was measured on), ``false_alarm_rate``, and for an
            evaluation its split.
        scores: the held-out nominal image scores it was measured on (empty
            for a user's threshold).
        maxima: the largest map value of each of those images.
        distances: float32 ``[n, h, w]`` the held-out patch distances of those
            images (canonical frame): the evidence of the scores and of :attr:`pixel_grid`.
        valid: bool ``[n, S, S]`` where each of those images is the part, not padding: with
            ``distances`` and :attr:`measured_with`, its score can be derived again (:meth:`rescored`).
        measured_with: the post-processing the scores were measured with, ``{"sigma", "score",
            "topk"}``; None for a user's threshold.
        tuning_scores, tuning_labels: an evaluation's tuning images' scores and whether each was a
            defect: its threshold's evidence (:func:`tuned_threshold`).
        pixel_tuned: ``pixel`` was tuned by an evaluation on labelled masks and judges the mask
            alone (no :attr:`pixel_grid`).
        mask_kernels, mask_thresholds, mask_counts: where ``pixel_tuned``, the evaluation's mask sweep, its
            evidence: the clean-up kernels ``[K]`` and map thresholds ``[C]`` (increasing) it tried, and the
            tuning pixels' ``(tp, fp, fn)`` with each pair, int ``[K, C, 3]`` (:func:`tuned_mask`).  Empty otherwise.
        fold_rows: int ``[L, sum of k]``, where the banks were coresets: the good parts whose tokens each
            held-out fold's bank kept at each location, fold after fold, in k-center's pick order
            (:meth:`.nominal.NominalSet.held_out_scores`); with the parts' tokens (:mod:`.coreset`) the
            evidence of :attr:`distances`.  Empty otherwise.
    """

    image: float
    pixel: float
    source: dict
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    maxima: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    distances: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32), repr=False,
                                  compare=False)
    valid: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool), repr=False, compare=False)
    measured_with: dict | None = None
    tuning_scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    tuning_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False, compare=False)
    pixel_tuned: bool = False
    fold_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64), repr=False, compare=False)
    mask_kernels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False, compare=False)
    mask_thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    mask_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3), np.int64), repr=False,
                                    compare=False)

    def __post_init__(self):
        # A zero image threshold flags every part; a zero mask threshold only paints the whole part.
        for name, low in (("image", 0.0), ("pixel", -1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                    or not math.isfinite(value) or value <= low:
                raise ValueError(f"{name} threshold must be a finite number > {low:g}, got {value!r}")
        if self.source.get("method") not in METHODS:
            raise ValueError(f"threshold source {self.source.get('method')!r} must be one of {METHODS}")
        if self.distances.size and (self.distances.ndim != 3 or len(self.distances) != self.scores.size
                                    or not np.isfinite(self.distances).all() or self.distances.min() < 0):
            raise ValueError(f"held-out distances {list(self.distances.shape)} must be finite, >= 0 and one "
                             f"grid per calibration score ({self.scores.size})")
        if self.valid.size and self.valid.shape[0] != self.scores.size:
            raise ValueError(f"held-out valid masks {list(self.valid.shape)} must be one per calibration score "
                             f"({self.scores.size})")
        if self.tuning_scores.shape != self.tuning_labels.shape or self.tuning_scores.ndim != 1:
            raise ValueError(f"tuning scores {list(self.tuning_scores.shape)} and labels "
                             f"{list(self.tuning_labels.shape)} must be one label per score")
        images = self.source.get("images")
        if self.source["method"] != "user" and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            raise ValueError(f"a measured threshold must say on how many images, got {images!r}")

    def describe(self) -> str:
        """The source in words, as results and the CLI print it: what the threshold promises, and on what."""
        s = self.source
        if s["method"] == "user":
            return "given by the user"
        if s["method"] == "evaluation":
            return f"tuned by evaluation on {s['images']} images ({s.get('split', 'tuning split')})"
        n, rate = s["images"], s["false_alarm_rate"]
        parts = "held-out good parts" if s["method"] == "held-out" else "good parts"
        how = s["method"] if s["method"] != "k-fold" else f"{s.get('folds', '?')}-fold"
        said = (f"false-alarm rate <= {guarantee(n, rate):.3g} for parts like the {n} {parts} "
                f"(conformal, {how})")
        if rate == 0:
            return f"{said}; the maximum of their scores"
        if conformal_rank(n, rate) > n:
            return f"{said}; {rate:g} was asked, which needs {needed(rate)} good parts"
        # The rank is an integer: the promise is the asked rate or the next one below it that n parts give.
        return said if math.isclose(guarantee(n, rate), rate) else f"{said}; {rate:g} was asked"

    def p_value(self, score: float) -> float | None:
        """Conformal p-value of an image score: ``(1 + #{calibration scores >= score}) / (n + 1)``.

        Small for a part unlike the good ones.  None without calibration scores
        (a user's or an evaluation's threshold) or for a score that is not finite.
        """
        if self.scores.size == 0 or not math.isfinite(score):
            return None
        return (1 + int(np.count_nonzero(self.scores >= score))) / (self.scores.size + 1)

    @cached_property
    def pixel_grid(self) -> np.ndarray | None:
        """The mask threshold of each patch location, float32 ``[h, w]``; None without held-out distances.

        Each location's median held-out good distance, plus one margin for all: the conformal
        quantile, at the same ``false_alarm_rate``, of each held-out good part's largest excess over
        those medians.  Smoothing a map averages its patches, so a good part's map stays below the
        smoothed grid wherever its patches stay below the grid: a good part like the held-out ones
        gets any mask pixel with probability at most :func:`guarantee` (``1 / (n + 1)`` at rate 0).
        The medians are measured on the same parts; one part moves a median by at most one rank.
        """
        if self.distances.size == 0 or self.pixel_tuned:
            return None
        median = np.median(self.distances, axis=0)
        excess = np.maximum((self.distances - median).max(axis=(1, 2)), 0.0)
        margin = _quantile(excess, self.source.get("false_alarm_rate", 0.0), warn=False)
        return (median + margin).astype(np.float32)

    def describe_mask(self) -> str:
        """What the defect mask promises, in words."""
        if self.pixel_grid is None:
            return f"map above {self.pixel:.4g}"
        n = self.scores.size
        return (f"a good part marked with probability <= {guarantee(n, self.source['false_alarm_rate']):.3g} "
                f"(each location's median over the {n} good parts' held-out maps plus a conformal margin)")

    def at_false_alarm_rate(self, rate: float) -> "Threshold":
        """The same evidence read at another false-alarm rate (needs the calibration scores)."""
        check_rate(rate)
        if self.scores.size == 0:
            raise ValueError(f"this threshold was {self.describe()}: there are no calibration scores to "
                             "read another false-alarm rate from; give a threshold instead")
        return self._measured(self.scores, self.maxima, dict(self.source, false_alarm_rate=float(rate)))

    def rescored(self, post) -> "Threshold":
        """The same held-out parts scored with another post-processing (:class:`~.postprocess.PostProcess`), the
        threshold read again from those scores; a user's or an evaluation's threshold is returned as it is."""
        if self.source["method"] in ("user", "evaluation"):
            return self
        scores, maxima = scores_and_maxima(post, self.distances, self.valid)
        return dataclasses.replace(self._measured(scores, maxima, self.source), measured_with=measured_with(post))

    def _measured(self, scores: np.ndarray, maxima: np.ndarray, source: dict) -> "Threshold":
        """This evidence with ``scores`` and ``maxima``, the threshold their conformal quantile at ``source``'s rate
        (a mask value tuned by evaluation is kept)."""
        rate = source["false_alarm_rate"]
        pixel = self.pixel if self.pixel_tuned else _quantile(maxima, rate, warn=False)
        return dataclasses.replace(self, image=_quantile(scores, rate), pixel=pixel, source=source, scores=scores,
                                   maxima=maxima)

    @classmethod
    def given(cls, value: float, pixel: float | None = None) -> "Threshold":
        """A user's threshold; the mask threshold defaults to the same value."""
        value = _number("threshold", value)
        return cls(value, value if pixel is None else _number("pixel threshold", pixel), {"method": "user"})


def check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"false_alarm_rate must be a number in [0, 1), got {rate!r}")
    return float(rate)


def conformal_rank(n: int, rate: float) -> int:
    """The 1-based rank ``ceil((n + 1)(1 - rate))`` of the conformal threshold among ``n`` sorted scores.

    Above ``n`` where ``n`` scores cannot promise ``rate``.
    """
    # The tolerance keeps an exact product such as 10 * 0.9 from rounding up to the next rank.
    return math.ceil((n + 1) * (1.0 - rate) - 1e-9)


def guarantee(n: int, rate: float) -> float:
    """The false-alarm rate a conformal threshold on ``n`` scores promises when ``rate`` is asked."""
    return (n + 1 - min(conformal_rank(n, rate), n)) / (n + 1)


def needed(rate: float) -> int:
    """How many calibration scores a conformal threshold at ``rate > 0`` needs."""
    return math.ceil(1.0 / rate - 1.0 - 1e-9)


def check_calibration(calibration):
    """``"cv"`` (leave-one-out / k-fold) or a fraction in (0, 1) held out."""
    if calibration == "cv":
        return calibration
    if isinstance(calibration, bool) or not isinstance(calibration, (int, float)) or not 0.0 < calibration < 1.0:
        raise ValueError(f"calibration must be 'cv' (leave-one-out) or a fraction in (0, 1) held out, "
                         f"got {calibration!r}")
    return float(calibration)


def calibrate(nominal: "NominalSet", settings: dict, *, calibration="cv", false_alarm_rate: float = 0.0
              ) -> Threshold:
    """Measure the threshold on nominal images.

    Args:
        nominal: the good parts and their fold plan (:class:`~.nominal.NominalSet`).
        settings: the model's resolved parameters (bank and post-processing).
        calibration: ``"cv"``, every fold of the plan held out in turn; or a fraction held out,
            the first images of the plan's order (too small to hold out one image, or too large
            to leave one for the bank, it falls back to ``"cv"`` and the source says so).
        false_alarm_rate: the rate the threshold promises (conformal; 0: the maximum).
    """
    n = len(nominal)
    if n < 2:
        raise ValueError(f"a threshold needs at least 2 nominal images to be measured (got {n}): fit on more "
                         "good parts, or give one with DinoPatch(threshold=...)")
    held_sets = None if calibration == "cv" else nominal.plan.fraction(calibration)
    method = "held-out" if held_sets else nominal.plan.method
    held_sets = held_sets or nominal.plan.folds
    index, scores, maxima, distances, kept = nominal.held_out_scores(settings, held_sets)
    if not (np.isfinite(scores).all() and np.isfinite(maxima).all()):
        bad = int((~np.isfinite(scores)).sum())
        raise ValueError(f"{bad} of {len(scores)} nominal images gave no finite score during calibration "
                         "(nothing valid to score: check their alignment), so no threshold can be measured")
    # Relative to the features' norm: identical images score rounding noise, not exactly 0, far below any
    # real difference.
    if scores.max() <= IDENTICAL_RTOL * _feature_scale(nominal.tokens):
        raise ValueError("every nominal image scored 0 against the others, up to rounding (identical images?): a "
                         "threshold measured on them would flag any difference; fit on varied good parts or give one")
    source = {"method": method, "images": int(len(scores)), "false_alarm_rate": check_rate(false_alarm_rate)}
    if method == "k-fold":
        source["folds"] = len(held_sets)
    post = PostProcess(settings["sigma"], settings["score"], settings["topk"], settings["morph_kernel"])
    return Threshold(_quantile(scores, false_alarm_rate), _quantile(maxima, false_alarm_rate, warn=False), source,
                     scores, maxima, distances, nominal.valid[index] > 0.5, measured_with(post),
                     fold_rows=np.zeros((0, 0), np.int64) if kept is None else kept)


def measured_with(post) -> dict:
    """What of a post-processing decides an image score: ``{"sigma", "score", "topk"}``."""
    return {"sigma": float(post.sigma), "score": post.score, "topk": float(post.topk)}


def tuned_threshold(labels: np.ndarray, scores: np.ndarray, reach: float = math.inf) -> float:
    """An evaluation's image threshold from its tuning images' ``scores`` and ``labels`` (True: a defect).

    The best-F1 score, then halfway into the gap below it rather than at its edge: the reported
    images are unseen, and a threshold at a tuning score's edge misses the next defect that
    scores a little lower.  At most ``reach`` (the bank's, :func:`.evidence.reach`): no good part
    scores above it, so a higher threshold, which a few tuning images can give, only passes defects.
    """
    t, _ = best_f1_threshold(labels, scores)
    below = scores[scores < t]
    return min(float((t + below.max()) / 2) if below.size else float(np.nextafter(t, -np.inf)), reach)


def tuned_mask(kernels: np.ndarray, thresholds: np.ndarray, counts: np.ndarray) -> tuple[float, int]:
    """An evaluation's mask threshold and clean-up kernel from its sweep (:attr:`Threshold.mask_counts`).

    The best F1 of the tuning pixels, the first of equals in the order tried: kernel after kernel, each
    threshold from the lowest.  A sweep without a labelled defect pixel gives its first pair.
    """
    best, at = -1.0, (0, 0)
    for i in range(len(kernels)):
        for j in range(len(thresholds)):
            f1 = f1_of(*(int(c) for c in counts[i, j]))
            if f1 > best + 1e-12:
                best, at = f1, (i, j)
    return float(thresholds[at[1]]), int(kernels[at[0]])


def threshold_for(nominal: "NominalSet", settings: dict, params: dict) -> Threshold:
    """The threshold a fit ends with: the one given (``params["threshold"]``), else one calibrated on
    ``nominal`` with ``settings`` as ``params`` ask (``calibration``, ``false_alarm_rate``)."""
    if params["threshold"] is not None:
        return Threshold.given(params["threshold"])
    return calibrate(nominal, settings, calibration=params["calibration"], false_alarm_rate=params["false_alarm_rate"])


def _feature_scale(tokens: np.ndarray) -> float:
    """The median norm of the tokens (zero rows lie outside the part's region and do not count)."""
    norms = np.linalg.norm(tokens, axis=-1)
    norms = norms[norms > 0]
    return float(np.median(norms)) if norms.size else 0.0


def _quantile(values: np.ndarray, rate: float, warn: bool = True):
    """The finite-sample conformal quantile over the first axis (see the module's text); the maximum where
    ``rate`` is out of reach.  A float for 1-d ``values``, else an array of the remaining shape."""
    n = len(values)
    rank = conformal_rank(n, rate)
    if warn and rate > 0 and rank > n:
        warnings.warn(f"false_alarm_rate {rate:g} needs at least {needed(rate)} good parts; the {n} here "
                      f"can promise {guarantee(n, rate):.3g} (1/{n + 1}) at best: the threshold is their "
                      "maximum", UserWarning, stacklevel=3)
    out = np.sort(values, axis=0)[min(rank, n) - 1]
    return float(out) if np.ndim(values) == 1 else out


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)
