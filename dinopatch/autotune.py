"""Settings chosen from good parts alone: ``tolerance``, ``sigma``, ``score`` and ``match`` set to ``"auto"``.

A line has no defect samples to tune with, so the choices are measured on the
nominal images themselves, each scored against a bank built without it
(:data:`FOLDS` folds):

* **tolerance** is bounded by the residual misalignment among nominal parts.
  Each held-out patch is matched within growing neighbourhoods (Chebyshev
  radius 0, 1, 2 grid steps); its offset is the smallest radius whose match
  is within :data:`.tolerance.MARGIN` of the best over all radii
  (:func:`.tolerance.offset_counts`, per location).  The bound is the
  smallest radius beyond which at most :data:`SHARE` of the patches lie.
  Where the locations' offsets differ, the tolerance map
  (:func:`.tolerance.tolerance_map`, a radius per location) is one more
  candidate, after the single radii: it must separate better by the margin.
  Within the bound the pasted defects below decide (the bound wins ties): a
  tolerance lets a small defect find a good match next door, so the radius
  that absorbs the most misalignment is not always the one that separates best.
* **sigma, score, match** (and the tolerance within its bound): synthetic
  defects the model has never seen (a patch cut from another part and pasted,
  a thin scratch, a blob, a contrast change) are pasted into held-out nominal
  images; the candidate that best separates them from the held-out nominal
  images (image AUROC) wins; the bound and then :data:`DEFAULTS` stand unless
  another candidate separates better by more than :data:`WIN_MARGIN`.

Below :data:`MIN_IMAGES` nominal images nothing can be measured: the choice is
:data:`DEFAULTS` and the record's ``fallback`` is True.

The record (:func:`resolve`) goes into the model file, where :func:`check_record`
derives the choice from its evidence again and refuses a file whose recorded
choice disagrees, and into the evaluation report.
"""
from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

from . import metrics, tolerance
from .bank import MATCHES
from .postprocess import SCORES, PostProcess
from .tolerance import RADII

AUTO_PARAMS = ("tolerance", "sigma", "score", "match")
# What "auto" falls back to when a choice cannot be measured, and wins ties: the seed's settings.
DEFAULTS = {"tolerance": 1, "sigma": 4.0, "score": "max", "match": "local"}
MIN_IMAGES = 3  # two folds of one image each leave one-image banks: too few to rank settings
SIGMAS = (4.0, 0.0, 2.0, 8.0)
SHARE = 0.05
FOLDS = 5
# Image AUROC a candidate must gain over the one before it in search order to be chosen: with 6 nominal
# and 12 pasted images one pair is 0.014, and candidates on random weights differ by that at chance.
WIN_MARGIN = 0.02
# Nominal images that receive pasted defects (one of each kind), at most half the fit's: the pasted
# images are embedded on top of the nominal ones, so a small fit stays cheap.
SOURCES = 8
KINDS = ("cutpaste", "scratch", "blob", "contrast")


def wanted(params: dict) -> list[str]:
    """The parameters set to ``"auto"``."""
    return [n for n in AUTO_PARAMS if isinstance(params.get(n), str) and params[n] == "auto"]


def resolved(params: dict, record: dict | None) -> dict:
    """``params`` with each ``"auto"`` replaced by the recorded choice."""
    chosen = record["chosen"] if record else {}
    return {k: chosen[k] if k in chosen and v == "auto" else v for k, v in params.items()}


def without(record: dict | None, names) -> dict | None:
    """``record`` without the choices of ``names`` (set by hand since); None when no choice is left."""
    if record is None or not set(record["chosen"]) - set(names):
        return None
    return dict(record, chosen={k: v for k, v in record["chosen"].items() if k not in names})


def folds(n: int, seed: int) -> list[np.ndarray]:
    """The held-out folds of ``n`` nominal images, seeded."""
    return np.array_split(np.random.default_rng(seed).permutation(n), min(FOLDS, n))


def measure_offsets(params: dict, tokens: np.ndarray, positions=None, backend: str | None = None):
    """Per-location offsets of held-out patches (:func:`.tolerance.offset_counts`) when ``tolerance`` is
    ``"auto"`` or ``"map"``; None otherwise, or for ``"auto"`` with fewer than :data:`MIN_IMAGES` images.

    Raises:
        ValueError: ``tolerance="map"`` with fewer than :data:`MIN_IMAGES` nominal images.
    """
    mode = params["tolerance"]
    if not isinstance(mode, str) or mode not in ("auto", "map"):
        return None
    if len(tokens) < MIN_IMAGES:
        if mode == "map":
            raise ValueError(f"tolerance='map' needs at least {MIN_IMAGES} nominal images to measure offsets, "
                             f"got {len(tokens)}")
        return None
    return tolerance.offset_counts(tokens, folds(len(tokens), params["seed"]), positions, backend)


def _map_differs(offsets, side: int) -> bool:
    return offsets is not None and tolerance.differs(tolerance.tolerance_map(offsets, (side, side), side - 1),
                                                     offsets)


def resolve(params: dict, tokens: np.ndarray, canon: list, embed: Callable, held_out: Callable,
            positions=None, backend: str | None = None, offsets: np.ndarray | None = None) -> dict | None:
    """Measure a value for every ``"auto"`` in ``params``.

    Args:
        params: checked detector parameters.
        tokens: ``[N, h, w, D]`` oriented tokens of the nominal images (zero outside ``positions``).
        canon: per nominal image ``(canonical uint8 image, valid [S, S], alignment)``.
        embed: canonical images -> ``(tokens, flips)``, oriented and placed like ``tokens``.
        held_out: ``(settings, train, tokens, flips, frames) -> [B, h, w]`` distances of query tokens
            against a bank of nominal images ``train`` built with ``settings`` (``tolerance``: a radius or
            ``"map"``, ``match``), turned back and completed as the detector scores them.
        offsets: :func:`measure_offsets` of these tokens (needed when ``tolerance`` is ``"auto"``).
        positions: the region the bank covers (None: the whole grid).
        backend: distance kernel backend.

    Returns:
        ``{"chosen": {name: value}, "fallback": bool, "evidence": {...}}``, or None when nothing is "auto".
    """
    names = wanted(params)
    if not names:
        return None
    n = len(tokens)
    if n < MIN_IMAGES:
        return {"chosen": {k: DEFAULTS[k] for k in names}, "fallback": True,
                "evidence": {"images": n, "note": f"fewer than {MIN_IMAGES} nominal images: defaults used"}}
    evidence: dict = {"images": n, "searched": names}
    bound = params["tolerance"] if "tolerance" not in names else None
    with_map = False
    if bound is None:
        if offsets is None:
            offsets = measure_offsets(params, tokens, positions, backend)
        # Rounded before choosing, so that the model file's check derives the same bound from them.
        evidence["offset_share"] = _rounded_shares(offsets)
        bound = choose_tolerance(evidence["offset_share"], tokens.shape[1] - 1)
        with_map = _map_differs(offsets, tokens.shape[1])
    table = _separation(params, names, bound, tokens, canon, embed, held_out, folds(n, params["seed"]), with_map)
    evidence["image_auroc"] = table
    return {"chosen": dict(zip(names, _winner(table, names, params, bound, with_map))), "fallback": False,
            "evidence": evidence}


def _rounded_shares(offsets: np.ndarray) -> list[float]:
    return [round(float(s), 4) for s in tolerance.shares(offsets)]


def choose_tolerance(shares, largest: int) -> int:
    """The smallest radius with at most :data:`SHARE` of the patches displaced beyond it."""
    beyond = 1.0 - np.cumsum(shares)
    return int(min(np.flatnonzero(beyond <= SHARE + 1e-3)[0], largest))  # 1e-3: the shares' rounding


def paste_defect(image: np.ndarray, valid: np.ndarray, donor: np.ndarray, kind: str,
                 rng: np.random.Generator) -> np.ndarray:
    """A copy of ``image`` with one synthetic defect of ``kind`` (see :data:`KINDS`) inside ``valid``."""
    out, size = image.copy(), image.shape[0]
    ys, xs = np.nonzero(valid > 0.5)
    k = rng.integers(len(ys))
    c = np.array([xs[k], ys[k]], float)
    if kind == "cutpaste":
        s = max(2, int(rng.uniform(0.04, 0.08) * size))
        x0, y0 = (int(v) for v in np.clip(c - s // 2, 0, size - s))
        sx, sy = (int(v) for v in rng.integers(0, size - s, 2))
        out[y0:y0 + s, x0:x0 + s] = donor[sy:sy + s, sx:sx + s]
        return out
    region = np.zeros(image.shape[:2], np.uint8)
    if kind == "scratch":
        t = rng.uniform(0, np.pi)
        d = np.array([np.cos(t), np.sin(t)]) * rng.uniform(0.05, 0.12) * size
        ends = [tuple(int(v) for v in np.rint(p)) for p in (c - d, c + d)]
        cv2.line(region, ends[0], ends[1], 255, max(1, round(0.006 * size)))
    else:
        axes = tuple(int(max(1, v)) for v in rng.uniform(0.015, 0.04, 2) * size)
        cv2.ellipse(region, tuple(int(v) for v in c), axes, rng.uniform(0, 180), 0, 360, 255, -1)
    sel = region > 0
    pixels = out[sel].astype(np.float32)
    mean = pixels.mean(0)
    if kind == "contrast":
        pixels = mean + (pixels - mean) * rng.uniform(0.2, 0.5) + rng.choice([-1, 1]) * rng.uniform(15, 30)
    else:  # a scratch or a blob: its own colour, darker or lighter than what it covers
        shade = mean * rng.uniform(0.6, 0.8) if rng.random() < 0.5 else mean + rng.uniform(25, 50)
        pixels = np.broadcast_to(shade, pixels.shape)
    out[sel] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return out


def _candidates(names: list[str], params: dict, bound, with_map: bool = False) -> list[tuple]:
    """``(tolerance, match, sigma, score)`` in search order: the bound first, then the defaults, the map last."""
    def first(name, values):
        if name not in names:
            return (params[name],)
        return (DEFAULTS[name],) + tuple(v for v in values if v != DEFAULTS[name])

    radii = [*range(bound, -1, -1), *(["map"] if with_map else [])] if "tolerance" in names else (bound,)
    return [(r, m, float(g), s) for r in radii for m in first("match", MATCHES)
            for g in first("sigma", SIGMAS) for s in first("score", SCORES)]


def _key(tolerance, match, sigma, score) -> str:
    return f"tolerance={tolerance} match={match} sigma={sigma:g} score={score}"


def _separation(params, names, bound, tokens, canon, embed, held_out, folds, with_map) -> dict:
    """Image AUROC of held-out nominal vs. pasted-defect images, per candidate (:func:`_candidates`)."""
    rng = np.random.default_rng([params["seed"], 1])
    n = len(tokens)
    pasted, origin = [], []
    for i in rng.permutation(n)[:min(SOURCES, n // 2)]:
        for kind in KINDS:
            donor = canon[int(rng.integers(n))][0]
            pasted.append(paste_defect(canon[i][0], canon[i][1], donor, kind, rng))
            origin.append(int(i))
    p_tokens, p_flips = embed(pasted)
    origin, p_frames = np.array(origin), np.stack(pasted)
    frames, flips = np.stack([c[0] for c in canon]), np.zeros(n, bool)  # nominal tokens are oriented
    y = np.r_[np.zeros(n, bool), np.ones(len(pasted), bool)]
    table, maps = {}, {}
    for radius, match, sigma, score in _candidates(names, params, bound, with_map):
        if (radius, match) not in maps:
            nominal = np.empty(tokens.shape[:3], np.float32)
            defect = np.empty((len(pasted),) + tokens.shape[1:3], np.float32)
            settings = dict(tolerance=radius, match=match)
            for held in folds:
                train = np.setdiff1d(np.arange(n), held)
                nominal[held] = held_out(settings, train, tokens[held], flips[held], frames[held])
                here = np.flatnonzero(np.isin(origin, held))
                if here.size:
                    defect[here] = held_out(settings, train, p_tokens[here], p_flips[here], p_frames[here])
            maps = {(radius, match): (nominal, defect)}  # the candidates come grouped by bank
        nominal, defect = maps[(radius, match)]
        post = PostProcess(sigma, score, params["topk"], params["morph_kernel"])
        s = np.array([post.score_map(d, canon[i][1])[1] for i, d in enumerate(nominal)]
                     + [post.score_map(d, canon[origin[j]][1])[1] for j, d in enumerate(defect)])
        ok = np.isfinite(s)
        auc = metrics.auroc(y[ok], s[ok]) if ok.any() else float("nan")
        table[_key(radius, match, sigma, score)] = round(auc, 4) if math.isfinite(auc) else None
    return table


def _winner(table: dict, names: list[str], params: dict, bound, with_map: bool = False) -> list:
    """The values of ``names`` in the table's best entry.

    A candidate must beat the one before it in search order (the bound, then the defaults) by more than
    :data:`WIN_MARGIN` to displace it: the pasted defects are few, and a smaller difference is noise.
    The order is the search's, not the table's (the model file may store the keys sorted).
    """
    order = [_key(*c) for c in _candidates(names, params, bound, with_map)]
    best, best_auc = order[0], -math.inf
    for key in order:
        auc = table.get(key)
        if auc is not None and auc > best_auc + WIN_MARGIN:
            best, best_auc = key, auc
    values = dict(item.split("=", 1) for item in best.split(" "))
    cast = {"tolerance": lambda v: v if v == "map" else int(v), "sigma": float, "score": str, "match": str}
    return [cast[n](values[n]) for n in names]


def check_record(record, params: dict, side: int, offsets: np.ndarray | None = None) -> dict:
    """A model file's auto record, checked against its parameters and its own evidence (never executed).

    ``offsets``: the file's checked per-location offsets (:func:`.tolerance.check_offsets`), or None.

    Raises:
        ValueError: the record (of a fit on a ``side`` x ``side`` token grid) is malformed, does not
            cover exactly the ``"auto"`` parameters, or its choice is not the one its evidence gives
            (the file was edited).
    """
    names = wanted(params)
    if not names:
        if record is not None:
            raise ValueError("an auto record but no parameter is 'auto'")
        return record
    if not isinstance(record, dict) or set(record) != {"chosen", "fallback", "evidence"}:
        raise ValueError(f"auto record malformed: {record!r:.200}")
    chosen, evidence = record["chosen"], record["evidence"]
    if not isinstance(chosen, dict) or sorted(chosen) != sorted(names) or not isinstance(evidence, dict) \
            or not isinstance(record["fallback"], bool):
        raise ValueError(f"auto record does not cover exactly the 'auto' parameters {names}: {chosen!r:.200}")
    if record["fallback"]:
        expected = {k: DEFAULTS[k] for k in names}
    else:
        # What fit searched; a copy tuned by hand since (DinoPatch.tuned) keeps the rest of its choice.
        searched = evidence.get("searched")
        if not isinstance(searched, list) or len(set(searched)) != len(searched) \
                or not set(names) <= set(searched) <= set(AUTO_PARAMS):
            raise ValueError(f"auto record's searched parameters {searched!r:.100} do not cover {names}")
        table = evidence.get("image_auroc")
        if not isinstance(table, dict) or not table or not all(
                isinstance(k, str) and (v is None or (isinstance(v, float) and 0.0 <= v <= 1.0))
                for k, v in table.items()):
            raise ValueError("auto record's separation evidence is malformed")
        bound = params["tolerance"] if "tolerance" not in searched else None
        with_map = False
        if bound is None:
            shares = evidence.get("offset_share")
            if not isinstance(shares, list) or len(shares) != len(RADII) or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s <= 1.0 for s in shares) \
                    or abs(sum(shares) - 1.0) > 1e-3:
                raise ValueError("auto record's offset shares are malformed")
            if offsets is not None and (shares != _rounded_shares(offsets)
                                        or evidence.get("images") != int(offsets.sum(axis=1).max())):
                raise ValueError("auto record's offset shares disagree with the tolerance offsets")
            bound = choose_tolerance(shares, side - 1)
            with_map = _map_differs(offsets, side)
        if set(table) != {_key(*c) for c in _candidates(searched, params, bound, with_map)}:
            raise ValueError("auto record's separation evidence is not the search its parameters make")
        expected = {k: v for k, v in zip(searched, _winner(table, searched, params, bound, with_map))
                    if k in names}
    if chosen != expected:
        raise ValueError(f"auto record chose {chosen} but its evidence gives {expected}: the file was edited")
    return record
