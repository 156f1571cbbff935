"""The good set checked at fit: images that are not evidence of a good part are named, and left out.

One odd image among the good ones moves the threshold: a frame with no part,
or a defective part, scores far above the rest when held out, and the
threshold (the maximum of those scores at ``false_alarm_rate=0``) follows it;
a duplicate makes its twin score near zero held out.  Fit names each image that
is, with the reason:

* ``"no part"``: the aligner finds no part in it or doubts the pose (alignment on);
* ``"duplicate"``: its thumbnail (:data:`THUMB` px gray) is within
  :data:`NEAR_GRAY` gray levels (mean absolute difference) of an earlier image's;
* ``"outlier"``: its held-out score (each image against a bank of the folds
  without it, with the documented default settings for every ``"auto"`` and
  tolerance 0 for a tolerance that fit measures on what is kept) is above the
  median of the held-out scores by :data:`K` robust spreads of their
  logarithms (``1.4826 * MAD``) and by a ratio: :data:`LOCAL_RATIO` where a
  few patches are raised (its score stands :data:`PEAKED` times further above
  the median than its map's 90th percentile stands above the others': a
  defect), :data:`RATIO` where the whole map is raised with it (a good part
  shot a little differently); from :data:`MIN_IMAGES` images on.  Logarithms,
  as a distance has no natural unit and good parts' scores spread by factors:
  where a few good parts lie far from the rest (a band that slides) the spread
  grows with them, and where the good parts agree the ratio decides.

``outliers="drop"`` (the default) leaves them out of the bank and the threshold
and says so in :class:`FitReport`; ``"keep"`` keeps them on purpose (they are
still named); ``"error"`` refuses the set.
"""
from __future__ import annotations

import dataclasses
import math
import os

import cv2
import numpy as np

from . import margin
from .align import Aligner
from .autotune import DEFAULTS, defaults
from .data import load_images
from .nominal import NominalSet

OUTLIERS = ("drop", "keep", "error")
REASONS = ("no part", "duplicate", "outlier")
THUMB = 32
# Below a quarter of a gray level on the thumbnails two images are the same picture (a re-encoded copy
# lands there), above it sensor noise alone already separates two shots of one fixtured part.
NEAR_GRAY = 0.25
K = 3.0
# A defective part hidden among the good ones scores about twice their median when held out (a broken or
# bent comb tooth, a cracked wheel) on a few patches, and its own tooth or crack in the bank then lets
# every like defect pass.  A good part whose whole map is raised with its score (a board shifted
# furthest, light a little off) reaches 1.8x, so there the ratio stays where a frame with a wrong or no
# part lies; a good part with a few patches so far above the rest is rare, and worth a look (a person
# may keep it with outliers='keep').  The ratios also guard where the spread is near zero (the scores
# nearly equal) and K alone would flag the first image a little off.
RATIO = 3.0
LOCAL_RATIO = 1.8
PEAKED = 1.5
MIN_IMAGES = 5


@dataclasses.dataclass(frozen=True)
class Flag:
    """One image named by the check: ``name`` (its path, or ``#index`` for an array), its ``index`` in
    the input, ``reason`` (one of :data:`REASONS`) and ``detail`` in words."""

    name: str
    index: int
    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class FitReport:
    """What fit made of its good set.

    Attributes:
        images: how many it was given.
        used: how many the bank and the threshold were made of.
        outliers: the policy (one of :data:`OUTLIERS`).
        flagged: the named images, in input order within each reason.
        scores: ``((name, held-out score, its map's 90th percentile), ...)`` the outlier rule judged, in
            input order (empty below :data:`MIN_IMAGES`).
        k, ratio: the rule's :data:`K` and :data:`RATIO`.
    """

    images: int
    used: int
    outliers: str
    flagged: tuple
    scores: tuple
    k: float = K
    ratio: float = RATIO

    def describe(self) -> str:
        """Lines a person reads: what was named, why, and what fit did with it."""
        done = {"drop": "left out of the bank and the threshold", "keep": "kept on purpose (outliers='keep')",
                "error": "refused"}[self.outliers]
        head = f"good set: {self.used} of {self.images} images used"
        return "\n".join([head] + [f"  {f.name}: {f.reason} ({f.detail}); {done}" for f in self.flagged])

    def kept(self) -> list[int]:
        """The input indices of the images the bank and the threshold were made of, in input order."""
        return _unflagged(self.images, self.flagged, self.outliers)

    def record(self) -> dict:
        """The model file's form (JSON)."""
        return {"images": self.images, "used": self.used, "outliers": self.outliers, "k": self.k, "ratio": self.ratio,
                "flagged": [dataclasses.asdict(f) for f in self.flagged], "scores": [list(p) for p in self.scores]}

    @classmethod
    def from_record(cls, record) -> "FitReport":
        """A model file's report, checked: the outlier flags must be the ones its scores give.

        Raises:
            ValueError: malformed, or its flags or counts disagree with its evidence (the file was edited).
        """
        if not isinstance(record, dict) or set(record) != {"images", "used", "outliers", "k", "ratio", "flagged",
                                                                     "scores"}:
            raise ValueError(f"fit report malformed: {record!r:.200}")
        images, used, k, scores = record["images"], record["used"], record["k"], record["scores"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (images, used)) or not 1 <= used <= images:
            raise ValueError(f"fit report counts {images!r}, {used!r} are not 1 <= used <= images")
        if record["outliers"] not in OUTLIERS or record["outliers"] == "error" or k != K or record["ratio"] != RATIO:
            raise ValueError(f"fit report policy {record['outliers']!r} or rule (k={k!r}, ratio={record['ratio']!r}) "
                             "is not this version's")
        if not isinstance(scores, list) or not all(
                isinstance(p, list) and len(p) == 3 and isinstance(p[0], str)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p[1:])
                for p in scores):
            raise ValueError("fit report scores malformed")
        scores = tuple((n, float(v), float(t)) for n, v, t in scores)
        flags = record["flagged"]
        if not isinstance(flags, list) or not all(
                isinstance(f, dict) and set(f) == {"name", "index", "reason", "detail"} and f["reason"] in REASONS
                and isinstance(f["index"], int) and not isinstance(f["index"], bool) and 0 <= f["index"] < images
                and all(isinstance(f[k], str) for k in ("name", "reason", "detail")) for f in flags):
            raise ValueError("fit report flags malformed")
        flagged = tuple(Flag(**f) for f in flags)
        said = sorted(f.name for f in flagged if f.reason == "outlier")
        if said != sorted(outlier_names(scores)):
            raise ValueError(f"fit report names outliers {said} but its scores give {outlier_names(scores)}: "
                             "the file was edited")
        dropped = len(flagged) if record["outliers"] == "drop" else 0
        if used != images - dropped:
            raise ValueError(f"fit report says {used} of {images} used with {dropped} left out")
        return cls(images, used, record["outliers"], flagged, scores, float(k), float(record["ratio"]))


def load_named(images) -> tuple[list[np.ndarray], list[str]]:
    """:func:`.data.load_images`, and each image's name for the report: its path, or ``#index`` for an array.

    Raises:
        ValueError: no image, or one that cannot be read.
    """
    if isinstance(images, (np.ndarray, str, bytes, os.PathLike)):
        return load_images(images), []  # refused there, with the message for a single image
    try:
        items = list(images)
    except TypeError:
        return load_images(images), []
    if not items:
        raise ValueError("fit needs at least one nominal image, got none")
    names = [os.fsdecode(im) if isinstance(im, (str, bytes, os.PathLike)) else f"#{i}" for i, im in enumerate(items)]
    return load_images(items), names


def screen(placed: list, names: list[str]) -> list[Flag]:
    """The flags that need no backbone: frames with no part (or a doubted pose) and duplicates.

    Args:
        placed: each image's :class:`~.align.Placement` (with alignment off, every pose is trusted).
    """
    flags = [Flag(name, i, "no part", p.alignment.reason or "pose not trusted")
             for i, (name, p) in enumerate(zip(names, placed)) if not p.alignment.trusted]
    seen = {f.index for f in flags}
    thumbs = np.stack([_thumbnail(p.image) for p in placed])
    for j in range(1, len(placed)):
        if j in seen:
            continue
        diff = np.abs(thumbs[:j] - thumbs[j]).mean(axis=(1, 2))
        diff[[i for i in seen if i < j]] = np.inf  # a twin of a flagged image is judged on its own
        i = int(np.argmin(diff))
        if diff[i] <= NEAR_GRAY:
            what = "identical to" if diff[i] == 0 else f"{diff[i]:.2f} gray levels from"
            flags.append(Flag(names[j], j, "duplicate", f"{what} {names[i]}"))
            seen.add(j)
    return flags


def kept(count: int, flags: list[Flag], outliers: str) -> list[int]:
    """The input indices fit goes on with: all but the flagged under ``"drop"``; ``"error"`` raises."""
    _refuse(flags, outliers)
    keep = _unflagged(count, flags, outliers)
    if len(keep) < 2 <= count:  # what is left cannot even measure a threshold: say what was left out
        raise ValueError(f"only {len(keep)} of the {count} good images are evidence of a good part; left out:\n"
                         + "\n".join(f"  {f.name}: {f.reason} ({f.detail})" for f in flags)
                         + "\nfit on more varied good parts, or keep them on purpose with outliers='keep'")
    return keep


def judge(nominal: NominalSet, names: list[str], indices: list[int], flags: list[Flag], settings: dict,
          outliers: str, seed: int) -> tuple[FitReport, NominalSet]:
    """Add the held-out score rule to the ``flags`` of :func:`screen` and apply the policy.

    Args:
        nominal: the nominal set of the input images ``indices`` (from :func:`kept`).
        names: every input image's name.
        settings: bank and post-processing settings the rule scores with.
        seed: re-plans the folds of what is left.

    Returns:
        The report and the nominal set the bank and threshold are made of.
    """
    scores, flags = (), list(flags)
    if len(nominal) >= MIN_IMAGES:
        index, values, _, maps, _ = nominal.held_out_scores(settings)
        by_row = {int(r): (round(float(s), 6), round(float(np.nanpercentile(m, 90)), 6))
                  for r, s, m in zip(index, values, maps) if math.isfinite(s)}
        scores = tuple((names[indices[r]], *by_row[r]) for r in sorted(by_row))  # input order
        limits, peaked = outlier_limits(scores), _peaked(scores)
        med = float(np.median([s for _, s, _ in scores]))
        flags += [Flag(names[indices[r]], indices[r], "outlier",
                       f"held-out score {s:.3g}, {s / med if med > 0 else math.inf:.1f} x the median {med:.3g}, "
                       f"above {limit:.3g} ({'a few patches' if few else 'its whole map'} raised)")
                  for (r, (s, _)), limit, few in zip(sorted(by_row.items()), limits, peaked) if s > limit]
    _refuse(flags, outliers)
    kept_inputs = set(_unflagged(len(names), flags, outliers))
    keep = [r for r, i in enumerate(indices) if i in kept_inputs]
    if len(keep) < len(nominal):
        nominal = nominal.subset(np.array(keep), seed)
    flags.sort(key=lambda f: (REASONS.index(f.reason), f.index))
    return FitReport(len(names), len(nominal), outliers, tuple(flags), scores), nominal


def aligner_for(params: dict) -> Aligner:
    """The unfitted :class:`~.align.Aligner` fit uses for the detector's checked ``params``."""
    return Aligner(size=params["image_size"], enabled=params["align"], mirror=params["mirror"],
                   size_tolerance=params["size_tolerance"], register=params["register"])


def checked(images: list[np.ndarray], names: list[str], engine, params: dict,
            kernel: str | None = None) -> tuple[FitReport, NominalSet]:
    """The good set checked, as fit uses it: aligned once (an :class:`~.align.Aligner` fitted on ``images``),
    :func:`screen`, :func:`kept`, embedded on the region :mod:`.margin` chooses, :func:`judge`.

    Args:
        images, names: the nominal images and their names (:func:`load_named`).
        engine: the backbone.
        params: the detector's checked parameters (``image_size``, ``align``, ``mirror``, ``size_tolerance``,
            ``outliers``, ``foreground``, ``seed``, ``batch_size``, ``progress``); the good set is judged with
            :data:`.autotune.DEFAULTS` for every ``"auto"``, and tolerance 0 for ``"auto"`` and ``"map"``, so
            that neither auto nor the map is measured on what is left out.
        kernel: the distance kernel.
    """
    aligner = aligner_for(params).fit(images)
    placed = [aligner.place(im) for im in images]  # each image aligned once, for the screen and the nominal set
    flags = screen(placed, names)
    keep = kept(len(images), flags, params["outliers"])
    settings = defaults(params)
    measured = isinstance(params["tolerance"], str)  # "auto" or "map": chosen after this check
    if measured:
        settings["tolerance"] = DEFAULTS["tolerance"]
    nominal = margin.nominal_set([placed[i] for i in keep], aligner, engine, params, settings, kernel)
    if nominal.foreground is not None:  # the background check's samples are of the parts kept so far
        nominal = dataclasses.replace(nominal, foreground=nominal.foreground.of_parts(keep))
    # A defect among the good parts is judged where no good match next door can hide it: auto may choose
    # tolerance 0 later (a registered board), and the defect would then set the threshold.
    return judge(nominal, names, keep, flags, dict(settings, tolerance=0) if measured else settings,
                 params["outliers"], params["seed"])


def outlier_names(scores) -> list[str]:
    """The names of ``(name, score, typical)`` triples whose score is above the rule's limit for it."""
    if len(scores) < MIN_IMAGES:
        return []
    return [n for (n, s, _), limit in zip(scores, outlier_limits(scores)) if s > limit]


def outlier_limits(scores) -> list[float]:
    """Each image's limit under the rule, for ``(name, held-out score, its map's 90th percentile)`` triples:
    :func:`outlier_limit` with :data:`LOCAL_RATIO` where the score's ratio to the median score is at least
    :data:`PEAKED` times the percentile's ratio to the median percentile."""
    values = [s for _, s, _ in scores]
    return [outlier_limit(values, LOCAL_RATIO if p else RATIO) for p in _peaked(scores)]


def outlier_limit(values: list[float], ratio: float = RATIO) -> float:
    """The outlier rule's limit over held-out good scores: ``median * max(exp(K * spread), ratio)``, where
    ``spread`` is ``1.4826 * MAD`` of the scores' logarithms about the median's; by default the limit for a
    score whose whole map is raised."""
    values = np.asarray(values, float)
    med = float(np.median(values))
    if not med > 0:  # half the good parts score nothing held out: any score above is far from them
        return 0.0
    # A score near zero (a near twin of another image) says nothing of the spread: floored at a thousandth.
    logs = np.log(np.maximum(values, 1e-3 * med) / med)
    spread = 1.4826 * float(np.median(np.abs(logs)))
    return med * max(math.exp(K * spread), ratio)


def _peaked(scores) -> np.ndarray:
    """bool ``[n]``: whether each score's ratio to the median score is at least :data:`PEAKED` times its map's
    percentile's ratio to the median percentile (a few patches raised, not the whole map)."""
    values = np.array([s for _, s, _ in scores], float)
    typical = np.array([t for _, _, t in scores], float)
    # Multiplied out, so that a median of zero divides nothing.
    return values * float(np.median(typical)) >= PEAKED * float(np.median(values)) * typical


def _unflagged(count: int, flags, outliers: str) -> list[int]:
    """The input indices of ``count`` images that no flag names (all of them under ``"keep"``), in order."""
    named = {f.index for f in flags}
    return [i for i in range(count) if outliers == "keep" or i not in named]


def _refuse(flags: list[Flag], outliers: str) -> None:
    if outliers == "error" and flags:
        raise ValueError("the good set holds images that are not evidence of a good part (outliers='error'):\n"
                         + "\n".join(f"  {f.name}: {f.reason} ({f.detail})" for f in flags))


def _thumbnail(image: np.ndarray) -> np.ndarray:
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.resize(gray.astype(np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA)
