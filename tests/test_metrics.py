import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

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


def test_average_precision_and_pr_curve_match_sklearn(rng):
    from sklearn.metrics import average_precision_score, precision_recall_curve

    labels = rng.random(120) < 0.3
    scores = np.round(rng.normal(size=120) + labels, 1)
    assert metrics.average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores))
    p, r, t = metrics.precision_recall_curve(labels, scores)
    sp, sr, st = precision_recall_curve(labels, scores)
    np.testing.assert_allclose(p, sp[:-1][::-1])
    np.testing.assert_allclose(r, sr[:-1][::-1])
    np.testing.assert_allclose(t, st[::-1])


def test_best_f1_threshold_by_hand():
    # At t = 0.6: predicted {0.9, 0.8, 0.6}, 2 true -> P 2/3, R 1, F1 0.8; no other t does better.
    t, f1 = metrics.best_f1_threshold([1, 0, 1, 0, 0], [0.9, 0.8, 0.6, 0.3, 0.1])
    assert (t, f1) == (0.6, pytest.approx(0.8))


def test_aupro_by_hand():
    # Components A = {0.9, 0.5} and B = {0.7}; ten good pixels, one at 0.8, nine at 0.1.
    # PRO is 0.25 for FPR in [0, 0.1), then 1 from FPR 0.1 on: area to 0.3 = 0.025 + 0.2 = 0.225.
    mask = np.zeros((1, 13), bool)
    amap = np.zeros((1, 13))
    mask[0, [0, 1, 3]] = True
    amap[0, :4] = [0.9, 0.5, 0.0, 0.7]
    mask[0, 2] = False
    amap[0, 2] = 0.8
    amap[0, 4:] = 0.1
    # Pixels 0, 1 touch: one component; 3 stands alone.
    assert metrics.aupro([mask], [amap], fpr_limit=0.3) == pytest.approx(0.225 / 0.3)


def test_aupro_extremes(rng):
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    assert metrics.aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert metrics.aupro([mask], [1.0 - mask]) == pytest.approx(0.0)


def test_aupro_at_five_percent_by_hand():
    # Components A = {0.9, 0.5} (adjacent) and B = {0.7}; forty good pixels, one at 0.8, 39 at 0.1.
    # PRO 0.25 for FPR in [0, 0.025), then 1 (at FPR 0.025 the threshold reaches 0.7 and 0.5):
    # area to 0.05 = 0.025 * 0.25 + 0.025 * 1 = 0.03125.
    amap = np.r_[0.9, 0.5, 0.8, 0.7, np.full(39, 0.1)][None]
    mask = np.zeros_like(amap, bool)
    mask[0, [0, 1, 3]] = True
    assert metrics.aupro([mask], [amap], fpr_limit=0.05) == pytest.approx(0.03125 / 0.05)


def test_aupro_matches_a_brute_force_over_every_threshold(rng):
    masks, amaps = [], []
    for _ in range(3):
        m = np.zeros((12, 12), bool)
        y, x = rng.integers(0, 8, 2)
        m[y:y + 4, x:x + 3] = True
        masks.append(m)
        amaps.append(rng.random((12, 12)) + 0.8 * m)
    neg = np.concatenate([a[~m] for m, a in zip(masks, amaps)])
    regions = [a[m] for m, a in zip(masks, amaps)]
    points = []
    for t in np.r_[np.inf, np.unique(np.concatenate(amaps))[::-1]]:
        points.append(((neg >= t).mean(), np.mean([(r >= t).mean() for r in regions])))
    f, p = np.array(points).T
    cut = np.searchsorted(f, 0.05, side="right")
    f_lim, p_lim = np.r_[f[:cut], 0.05], np.r_[p[:cut], np.interp(0.05, f[cut - 1:cut + 1], p[cut - 1:cut + 1])]
    expected = np.trapezoid(p_lim, f_lim) / 0.05
    # The metric samples its thresholds (300 FPR levels and 300 defect quantiles), not every one.
    assert metrics.aupro(masks, amaps, fpr_limit=0.05) == pytest.approx(expected, abs=0.002)


def test_seg_f1_and_line_counts_by_hand():
    gt = [np.array([[1, 1, 0, 0]], bool), np.zeros((1, 4), bool)]
    pred = [np.array([[1, 0, 1, 0]], bool), np.array([[0, 0, 0, 1]], bool)]
    # tp 1, fp 2, fn 1: precision 1/3, recall 1/2, F1 0.4.
    assert metrics.seg_f1(gt, pred) == pytest.approx(0.4)
    assert np.isnan(metrics.seg_f1([np.zeros((2, 2), bool)], [np.ones((2, 2), bool)]))
    assert metrics.line_counts([0, 0, 1, 1, 1], [1, 0, 1, 1, 0]) == {
        "good_rejected": 1, "n_good": 2, "defects_caught": 2, "n_defect": 3}
