"""The conformal threshold and p-values on calibration scores alone (no images)."""
import math

import numpy as np
import pytest

from dinopatch.calibration import Threshold, conformal_rank, guarantee


def _threshold(scores, rate=0.0):
    scores = np.asarray(scores, float)
    source = {"method": "leave-one-out", "images": scores.size, "false_alarm_rate": 0.0}
    return Threshold(float(scores.max()), float(scores.max()), source, scores, scores).at_false_alarm_rate(rate)


@pytest.mark.parametrize("n, rate", [(9, 0.1), (19, 0.05), (40, 0.05), (40, 0.2), (99, 0.01), (7, 0.3)])
def test_the_threshold_is_the_ceil_n_plus_1_times_1_minus_rate_th_smallest(n, rate):
    scores = np.random.default_rng(n).permutation(np.arange(1.0, n + 1))
    k = math.ceil(round((n + 1) * (1 - rate), 9))
    assert k <= n and conformal_rank(n, rate) == k
    assert _threshold(scores, rate).image == k  # the scores are 1..n


def test_the_promise_holds_over_exchangeable_draws():
    # Brute force: n + 1 exchangeable scores; the last one is above the threshold of the
    # first n at most `rate` of the time (exactly (n + 1 - k) / (n + 1) for continuous scores).
    rng = np.random.default_rng(0)
    n, rate, trials = 19, 0.1, 20000
    draws = rng.standard_normal((trials, n + 1))
    k = conformal_rank(n, rate)
    flagged = draws[:, -1] > np.sort(draws[:, :n], axis=1)[:, k - 1]
    assert abs(flagged.mean() - guarantee(n, rate)) < 0.01 and guarantee(n, rate) <= rate


def test_a_rate_out_of_reach_warns_and_says_what_is_reachable():
    with pytest.warns(UserWarning, match=r"needs at least 99 good parts; the 40 here can promise 0.0244"):
        t = _threshold(np.arange(1.0, 41), 0.01)
    assert t.image == 40.0
    assert t.describe() == ("false-alarm rate <= 0.0244 for parts like the 40 good parts (conformal, "
                            "leave-one-out); 0.01 was asked, which needs 99 good parts")


def test_rate_zero_is_the_maximum_and_promises_one_in_n_plus_one():
    t = _threshold([3.0, 1.0, 2.0])
    assert t.image == 3.0 and t.describe().startswith("false-alarm rate <= 0.25 for parts like the 3 good parts")


def test_p_values_count_the_good_scores_at_or_above():
    t = _threshold([1.0, 2.0, 2.0, 5.0])
    assert [t.p_value(s) for s in (0.0, 2.0, 3.0, 9.0)] == [1.0, 0.8, 0.4, 0.2]
    assert t.p_value(float("nan")) is None
    assert Threshold.given(1.0).p_value(3.0) is None


def test_the_mask_grid_is_each_locations_median_plus_a_conformal_margin():
    rng = np.random.default_rng(0)
    distances = rng.random((9, 4, 5)).astype(np.float32)
    distances[3, 1, 2] = 5.0  # one part far above its location's median
    scores = distances.max(axis=(1, 2)).astype(float)
    source = {"method": "leave-one-out", "images": 9, "false_alarm_rate": 0.0}
    t = Threshold(float(scores.max()), float(scores.max()), source, scores, scores, distances)
    median = np.median(distances, axis=0)
    excess = (distances - median).max(axis=(1, 2))
    np.testing.assert_allclose(t.pixel_grid, median + excess.max(), rtol=1e-6)
    # At rate 0 no held-out part is above the grid anywhere.
    assert (distances <= t.pixel_grid + 1e-6).all()
    assert t.describe_mask().startswith("a good part marked with probability <= 0.1 ")
    # At rate 0.2 the margin is the ceil(10 * 0.8) = 8th smallest of the nine excesses.
    relaxed = t.at_false_alarm_rate(0.2)
    np.testing.assert_allclose(relaxed.pixel_grid, median + np.sort(excess)[7], rtol=1e-6)
    assert Threshold.given(1.0).pixel_grid is None and Threshold.given(1.0).describe_mask() == "map above 1"


@pytest.mark.parametrize("bad", [np.zeros((3, 4, 5), np.float32), np.full((9, 4, 5), np.nan, np.float32),
                                 np.full((9, 4, 5), -1.0, np.float32), np.zeros((9, 20), np.float32)])
def test_held_out_distances_that_do_not_fit_their_scores_are_refused(bad):
    source = {"method": "leave-one-out", "images": 9, "false_alarm_rate": 0.0}
    with pytest.raises(ValueError, match="held-out distances"):
        Threshold(1.0, 1.0, source, np.ones(9), np.ones(9), bad)
