"""The nominal set: one fold plan for every held-out measurement fit makes (112 px input: 8x8 tokens)."""
import numpy as np
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch, autotune, tolerance
from dinopatch.align import Aligner
from dinopatch.nominal import MAX_FOLDS, FoldPlan, NominalSet


@pytest.mark.parametrize("n", [2, 7, MAX_FOLDS, 23])
def test_fold_plan_holds_each_image_out_once(n):
    plan = FoldPlan.seeded(n, seed=3)
    held = np.concatenate(plan.folds)
    assert sorted(held) == list(range(n)) and len(plan.folds) == min(n, MAX_FOLDS)
    assert plan.method == ("leave-one-out" if n <= MAX_FOLDS else "k-fold")
    assert all(np.array_equal(a, b) for a, b in zip(plan.folds, FoldPlan.seeded(n, seed=3).folds))
    for fold in plan.folds:
        assert not set(plan.train(fold)) & set(fold) and len(plan.train(fold)) + len(fold) == n
    assert FoldPlan.seeded(n, seed=4).order.tolist() != plan.order.tolist() or n == 2


def test_fraction_falls_back_when_nothing_or_everything_is_held_out():
    plan = FoldPlan.seeded(10, seed=0)
    assert np.array_equal(plan.fraction(0.3)[0], plan.order[:3])
    assert plan.fraction(0.05) is None and plan.fraction(0.99) is not None and len(plan.fraction(0.99)[0]) == 9


@pytest.fixture(scope="module")
def region_fit():
    images = screws("good", 12, seed=1)
    det = DinoPatch(**dict(FAST, foreground=True)).fit(images)
    aligner = Aligner(size=112).fit(images)
    positions = det.model_.foreground.positions
    padded = aligner.padded("background")
    nominal = NominalSet.build([padded.transform(im) for im in images], padded, det.backbone_for(),
                               positions=positions, seed=0)
    return det, aligner, nominal


def test_the_threshold_is_measured_on_the_plan_the_nominal_set_answers(region_fit):
    det, _, nominal = region_fit
    assert len(nominal.plan.folds) == MAX_FOLDS and det.threshold_.source["folds"] == MAX_FOLDS
    index, scores, _, distances, _ = nominal.held_out_scores(det.model_.resolved)
    assert sorted(index) == list(range(12))
    np.testing.assert_allclose(det.threshold_.scores, scores, rtol=1e-6)
    # The held-out maps are the per-location mask threshold's evidence, image for image.
    assert distances.shape == (12, 8, 8) and distances.dtype == np.float32
    np.testing.assert_allclose(det.threshold_.distances, distances, rtol=1e-6)
    assert det.threshold_.image == pytest.approx(scores.max())


def test_a_region_gets_its_own_aligner_and_leaves_the_fitted_one_alone(region_fit):
    det, aligner, nominal = region_fit
    assert aligner.padding == "reflect"  # the caller's aligner is not rewritten
    assert nominal.aligner is not aligner and nominal.aligner.padding == "background"
    assert det.model_.aligner.padding == "background"
    assert nominal.foreground is not None and nominal.foreground.unit > 0
    maps = nominal.held_out({"tolerance": 1, "match": "local", "coreset_ratio": 1.0, "bank_dtype": "float32"})
    assert maps.shape == (12, 8, 8) and np.isfinite(maps).all()  # the background term fills the rest


def test_held_out_queries_are_scored_by_their_origin_fold(region_fit):
    _, _, nominal = region_fit
    settings = {"tolerance": 0, "match": "local", "coreset_ratio": 1.0, "bank_dtype": "float32"}
    # A nominal image as its own query: against the bank without its fold it scores as it does held out.
    queries = nominal.queries([nominal.frames[i] for i in (0, 5)], [0, 5])
    maps, more = nominal.held_out(settings, extra=queries)
    np.testing.assert_allclose(more, maps[[0, 5]], atol=1e-4 * float(np.nanmax(maps)))


def test_the_tolerance_map_is_measured_on_the_plan_and_built_into_its_banks(region_fit):
    _, _, nominal = region_fit
    settings = {"tolerance": "map", "match": "local", "coreset_ratio": 1.0, "bank_dtype": "float32"}
    with pytest.raises(ValueError, match="before its offsets"):
        nominal.bank(settings)
    offsets = autotune.measure_offsets({"tolerance": "map", "seed": 0}, nominal)
    covered = offsets.sum(axis=1) > 0
    assert (offsets.sum(axis=1)[covered] == len(nominal)).all()  # each image held out once, by the plan
    mapped = nominal.with_offsets(offsets)
    np.testing.assert_array_equal(mapped.bank(settings).tolerance, tolerance.tolerance_map(offsets, (8, 8), 7))
    assert mapped.subset(np.arange(6), seed=0).offsets is None  # evidence of another set is not carried over
    assert autotune.measure_offsets({"tolerance": 1, "seed": 0}, nominal) is None
