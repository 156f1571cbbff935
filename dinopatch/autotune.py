"""Settings chosen from good parts alone: ``tolerance``, ``sigma``, ``score`` and ``match`` set to ``"auto"``.

A line has no defect samples to tune with, so the choices are measured on the
nominal images themselves, each scored against a bank built without it
(the folds of :class:`~.nominal.NominalSet`'s one plan, which the threshold uses too):

* **tolerance** is bounded by the residual misalignment among nominal parts.
  Each held-out patch is matched within growing neighbourhoods (Chebyshev
  radius 0, 1, 2 grid steps); its offset is the smallest radius whose match
  is within :data:`MARGIN` of the best over all radii.  The bound is the
  smallest radius beyond which at most :data:`SHARE` of the patches lie.
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

import cv2
import numpy as np

from . import metrics
from .bank import MATCHES, MemoryBank
from .nominal import NominalSet
from .postprocess import SCORES, PostProcess

AUTO_PARAMS = ("tolerance", "sigma", "score", "match")
# What "auto" falls back to when a choice cannot be measured, and wins ties: the seed's settings.
DEFAULTS = {"tolerance": 1, "sigma": 4.0, "score": "max", "match": "local"}
MIN_IMAGES = 3  # two folds of one image each leave one-image banks: too few to rank settings
RADII = (0, 1, 2)
SIGMAS = (4.0, 0.0, 2.0, 8.0)
# A patch's match at a larger radius must be this much closer to count as displaced:
# nearer rows of pure noise differ by less.
MARGIN = 0.1
SHARE = 0.05
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


def defaults(params: dict) -> dict:
    """``params`` with each ``"auto"`` replaced by :data:`DEFAULTS`."""
    return resolved(params, {"chosen": DEFAULTS})


def without(record: dict | None, names) -> dict | None:
    """``record`` without the choices of ``names`` (set by hand since); None when no choice is left."""
    if record is None or not set(record["chosen"]) - set(names):
        return None
    return dict(record, chosen={k: v for k, v in record["chosen"].items() if k not in names})


def resolve(params: dict, nominal: NominalSet) -> dict | None:
    """Measure a value for every ``"auto"`` in ``params``.

    Args:
        params: checked detector parameters.
        nominal: the good parts, embedded, with their fold plan.

    Returns:
        ``{"chosen": {name: value}, "fallback": bool, "evidence": {...}}``, or None when nothing is "auto".
    """
    names = wanted(params)
    if not names:
        return None
    n = len(nominal)
    if n < MIN_IMAGES:
        return {"chosen": {k: DEFAULTS[k] for k in names}, "fallback": True,
                "evidence": {"images": n, "note": f"fewer than {MIN_IMAGES} nominal images: defaults used"}}
    evidence: dict = {"images": n, "searched": names}
    bound = int(params["tolerance"]) if "tolerance" not in names else None
    if bound is None:
        # Rounded before choosing, so that the model file's check derives the same bound from them.
        evidence["offset_share"] = [round(float(s), 4) for s in offset_shares(nominal)]
        bound = choose_tolerance(evidence["offset_share"], nominal.tokens.shape[1] - 1)
    table = _separation(params, names, bound, nominal)
    evidence["image_auroc"] = table
    return {"chosen": dict(zip(names, _winner(table, names, params, bound))), "fallback": False,
            "evidence": evidence}


def offset_shares(nominal: NominalSet) -> np.ndarray:
    """Share of held-out nominal patches whose match lies at each radius of :data:`RADII`."""
    tokens, positions, backend = nominal.tokens, nominal.positions, nominal.backend
    counts = np.zeros(len(RADII))
    for held in nominal.plan.folds:
        base = MemoryBank.fit(tokens[nominal.plan.train(held)], backend=backend, positions=positions)
        dist = np.stack([MemoryBank(base.features, base.grid, r, positions).distances(tokens[held], backend)
                         for r in RADII])
        dist = dist[:, np.isfinite(dist[0])]  # the region's locations only
        offset = np.argmax(dist <= (1 + MARGIN) * dist.min(axis=0), axis=0)  # the first radius close enough
        counts += np.bincount(offset.ravel(), minlength=len(RADII))
    return counts / counts.sum()


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


def _candidates(names: list[str], params: dict, bound: int) -> list[tuple]:
    """``(tolerance, match, sigma, score)`` in search order: the bound first, then the defaults."""
    def first(name, values):
        if name not in names:
            return (params[name],)
        return (DEFAULTS[name],) + tuple(v for v in values if v != DEFAULTS[name])

    radii = range(bound, -1, -1) if "tolerance" in names else (bound,)
    return [(r, m, float(g), s) for r in radii for m in first("match", MATCHES)
            for g in first("sigma", SIGMAS) for s in first("score", SCORES)]


def _key(tolerance, match, sigma, score) -> str:
    return f"tolerance={tolerance} match={match} sigma={sigma:g} score={score}"


def _separation(params, names, bound, nominal: NominalSet) -> dict:
    """Image AUROC of held-out nominal vs. pasted-defect images, per candidate (:func:`_candidates`)."""
    rng = np.random.default_rng([params["seed"], 1])
    n = len(nominal)
    pasted, origin = [], []
    for i in rng.permutation(n)[:min(SOURCES, n // 2)]:
        for kind in KINDS:
            donor = nominal.frames[int(rng.integers(n))]
            pasted.append(paste_defect(nominal.frames[i], nominal.valid[i], donor, kind, rng))
            origin.append(int(i))
    queries = nominal.queries(pasted, origin)
    y = np.r_[np.zeros(n, bool), np.ones(len(pasted), bool)]
    table, maps = {}, {}
    for tolerance, match, sigma, score in _candidates(names, params, bound):
        if (tolerance, match) not in maps:  # the candidates come grouped by bank
            maps = {(tolerance, match): nominal.held_out(dict(params, tolerance=tolerance, match=match),
                                                         extra=queries)}
        good, defect = maps[(tolerance, match)]
        post = PostProcess(sigma, score, params["topk"], params["morph_kernel"])
        s = np.array([post.score_map(d, nominal.valid[i])[1] for i, d in enumerate(good)]
                     + [post.score_map(d, nominal.valid[queries.origin[j]])[1] for j, d in enumerate(defect)])
        ok = np.isfinite(s)
        auc = metrics.auroc(y[ok], s[ok]) if ok.any() else float("nan")
        table[_key(tolerance, match, sigma, score)] = round(auc, 4) if math.isfinite(auc) else None
    return table


def _winner(table: dict, names: list[str], params: dict, bound: int) -> list:
    """The values of ``names`` in the table's best entry.

    A candidate must beat the one before it in search order (the bound, then the defaults) by more than
    :data:`WIN_MARGIN` to displace it: the pasted defects are few, and a smaller difference is noise.
    The order is the search's, not the table's (the model file may store the keys sorted).
    """
    order = [_key(*c) for c in _candidates(names, params, bound)]
    best, best_auc = order[0], -math.inf
    for key in order:
        auc = table.get(key)
        if auc is not None and auc > best_auc + WIN_MARGIN:
            best, best_auc = key, auc
    values = dict(item.split("=", 1) for item in best.split(" "))
    cast = {"tolerance": int, "sigma": float, "score": str, "match": str}
    return [cast[n](values[n]) for n in names]


def check_record(record, params: dict, side: int) -> dict:
    """A model file's auto record, checked against its parameters and its own evidence (never executed).

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
        bound = int(params["tolerance"]) if "tolerance" not in searched else None
        if bound is None:
            shares = evidence.get("offset_share")
            if not isinstance(shares, list) or len(shares) != len(RADII) or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s <= 1.0 for s in shares) \
                    or abs(sum(shares) - 1.0) > 1e-3:
                raise ValueError("auto record's offset shares are malformed")
            bound = choose_tolerance(shares, side - 1)
        if set(table) != {_key(*c) for c in _candidates(searched, params, bound)}:
            raise ValueError("auto record's separation evidence is not the search its parameters make")
        expected = {k: v for k, v in zip(searched, _winner(table, searched, params, bound)) if k in names}
    if chosen != expected:
        raise ValueError(f"auto record chose {chosen} but its evidence gives {expected}: the file was edited")
    return record
