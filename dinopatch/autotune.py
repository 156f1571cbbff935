"""Settings chosen from good parts alone: ``tolerance``, ``sigma``, ``score`` and ``match`` set to ``"auto"``.

A line has no defect samples to tune with, so the choices are measured on the
nominal images themselves, each scored against a bank built without it
(the folds of :class:`~.nominal.NominalSet`'s one plan, which the threshold uses too):

* **tolerance** is bounded by the residual misalignment among nominal parts.
  Each held-out patch is matched within growing neighbourhoods (Chebyshev
  tolerance 0, 1, 2 grid steps); its offset is the smallest tolerance whose match
  is within :data:`.tolerance.MARGIN` of the best over all of them
  (:func:`.tolerance.offset_counts`, per location).  The bound is the
  smallest tolerance beyond which at most :data:`SHARE` of the patches lie.
  The search starts at the typical offset (the smallest tolerance that half the
  held-out patches need: 0 unless the part moved as a whole), then, where the
  locations' offsets differ, the tolerance map
  (:func:`.tolerance.tolerance_map`, a tolerance per location), then the other
  tolerances up to the bound, narrowest first.  A tolerance lets a small
  defect find a good match next door, and on a texture a neighbour's match is
  often a little closer without the part having moved, so a wider tolerance
  must earn its place in the paired test below: it replaces the one in force
  only where the pasted defects say it separates better (the good parts'
  wobble then makes them score like the pasted defects at the narrower one).
* **sigma, score, match** (and the tolerance within its bound): synthetic
  defects the model has never seen (a patch cut from another part and pasted,
  a thin scratch, a blob, a contrast change) are pasted into held-out nominal
  images, and each candidate separates them from the held-out nominal images
  (image AUROC).  The candidates are tried in search order, the typical
  offset and :data:`DEFAULTS` first; a candidate replaces the settings before it only when
  a paired comparison over the same pasted and held-out images says it is
  better: in at least ``1 - ALPHA / comparisons`` of :data:`RESAMPLES` seeded
  stratified bootstrap resamples its AUROC is above theirs (one-sided,
  Bonferroni over the search's comparisons; :data:`ALPHA`).  Candidates that tie
  leave the settings before them in force.  Below :data:`THIN_IMAGES` nominal
  images the search is coarser (:data:`COARSE`).

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

from . import metrics, tolerance
from .bank import MATCHES
from .nominal import NominalSet
from .postprocess import SCORES, PostProcess
from .tolerance import STEPS

AUTO_PARAMS = ("tolerance", "sigma", "score", "match")
# What "auto" falls back to when a choice cannot be measured, and wins ties.
# sigma 2, not the seed's 4: on the pasted defects of every benchmark-quality category a narrower smoothing
# separated as well or better (docs/benchmarks.md), and the paired test rarely moves off the defaults.
DEFAULTS = {"tolerance": 1, "sigma": 2.0, "score": "max", "match": "local"}
MIN_IMAGES = 3  # two folds of one image each leave one-image banks: too few to rank settings
SIGMAS = (2.0, 0.0, 4.0, 8.0)
SHARE = 0.05
# The search starts at the offset that this share of the held-out patches needs: a part that moved as a whole
# needs it everywhere, a texture whose neighbours match a little closer does not.
TYPICAL = 0.5
# The paired test a candidate must pass to replace the settings before it.
ALPHA = 0.05
RESAMPLES = 2000
# Fewer nominal images than this paste fewer than 24 defects: fewer, coarser candidates.
THIN_IMAGES = 12
COARSE = {"sigma": (2.0, 0.0, 8.0), "score": ("max", "mean")}
# Model files from before the paired test chose by this AUROC margin over the settings before.
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


def measure_offsets(params: dict, nominal: NominalSet) -> np.ndarray | None:
    """Per-location offsets of held-out patches (:func:`.tolerance.offset_counts` over the nominal set's fold
    plan) when ``tolerance`` is ``"auto"`` or ``"map"``; None otherwise, or for ``"auto"`` with fewer than
    :data:`MIN_IMAGES` images.

    Raises:
        ValueError: ``tolerance="map"`` with fewer than :data:`MIN_IMAGES` nominal images.
    """
    mode = params["tolerance"]
    if not isinstance(mode, str) or mode not in ("auto", "map"):
        return None
    if len(nominal) < MIN_IMAGES:
        if mode == "map":
            raise ValueError(f"tolerance='map' needs at least {MIN_IMAGES} nominal images to measure offsets, "
                             f"got {len(nominal)}")
        return None
    return tolerance.offset_counts(nominal.tokens, nominal.plan.folds, nominal.positions, nominal.kernel)


def _map_differs(offsets, side: int) -> bool:
    return offsets is not None and tolerance.differs(tolerance.tolerance_map(offsets, (side, side), side - 1),
                                                     offsets)


def resolve(params: dict, nominal: NominalSet) -> dict | None:
    """Measure a value for every ``"auto"`` in ``params``.

    Args:
        params: checked detector parameters.
        nominal: the good parts, embedded, with their fold plan and, for ``tolerance="auto"``, their
            offsets (:meth:`.nominal.NominalSet.with_offsets`; measured here where they are not).

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
    steps = (params["tolerance"],)
    if "tolerance" in names:
        if nominal.offsets is None:
            nominal = nominal.with_offsets(measure_offsets(params, nominal))
        # Rounded before choosing, so that the model file's check derives the same steps from them.
        evidence["offset_share"] = _rounded_shares(nominal.offsets)
        steps = tolerance_steps(evidence["offset_share"], nominal.offsets, nominal.tokens.shape[1])
    order = _candidates(names, params, steps, n)
    evidence["image_auroc"], y, scores = _separation(params, order, nominal)
    evidence["test"] = _paired_test(y, scores, params["seed"])
    return {"chosen": dict(zip(names, _winner(evidence, names, params, steps))), "fallback": False,
            "evidence": evidence}


def _rounded_shares(offsets: np.ndarray) -> list[float]:
    return [round(float(s), 4) for s in tolerance.shares(offsets)]


def choose_tolerance(shares, largest: int, share: float = SHARE) -> int:
    """The smallest tolerance with at most ``share`` of the patches displaced beyond it."""
    beyond = 1.0 - np.cumsum(shares)
    return int(min(np.flatnonzero(beyond <= share + 1e-3)[0], largest))  # 1e-3: the shares' rounding


def tolerance_steps(shares, offsets, side: int) -> list:
    """The tolerances the search tries, in its order (see the module's docstring): the typical offset (the
    smallest tolerance that half the held-out patches need), the map where the locations' ``offsets`` differ,
    then the other tolerances up to the bound, narrowest first.  ``shares``: the rounded offset shares;
    ``side``: the token grid's side."""
    bound = choose_tolerance(shares, side - 1)
    typical = choose_tolerance(shares, bound, TYPICAL)
    return [typical, *(["map"] if _map_differs(offsets, side) else []), *(t for t in range(bound + 1) if t != typical)]


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


def pasted_defects(frames: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> tuple[list, list]:
    """One defect of each of :data:`KINDS` pasted into each of up to :data:`SOURCES` (at most half) of the
    nominal ``frames`` ``[N, S, S, 3]`` (``valid`` ``[N, S, S]``), a patch of another nominal frame the
    donor: the pasted images and the index of the frame each was made from."""
    n = len(frames)
    pasted, origin = [], []
    for i in rng.permutation(n)[:min(SOURCES, n // 2)]:
        for kind in KINDS:
            donor = frames[int(rng.integers(n))]
            pasted.append(paste_defect(frames[i], valid[i], donor, kind, rng))
            origin.append(int(i))
    return pasted, origin


def _candidates(names: list[str], params: dict, steps, images: int | None) -> list[tuple]:
    """``(tolerance, match, sigma, score)`` in search order: the tolerances ``steps`` (:func:`tolerance_steps`)
    in theirs, each with the defaults first;
    coarser below :data:`THIN_IMAGES` nominal images (``images`` None: the full search of records from before
    the paired test)."""
    def first(name, values):
        if name not in names:
            return (params[name],)
        values = COARSE.get(name, values) if images is not None and images < THIN_IMAGES else values
        return (DEFAULTS[name],) + tuple(v for v in values if v != DEFAULTS[name])

    return [(r, m, float(g), s) for r in steps for m in first("match", MATCHES)
            for g in first("sigma", SIGMAS) for s in first("score", SCORES)]


def _key(tolerance, match, sigma, score) -> str:
    return f"tolerance={tolerance} match={match} sigma={sigma:g} score={score}"


def _separation(params, order: list[tuple], nominal: NominalSet) -> tuple[dict, np.ndarray, dict]:
    """Held-out nominal vs. pasted-defect images, per candidate of ``order`` (:func:`_candidates`).

    Returns:
        ``{key: image AUROC}`` (rounded; None where nothing was finite), the labels ``[n + P]`` (True:
        pasted) and ``{key: image scores [n + P]}`` of the same images.
    """
    n = len(nominal)
    pasted, origin = pasted_defects(nominal.frames, nominal.valid, np.random.default_rng([params["seed"], 1]))
    queries = nominal.queries(pasted, origin)
    y = np.r_[np.zeros(n, bool), np.ones(len(pasted), bool)]
    table, maps, scores = {}, {}, {}
    for steps, match, sigma, score in order:
        if (steps, match) not in maps:  # the candidates come grouped by bank
            maps = {(steps, match): nominal.held_out(dict(params, tolerance=steps, match=match), extra=queries)}
        good, defect = maps[(steps, match)]
        post = PostProcess(sigma, score, params["topk"], params["morph_kernel"])
        s = np.array([post.score_map(d, nominal.valid[i])[1] for i, d in enumerate(good)]
                     + [post.score_map(d, nominal.valid[queries.origin[j]])[1] for j, d in enumerate(defect)])
        ok = np.isfinite(s)
        auc = metrics.auroc(y[ok], s[ok]) if ok.any() else float("nan")
        key = _key(steps, match, sigma, score)
        table[key], scores[key] = (round(auc, 4) if math.isfinite(auc) else None), s
    return table, y, scores


def _paired_test(y: np.ndarray, scores: dict, seed: int) -> dict:
    """Each candidate in search order against the settings in force before it, on the same resamples.

    Returns:
        The test's record: ``alpha``, ``resamples``, and per step ``{"candidate", "vs", "win_share"}``,
        the share of resamples in which the candidate's AUROC is above that of the settings it was
        compared with (rounded, as the choice reads it).
    """
    keys = list(scores)
    boot = dict(zip(keys, metrics.bootstrap_aurocs(y, [scores[k] for k in keys], RESAMPLES,
                                                   np.random.default_rng([seed, 2]))))
    level, steps, current = _level(len(keys)), [], keys[0]
    for key in keys[1:]:
        share = round(float(np.mean(boot[key] > boot[current])), 4)
        steps.append({"candidate": key, "vs": current, "win_share": share})
        current = key if share >= 1 - level else current
    return {"method": "paired bootstrap of image AUROC, one-sided, Bonferroni", "alpha": ALPHA,
            "resamples": RESAMPLES, "steps": steps}


def _level(candidates: int) -> float:
    return ALPHA / max(1, candidates - 1)


def _search_size(evidence: dict) -> int | None:
    """The image count the search was sized by: records from before the paired test searched in full."""
    return evidence["images"] if evidence.get("test") is not None else None


def _winner(evidence: dict, names: list[str], params: dict, steps) -> list:
    """The values of ``names`` that the evidence's search keeps in force (see the module's docstring).

    The steps are replayed in search order (not the table's: the model file may store keys sorted);
    each must compare the candidate the search made with the settings then in force.  Evidence from
    before the paired test chose by an AUROC margin (:data:`WIN_MARGIN`).

    Raises:
        ValueError: the steps are not the search's.
    """
    order = [_key(*c) for c in _candidates(names, params, steps, _search_size(evidence))]
    table, test, current = evidence["image_auroc"], evidence.get("test"), order[0]
    if test is None:
        best_auc = -math.inf
        for key in order:
            if table.get(key) is not None and table[key] > best_auc + WIN_MARGIN:
                current, best_auc = key, table[key]
    else:
        steps, level = test["steps"], _level(len(order))
        if [s["candidate"] for s in steps] != order[1:]:
            raise ValueError("auto record's test steps are not the search its parameters make")
        for step in steps:
            if step["vs"] != current:
                raise ValueError(f"auto record compares {step['candidate']} with {step['vs']}, not with the "
                                 f"settings then in force ({current}): the file was edited")
            current = step["candidate"] if step["win_share"] >= 1 - level else current
    values = dict(item.split("=", 1) for item in current.split(" "))
    cast = {"tolerance": lambda v: v if v == "map" else int(v), "sigma": float, "score": str, "match": str}
    return [cast[n](values[n]) for n in names]


def _check_test(test) -> None:
    """The paired test's record is well formed (its steps are checked against the search by :func:`_winner`)."""
    if test is None:
        return
    if not isinstance(test, dict) or set(test) != {"method", "alpha", "resamples", "steps"} \
            or test["alpha"] != ALPHA or test["resamples"] != RESAMPLES or not isinstance(test["steps"], list):
        raise ValueError("auto record's paired test is malformed or not this version's")
    for step in test["steps"]:
        if not isinstance(step, dict) or set(step) != {"candidate", "vs", "win_share"} \
                or not isinstance(step["candidate"], str) or not isinstance(step["vs"], str) \
                or isinstance(step["win_share"], bool) or not isinstance(step["win_share"], (int, float)) \
                or not 0.0 <= step["win_share"] <= 1.0:
            raise ValueError(f"auto record's paired test step malformed: {step!r:.200}")


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
        if not isinstance(evidence.get("images"), int) or evidence["images"] >= MIN_IMAGES:
            raise ValueError(f"auto record falls back to the defaults on {evidence.get('images')!r} images, "
                             f"not fewer than {MIN_IMAGES}: the file was edited")
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
        steps = (params["tolerance"],)
        if "tolerance" in searched:
            shares = evidence.get("offset_share")
            if not isinstance(shares, list) or len(shares) != len(STEPS) or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s <= 1.0 for s in shares) \
                    or abs(sum(shares) - 1.0) > 1e-3:
                raise ValueError("auto record's offset shares are malformed")
            if offsets is not None and (shares != _rounded_shares(offsets)
                                        or evidence.get("images") != int(offsets.sum(axis=1).max())):
                raise ValueError("auto record's offset shares disagree with the tolerance offsets")
            steps = tolerance_steps(shares, offsets, side)
        images = evidence.get("images")
        if isinstance(images, bool) or not isinstance(images, int) or images < MIN_IMAGES:
            raise ValueError(f"auto record's image count {images!r} is malformed")
        if set(table) != {_key(*c) for c in _candidates(searched, params, steps, _search_size(evidence))}:
            raise ValueError("auto record's separation evidence is not the search its parameters make")
        _check_test(evidence.get("test"))
        expected = {k: v for k, v in zip(searched, _winner(evidence, searched, params, steps))
                    if k in names}
    if chosen != expected:
        raise ValueError(f"auto record chose {chosen} but its evidence gives {expected}: the file was edited")
    return record
