"""What binds a model's verdict-bearing values to the evidence stored beside them.

A model file's checksum proves that nothing was damaged, not that nothing was
edited: anyone can change a value and write the checksum again.  So every value
that decides a verdict is derived again at load from what it was measured on, or
bounded by it, and a value that no longer matches is refused by name:

* the model id is the content's checksum (:func:`.modelfile.content_digest`), never a stored value;
* a calibrated threshold (leave-one-out, k-fold, held-out) is the conformal quantile of its held-out
  scores; those scores follow from the held-out distance maps and valid masks with the
  post-processing the model judges with, so a score method changed with the threshold kept, or
  scores scaled with the threshold, are refused; the held-out distances are derived again from the
  good parts' tokens, each fold against the rows its bank held, so the maps cannot be scaled with
  them: the bank's own rows where it holds every part's (coreset ratio 1, the default), else the
  tokens a coreset bank carries as evidence, with its rows and each fold's checked to be greedy
  k-center's picks among them (:mod:`.coreset`); only where a fold's global rows (``match`` other
  than local) would be a coreset of their own, above :data:`.bank.GLOBAL_ROWS`, are the maps
  not derived again (checking k-center's picks there costs what fit's search did);
* a bank's global rows are its rows, where those number at most :data:`.bank.GLOBAL_ROWS`;
* an evaluation's threshold follows from its tuning scores by its rule (:func:`.calibration.tuned_threshold`);
* a mask value an evaluation tuned on labelled masks, and the clean-up kernel tuned with it, follow from
  its sweep by its rule (:func:`.calibration.tuned_mask`): the thresholds and kernels it tried and the
  tuning pixels' counts with each;
* a user's threshold is at most the bank's :func:`reach`, at fit, at save and at load, and an evaluation's
  rule caps its threshold there; every threshold, a tuned mask value included, is within the distances the
  bank can produce.

An evaluation's tuning scores (with the score method they were measured with) and its mask sweep are
measured on test images the file does not hold: an edit that rewrites them consistently with the values
they give is only held to those bounds.

What no check can catch is an edit that recomputes everything consistently, the
bank included: only a signature (:mod:`.modelfile`, ``DINOPATCH_MODEL_KEY``) binds a
file to whoever holds the key.
"""
from __future__ import annotations

import math

import numpy as np

from . import bank as memory
from . import coreset
from .bank import MemoryBank
from .calibration import Threshold, measured_with, tuned_mask, tuned_threshold
from .foreground import Background, patch_stats, scatter
from .nominal import FoldPlan
from .postprocess import scores_and_maxima

# A threshold above every distance the bank can produce never flags a part: distances
# are at most |q| + |b|, and query tokens are normed like the bank's rows.
THRESHOLD_REACH = 4.0
# How far the bank's own distances may differ from the held-out maps the file stores, as a share of
# the largest: kernels agree to 1e-4 of it, and a float16 bank rounds each query token to 2^-11.
REDERIVE_RTOL = {"float32": 2e-3, "float16": 1e-2}
# Stored scores against those derived again from their maps: the same arithmetic, up to OpenCV's
# vector paths on another CPU.
SCORE_RTOL = 1e-5
# Patch statistics of the good parts placed again at load against the stored ones, in gray levels: a warp
# on another CPU may round a pixel the other way.
STATS_ATOL = 0.5


def reach(features: np.ndarray) -> float:
    """The bank's reach: twice the largest distance of a row from its location's mean row.

    No two good patches at one place lie farther apart than this, so no good part scores
    above it; a threshold beyond it would pass parts unlike any good one.  ``features`` is
    the bank ``[L, K, D]``; one location at a time, so a float16 bank is never copied whole.
    A bank of one good part has no spread to measure: its reach is any distance it can produce.
    """
    if features.shape[1] < 2:
        return _produced(features)
    return 2.0 * math.sqrt(max(float(((rows - rows.mean(0, dtype=np.float32)) ** 2).sum(-1, dtype=np.float32).max())
                               for rows in features))


def _produced(features: np.ndarray) -> float:
    """Beyond this no distance to the bank can reach (:data:`THRESHOLD_REACH` times the largest row norm)."""
    return THRESHOLD_REACH * math.sqrt(max(float(np.einsum("kd,kd->k", rows, rows, dtype=np.float32).max())
                                           for rows in features))


def check_threshold(t: Threshold, model) -> None:
    """ValueError naming the first of ``t``'s values that its evidence does not support.

    Args:
        t: the threshold ``model`` is to judge with.
        model: a :class:`~.fitted.Fitted`: its bank, post-processing, parameters (``seed`` and ``calibration``
            give the fold plan), fit report and background check.
    """
    bank, post = model.bank, model.post
    method = t.source["method"]
    if method == "user":
        _check_mask(t, post.morph_kernel)
        return _within_reach(bank, "given", image=t.image, pixel=t.pixel)
    if t.measured_with != measured_with(post):
        raise ValueError(f"the model scores with {measured_with(post)} but its threshold's scores were measured "
                         f"with {t.measured_with}: the file was edited")
    if method == "evaluation":
        if t.tuning_labels.all() or not t.tuning_labels.any() or not np.isfinite(t.tuning_scores).all():
            raise ValueError("an evaluation's threshold without finite tuning scores of good and defective parts")
        limit = reach(bank.features)
        derived = tuned_threshold(t.tuning_labels, t.tuning_scores, limit)
        if not math.isclose(derived, t.image):
            raise ValueError(f"threshold {t.image:g} is not the one its tuning scores give ({derived:g}, at most "
                             f"the bank's reach {limit:.4g})")
    _check_mask(t, post.morph_kernel)
    beyond = _produced(bank.features)
    grid_max = float(t.pixel_grid.max()) if t.pixel_grid is not None else 0.0
    for name, value in (("image", t.image), ("pixel", t.pixel), ("per-location mask", grid_max)):
        if value > beyond:
            raise ValueError(f"{name} threshold {value:g} is beyond any distance this bank can produce "
                             f"(~{beyond:.3g}): every part would pass")
    if method == "evaluation":
        return
    _check_calibrated(t, model)


def _check_mask(t: Threshold, kernel: int) -> None:
    """An evaluation's mask threshold, and the clean-up ``kernel`` the model masks with, against its sweep."""
    kernels, values, counts = t.mask_kernels, t.mask_thresholds, t.mask_counts
    if not t.pixel_tuned:
        if kernels.size or values.size or counts.size:
            raise ValueError("a mask sweep beside a mask threshold no evaluation tuned: the file was edited")
        return
    if kernels.ndim != 1 or values.ndim != 1 or not kernels.size or not values.size \
            or counts.shape != (kernels.size, values.size, 3):
        raise ValueError(f"a mask threshold tuned by evaluation needs its sweep: kernels [K], thresholds [C] and "
                         f"counts [K, C, 3], got {list(kernels.shape)}, {list(values.shape)}, {list(counts.shape)}")
    if not np.isfinite(values).all() or (np.diff(values) <= 0).any() or (kernels < 1).any():
        raise ValueError("the mask sweep's thresholds are not finite and increasing, or its kernels not positive")
    found = counts[..., 0] + counts[..., 2]
    if (counts < 0).any() or (found != found.flat[0]).any():
        raise ValueError("the mask sweep's counts are negative, or count other defect pixels at another threshold")
    pixel, best = tuned_mask(kernels, values, counts)
    if pixel != t.pixel:
        raise ValueError(f"pixel threshold {t.pixel:g} is not the one its tuning sweep gives ({pixel:g}): the file "
                         "was edited")
    if best != kernel:
        raise ValueError(f"morph_kernel {kernel} is not the one the mask threshold's tuning sweep gives ({best}): "
                         "the file was edited")


def _within_reach(bank: MemoryBank, how: str, **values: float) -> None:
    limit = reach(bank.features)
    for name, value in values.items():
        if value > limit:
            raise ValueError(f"{name} threshold {value:g} ({how}) is above the bank's reach {limit:.4g}, twice the "
                             "farthest any good patch lies from its place's mean: no good part scores that high, and "
                             "parts unlike every good one would pass; give a lower one")


def _check_calibrated(t: Threshold, model) -> None:
    post, n = model.post, t.scores.size
    if t.distances.shape[0] != n or t.valid.shape[0] != n or n == 0 or t.source["images"] != n:
        raise ValueError(f"a calibrated threshold measured on {t.source['images']} parts needs one held-out map "
                         f"and valid mask per score ({n}), got {t.distances.shape[0]} and {t.valid.shape[0]}")
    scores, maxima = scores_and_maxima(post, t.distances, t.valid)
    for name, stored, derived in (("calibration score", t.scores, scores), ("map maximum", t.maxima, maxima)):
        off = ~np.isclose(stored, derived, rtol=SCORE_RTOL, atol=SCORE_RTOL * float(np.abs(derived).max()))
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise ValueError(f"{name} {stored[i]:g} of held-out part {i} is not what its held-out map gives with "
                             f"score {post.score!r} ({derived[i]:g}): the file was edited")
    remeasured = t.at_false_alarm_rate(t.source["false_alarm_rate"])
    if not math.isclose(remeasured.image, t.image):
        raise ValueError(f"threshold {t.image:g} disagrees with its own calibration scores' conformal "
                         f"quantile ({remeasured.image:g}): the file was edited")
    if not t.pixel_tuned and not math.isclose(remeasured.pixel, t.pixel):
        raise ValueError(f"pixel threshold {t.pixel:g} disagrees with its held-out maps' conformal quantile "
                         f"({remeasured.pixel:g}): the file was edited")
    _check_distances(t, model)


def folds(params: dict, n: int, method: str) -> list[np.ndarray]:
    """The held-out sets :func:`.calibration.calibrate` used on ``n`` good parts (ValueError if ``method`` is
    not the one they give)."""
    plan = FoldPlan.seeded(n, params["seed"])
    held = None if params["calibration"] == "cv" else plan.fraction(params["calibration"])
    if method != ("held-out" if held else plan.method):
        raise ValueError(f"threshold method {method!r} is not what calibration {params['calibration']!r} gives on "
                         f"{n} good parts: the file was edited")
    return held or list(plan.folds)


def _check_distances(t: Threshold, model) -> None:
    """The stored held-out maps against those the good parts' tokens give (the bank's rows where it holds one
    per good part, else the coreset's evidence), and outside the region against the background check's samples."""
    bank, fg = model.bank, model.foreground
    if model.report is None:
        return  # no count of the parts the bank was made of
    tokens = bank.features if model.coreset is None else model.coreset.tokens  # one row per part (checked at load)
    n = model.report.used
    held = folds(model.params, n, t.source["method"])
    kept = coreset.fold_rows(t.fold_rows, held, n, model.params["coreset_ratio"], tokens)
    derived = held_out_distances(bank, held, tokens, kept)
    if derived is None:
        return
    if fg is not None:
        derived = _with_background(derived, fg, held, model.report.kept())
    stored = t.distances
    inside = np.isfinite(derived)
    if derived.shape != stored.shape:
        raise ValueError(f"held-out distances {list(stored.shape)} are not one map per held-out part "
                         f"{list(derived.shape)}")
    tol = REDERIVE_RTOL[tokens.dtype.name] * float(derived[inside].max(initial=0.0))
    gap = np.abs(stored - np.where(inside, derived, stored))
    if gap.max(initial=0.0) > tol:
        i, y, x = np.unravel_index(int(np.argmax(gap)), gap.shape)
        what = "its distance to the bank's other parts" if bank.positions is None or \
            y * bank.grid[1] + x in bank.positions else "the background term its samples give"
        raise ValueError(f"held-out distance {stored[i, y, x]:g} of part {i} at patch ({y}, {x}) is not {what} "
                         f"({derived[i, y, x]:g}): the file was edited")


def held_out_distances(bank: MemoryBank, held: list[np.ndarray], tokens: np.ndarray | None = None,
                       kept: list[np.ndarray] | None = None) -> np.ndarray | None:
    """Each held-out part's distances to a bank of the others' tokens, as fit measured them.

    Args:
        bank: the model's bank: its grid, tolerance, region and match.
        held: held-out sets of good parts.
        tokens: ``[L, N, D]`` every good part's token at each location the bank covers, in fit order (default:
            the bank's rows, where it holds one per part: coreset ratio 1).
        kept: per set, int ``[L, k]`` the parts whose tokens its bank held (default: every other part).

    Returns:
        ``[n, h, w]`` in the order of ``held`` (sorted within each set), NaN where the bank has no location;
        None where the global rows of a fold would be a coreset (more than :data:`.bank.GLOBAL_ROWS`), which
        neither the bank nor the tokens say.
    """
    tokens = bank.features if tokens is None else tokens
    length, n, dim = tokens.shape
    out = []
    for i, h in enumerate(held):
        h = np.sort(h)
        rows = tokens[:, np.setdiff1d(np.arange(n), h)] if kept is None else \
            np.take_along_axis(tokens, kept[i][:, :, None], axis=1)
        if bank.match != "local" and rows.shape[0] * rows.shape[1] > memory.GLOBAL_ROWS:
            return None
        fold = MemoryBank(rows, bank.grid, bank.tolerance, bank.positions, bank.match,
                          None if bank.match == "local" else rows.reshape(-1, dim))
        grid = tokens[:, h].transpose(1, 0, 2).astype(np.float32)
        grid = grid.reshape(len(h), *bank.grid, dim) if bank.positions is None else \
            scatter(grid, bank.positions, bank.grid)
        out.append(fold.distances(grid))
    return np.concatenate(out)


def check_bank(model) -> None:
    """ValueError where a coreset bank's rows are not k-center's picks among the good parts' tokens it keeps as
    evidence (:mod:`.coreset`), or the global rows are not the bank's rows where those are few enough to be all."""
    bank = model.bank
    if model.coreset is not None:
        model.coreset.check_bank(bank)
    rows = bank.global_features
    if rows is not None and bank.features.shape[0] * bank.size <= memory.GLOBAL_ROWS \
            and (rows.shape != (bank.features.shape[0] * bank.size, bank.dim)
                 or (rows != bank.features.reshape(-1, bank.dim)).any()):
        raise ValueError(f"global rows {list(rows.shape)} are not the bank's {bank.features.shape[0] * bank.size} "
                         "rows: the file was edited")


def _with_background(derived: np.ndarray, fg, held: list[np.ndarray], kept: list[int]) -> np.ndarray:
    """Held-out maps ``derived`` (NaN outside the region) with the background term each fold gives outside it,
    from the samples of the parts ``kept``."""
    rows = np.searchsorted(fg.parts, kept)
    if (rows >= len(fg.parts)).any() or (fg.parts[np.minimum(rows, len(fg.parts) - 1)] != kept).any():
        raise ValueError("the background check's samples are not of every part the bank holds: the file was edited")
    stats = fg.stats[rows]
    out, start = derived.copy(), 0
    for h in held:
        h = np.sort(h)
        train = np.setdiff1d(np.arange(len(kept)), h)
        out[start:start + len(h)] = fg.fill(derived[start:start + len(h)], stats[h], Background.fit(stats[train]))
        start += len(h)
    return out


def check_background(model) -> None:
    """ValueError where the background check's samples are not what the model's good parts and bank give:
    each part's patch statistics from its pixels (where the file keeps them), and each part's worst held-out
    distance from the bank (where it holds one row of every sampled part)."""
    fg = model.foreground
    if fg is None:
        return
    if model.good is not None:
        if fg.parts.max() >= len(model.good.images):
            raise ValueError(f"background samples of part {int(fg.parts.max())} of {len(model.good.images)}")
        canon = [model.aligner.transform(model.good.images[i]) for i in fg.parts]
        given = patch_stats(np.stack([c[0] for c in canon]), np.stack([c[1] for c in canon]), fg.grid)
        # NaN (a patch not judged) must be where the pixels put it, and equal there.
        gap = np.where(np.isnan(given) & np.isnan(fg.stats), 0.0, np.nan_to_num(np.abs(given - fg.stats), nan=np.inf))
        if gap.max() > STATS_ATOL:
            i, j, k = np.unravel_index(int(np.argmax(gap)), gap.shape)
            raise ValueError(f"background statistic {fg.stats[i, j, k]:g} of part {int(fg.parts[i])} at patch {j} "
                             "is not what the part's pixels give: the file was edited")
    kept = model.report.kept() if model.report is not None else None
    tokens = model.bank.features if model.coreset is None else model.coreset.tokens
    if kept is None or tokens.shape[1] != len(fg.parts) or list(fg.parts) != kept:
        return  # the bank lacks some sampled parts' rows
    nearest = MemoryBank(tokens, model.bank.grid, 0, model.bank.positions)
    held = FoldPlan.seeded(len(kept), model.params["seed"]).folds
    order = np.concatenate([np.sort(h) for h in held])
    worst = np.empty(len(kept), np.float32)
    worst[order] = np.nanmax(held_out_distances(nearest, list(held)).reshape(len(kept), -1), axis=1)
    tol = REDERIVE_RTOL[tokens.dtype.name] * float(worst.max())
    off = np.abs(worst - fg.worst) > tol
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(f"background check's worst distance {fg.worst[i]:g} of part {int(fg.parts[i])} is not its "
                         f"distance to the bank's other parts ({worst[i]:g}): the file was edited")
