"""Detection metrics in plain numpy (checked against scikit-learn in the tests)."""
from __future__ import annotations

import numpy as np


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in size")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return labels, scores


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) up.

    Returns:
        fpr, tpr, thresholds (a positive is ``score >= threshold``).
    """
    labels, scores = _check_binary(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    n_pos, n_neg = max(labels.sum(), 1), max((~labels).sum(), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def auroc(labels, scores) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    labels, scores = _check_binary(labels, scores)
    if labels.all() or not labels.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def bootstrap_aurocs(labels, scores: list[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Image AUROC of several scorings of the same images on the same stratified bootstrap resamples.

    Negatives and positives are each resampled with replacement (``resamples`` times), and every scoring
    is read on the same resamples, so that two scorings can be compared pair by pair.  A non-finite score
    ties with everything.

    Returns:
        float64 ``[len(scores), resamples]``.
    """
    labels = np.asarray(labels, bool)
    neg, pos = np.flatnonzero(~labels), np.flatnonzero(labels)
    count_neg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=resamples)
    count_pos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=resamples)
    out = np.empty((len(scores), resamples))
    for k, s in enumerate(scores):
        s = np.asarray(s, np.float64)
        p, n = s[pos][:, None], s[neg][None, :]
        wins = np.where(np.isfinite(p) & np.isfinite(n), (p > n) + 0.5 * (p == n), 0.5)
        out[k] = np.einsum("bm,mn,bn->b", count_pos, wins, count_neg) / (len(pos) * len(neg))
    return out


def binary_report(labels, predicted) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of boolean predictions."""
    y = np.asarray(labels).ravel().astype(bool)
    p = np.asarray(predicted).ravel().astype(bool)
    counts = confusion(y, p)
    precision, recall = _precision_recall(*counts)
    return {"precision": precision, "recall": recall, "f1": f1_of(*counts),
            "accuracy": float((y == p).mean()) if y.size else 0.0}


def confusion(labels, predicted) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of boolean predictions: defects found, good ones marked, defects missed."""
    y = np.asarray(labels).ravel().astype(bool)
    p = np.asarray(predicted).ravel().astype(bool)
    return int((y & p).sum()), int((~y & p).sum()), int((y & ~p).sum())


def f1_of(tp: int, fp: int, fn: int) -> float:
    """F1 from counts (0 where nothing was found)."""
    precision, recall = _precision_recall(tp, fp, fn)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _precision_recall(tp: int, fp: int, fn: int) -> tuple[float, float]:
    return tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0


def line_counts(labels, predicted) -> dict[str, int]:
    """What a line lives by, at one threshold: good parts rejected and defects caught, with the totals.

    Args:
        labels: True for a defective part.
        predicted: True where the part was flagged (``is_anomaly``).

    Returns:
        ``{"good_rejected", "n_good", "defects_caught", "n_defect"}``.
    """
    y = np.asarray(labels).ravel().astype(bool)
    p = np.asarray(predicted).ravel().astype(bool)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in size")
    return {"good_rejected": int((p & ~y).sum()), "n_good": int((~y).sum()),
            "defects_caught": int((p & y).sum()), "n_defect": int(y.sum())}


def seg_f1(masks: list[np.ndarray], predicted: list[np.ndarray]) -> float:
    """SegF1: the F1 of predicted defect masks against the ground truth, pixels pooled over all images.

    NaN where no image has a ground-truth defect pixel (nothing to find).
    """
    y = np.concatenate([np.asarray(m, bool).ravel() for m in masks])
    p = np.concatenate([np.asarray(m, bool).ravel() for m in predicted])
    if y.shape != p.shape:
        raise ValueError(f"masks ({y.size} pixels) and predictions ({p.size} pixels) differ in size")
    return binary_report(y, p)["f1"] if y.any() else float("nan")


def precision_recall_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct threshold, from the highest down.

    Returns:
        precision, recall, thresholds (a positive is ``score >= threshold``).
    """
    labels, scores = _check_binary(labels, scores)
    _, tpr, thr = roc_curve(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    predicted = last_of_tie + 1
    tps = np.cumsum(labels[order])[last_of_tie]
    return tps / predicted, tpr[1:], thr[1:]


def average_precision(labels, scores) -> float:
    """Area under the step precision-recall curve, as scikit-learn computes it."""
    labels, scores = _check_binary(labels, scores)
    if not labels.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(labels, scores) -> tuple[float, float]:
    """The threshold (``score >= t`` is positive) with the highest F1, and that F1."""
    precision, recall, thr = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    i = int(np.argmax(f1))
    return float(thr[i]), float(f1[i])


def aupro(masks: list[np.ndarray], amaps: list[np.ndarray], fpr_limit: float = 0.3, steps: int = 300) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    As MVTec AD defines it: at each threshold, PRO is the mean over all
    ground-truth connected components (8-connected) of the fraction of the
    component above the threshold; FPR is the fraction of defect-free pixels
    above it.  PRO is integrated over FPR from 0 to ``fpr_limit`` and divided
    by ``fpr_limit``.

    Args:
        masks: bool ``[H, W]`` ground truth per image (all False for good ones).
        amaps: float ``[H, W]`` anomaly maps, same shapes.
    """
    import cv2

    regions, negatives = [], []
    for m, a in zip(masks, amaps):
        m = np.asarray(m, bool)
        a = np.asarray(a, np.float64)
        if m.shape != a.shape:
            raise ValueError(f"mask {m.shape} and map {a.shape} differ in shape")
        negatives.append(a[~m])
        if m.any():
            n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
            regions += [np.sort(a[lab == i]) for i in range(1, n)]
    neg = np.sort(np.concatenate(negatives))
    if not regions or neg.size == 0:
        return float("nan")
    # Candidate thresholds: where the FPR takes evenly spaced values up to the
    # limit, and quantiles of the defect values (so a clean separation is seen).
    levels = np.linspace(0.0, fpr_limit, steps + 1)
    at_fpr = neg[np.clip(np.ceil(neg.size * (1 - levels)).astype(int), 0, neg.size - 1)]
    at_pos = np.quantile(np.concatenate(regions), np.linspace(0.0, 1.0, steps + 1))
    thresholds = np.r_[np.inf, np.unique(np.r_[at_fpr, at_pos])[::-1]]
    # Descending thresholds: FPR and PRO both rise monotonically.
    fpr = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    pro = np.mean([(r.size - np.searchsorted(r, thresholds, side="left")) / r.size for r in regions], axis=0)
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))
    f, p = fpr[:cut], pro[:cut]
    if cut < fpr.size and f[-1] < fpr_limit:  # close the area exactly at the limit
        p_lim = np.interp(fpr_limit, fpr[cut - 1:cut + 1], pro[cut - 1:cut + 1])
        f, p = np.r_[f, fpr_limit], np.r_[p, p_lim]
    return float(np.trapezoid(p, f) / fpr_limit)
