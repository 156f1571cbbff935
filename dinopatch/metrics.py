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


def binary_report(labels, predicted) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of boolean predictions."""
    y = np.asarray(labels).ravel().astype(bool)
    p = np.asarray(predicted).ravel().astype(bool)
    tp, fp, fn = int((y & p).sum()), int((~y & p).sum()), int((y & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": float((y == p).mean()) if y.size else 0.0}
