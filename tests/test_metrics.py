import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve as sk_roc_curve

from dinopatch import metrics


@pytest.mark.parametrize("n, ties", [(50, False), (200, True), (7, True)])
def test_auroc_matches_sklearn(rng, n, ties):
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores, 1)
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_curve_matches_sklearn(rng):
    labels = rng.random(80) < 0.5
    scores = np.round(rng.normal(size=80) + labels, 1)
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_auroc_by_hand():
    # Positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5), (0.9>0.1), (0.5=0.5 -> 1/2), (0.5>0.1) = 3.5 / 4.
    assert metrics.auroc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == 0.875
    assert np.isnan(metrics.auroc([1, 1], [0.2, 0.3]))


def test_binary_report_by_hand():
    r = metrics.binary_report([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert r == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "accuracy": 0.6}


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0, 1], [0.1, np.nan])
