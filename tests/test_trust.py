"""Verdicts a line can trust: a threshold that is always measured or given, model values checked at load,
refits that rebuild what changed, and a refit that never mixes two models in one prediction (issue 12)."""
import dataclasses
import threading

import numpy as np
import pytest
from conftest import FAST, edited_copy, screws

from dinopatch import DinoPatch
from dinopatch.modelfile import ModelFileError


@pytest.fixture(scope="module")
def parts():
    return screws("good", 4, seed=1), screws("missing_washer", 2, seed=3) + screws("extra_object", 2, seed=4)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_few_images_give_a_finite_threshold_that_flags_defects(parts, n):
    good, bad = parts
    det = DinoPatch(**FAST).fit(good[:n])
    assert np.isfinite(det.threshold_.image) and det.threshold_.source["images"] == n
    assert all(r.is_anomaly for r in det.predict(bad))


def test_one_image_needs_a_given_threshold(parts):
    good, bad = parts
    with pytest.raises(ValueError, match="at least 2 nominal images"):
        DinoPatch(**FAST).fit(good[:1])
    det = DinoPatch(**FAST, threshold=5.0).fit(good[:1])
    assert det.threshold_.describe() == "given by the user"
    assert [r.threshold for r in det.predict(bad[:1])] == [5.0]


@pytest.mark.parametrize("calibration", [0, 0.0, -0.1, 1.0, "loo", True])
def test_calibration_values_outside_the_two_modes_are_refused(parts, calibration):
    with pytest.raises(ValueError, match="calibration"):
        DinoPatch(**FAST, calibration=calibration).fit(parts[0])


def test_a_held_out_fraction_too_small_for_one_image_falls_back_to_leave_one_out(parts):
    det = DinoPatch(**FAST, calibration=0.1).fit(parts[0][:3])
    assert det.threshold_.source["method"] == "leave-one-out"


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    return DinoPatch(**FAST).fit(parts[0]).save(tmp_path_factory.mktemp("m") / "m.npz")


def _edited(saved, tmp_path, edit):
    return edited_copy(saved, tmp_path / "edited.npz", edit)


def _set(path, value):
    def edit(header, arrays):
        node = header
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


@pytest.mark.parametrize("path, value", [
    (("threshold", "image"), float("inf")), (("threshold", "image"), 1e308), (("threshold", "image"), "1e9"),
    (("threshold", "image"), -1.0), (("threshold", "image"), 0.0), (("threshold", "image"), float("nan")),
    (("threshold", "image"), True), (("threshold", "image"), 1e4),
    (("threshold", "source", "method"), "magic"),
    (("params", "sigma"), 100.0), (("params", "tolerance"), 2**63 - 1), (("params", "image_size"), 7000),
    (("aligner", "size"), 7000), (("aligner", "nominal_size"), 0.0), (("aligner", "nominal_length"), float("nan")),
    (("weights_fingerprint",), KeyError), (("params", "seed"), -1), (("params", "batch_size"), 10**9),
    (("params", "score"), "median"), (("params", "kernel"), "gpu"), (("model_id",), "../etc"),
    (("params", "size_tolerance"), 0.2), (("params", "size_tolerance"), 1.0),
])
def test_edited_values_are_refused_at_load(saved, tmp_path, path, value):
    edited = _edited(saved, tmp_path, _set(path, value))
    with pytest.raises(ModelFileError):
        DinoPatch.load(edited)


def test_a_token_grid_polarity_of_an_older_file_is_refused(saved, tmp_path):
    edited = _edited(saved, tmp_path, lambda h, a: a.update(polarity=np.zeros((8, 384), np.float32)))
    with pytest.raises(ModelFileError, match="polarity.*fit the model again"):
        DinoPatch.load(edited)


def test_threshold_edited_within_reach_disagrees_with_its_scores(saved, tmp_path):
    edited = _edited(saved, tmp_path, lambda h, a: h["threshold"].update(image=h["threshold"]["image"] * 1.5))
    with pytest.raises(ModelFileError, match="disagrees with its own calibration scores. conformal"):
        DinoPatch.load(edited)


def test_seed_change_without_fingerprint_is_refused(saved, tmp_path):
    def edit(header, arrays):
        del header["weights_fingerprint"]
        header["params"]["seed"] = 7
    with pytest.raises(ModelFileError, match="fingerprint"):
        DinoPatch.load(_edited(saved, tmp_path, edit))


def test_load_overrides_name_their_source(saved, parts):
    loaded = DinoPatch.load(saved)
    assert loaded.threshold_.describe() == ("false-alarm rate <= 0.2 for parts like the 4 good parts "
                                            "(conformal, leave-one-out); the maximum of their scores")
    given = DinoPatch.load(saved, threshold=3.0)
    assert given.predict(parts[1][:1])[0].threshold_source == "given by the user"
    relaxed = DinoPatch.load(saved, false_alarm_rate=0.5)
    # The ceil(5 * 0.5) = 3rd smallest of the four scores.
    assert relaxed.threshold_.image == np.sort(loaded.threshold_.scores)[2] < loaded.threshold_.image
    assert relaxed.predict(parts[1][:1])[0].threshold_source == (
        "false-alarm rate <= 0.4 for parts like the 4 good parts (conformal, leave-one-out); 0.5 was asked")
    with pytest.raises(ValueError):
        DinoPatch.load(saved, threshold=float("inf"))
    with pytest.raises(ValueError, match="only"):
        DinoPatch.load(saved, image_size=224)


def test_every_verdict_carries_its_conformal_p_value(saved, parts):
    det = DinoPatch.load(saved)
    scores = det.threshold_.scores
    for r in det.predict(parts[0][:2] + parts[1][:2]):
        assert r.p_value == (1 + np.sum(scores >= r.score)) / (scores.size + 1)
    # A defect above every good score gets the smallest p-value four scores allow.
    assert [r.p_value for r in det.predict(parts[1])] == [0.2] * 4
    assert DinoPatch.load(saved, threshold=3.0).predict(parts[1][:1])[0].p_value is None


def test_masks_are_judged_per_location_on_the_good_parts_alone(saved, parts, tmp_path):
    det = DinoPatch.load(saved)
    t = det.threshold_
    assert t.distances.shape == (4, 8, 8) and t.pixel_grid.shape == (8, 8)
    # No labelled defect was needed: every defect gets a mask.
    assert all(r.mask.any() for r in det.predict(parts[1]))
    # At rate 0 every held-out distance is at or below its location's threshold, and smoothing
    # keeps the order: not one pixel of a held-out good part's own map is marked.
    raw = det.patch_distances(parts[0][:1])[0]
    for d in t.distances:
        assert not det.result_from(dataclasses.replace(raw, distances=d), morph_kernel=0).mask.any()


def test_edited_held_out_distances_are_refused_at_load(saved, tmp_path):
    def shrink(header, arrays):
        arrays["calibration_distances"] = arrays["calibration_distances"][:, :4]

    def huge(header, arrays):
        arrays["calibration_distances"] = arrays["calibration_distances"] * 1e6

    with pytest.raises(ModelFileError, match="held-out distances"):
        DinoPatch.load(_edited(saved, tmp_path, shrink))
    with pytest.raises(ModelFileError, match="per-location mask threshold"):
        DinoPatch.load(_edited(saved, tmp_path, huge))


def test_refit_after_changing_size_and_seed_rebuilds_the_backbone(parts, tmp_path):
    good, bad = parts
    det = DinoPatch(**FAST).fit(good)
    det.set_params(image_size=140, seed=3).fit(good)
    loaded = DinoPatch.load(det.save(tmp_path / "m.npz"))
    assert loaded.image_size == 140 and loaded.model_.bank.grid == (10, 10)
    np.testing.assert_array_equal(loaded.score_images(bad), det.score_images(bad))


def test_set_params_after_fit_does_not_change_the_saved_model(parts, tmp_path):
    good, bad = parts
    det = DinoPatch(**FAST).fit(good)
    before = det.score_images(bad)
    det.set_params(image_size=140, sigma=1.0)  # not refitted: the fitted model stays whole
    np.testing.assert_array_equal(det.score_images(bad), before)
    loaded = DinoPatch.load(det.save(tmp_path / "m.npz"))
    assert loaded.image_size == 112 and loaded.sigma == 4.0


def test_refit_while_predicting_never_mixes_models(parts):
    good, bad = parts
    det = DinoPatch(**FAST).fit(good[:2])
    old = det.score_images(bad)
    other = DinoPatch(**FAST).fit(good[2:])
    new = other.score_images(bad)
    assert not np.allclose(old, new)
    seen, errors = [], []

    def predict():
        try:
            for _ in range(3):
                seen.append(det.score_images(bad))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=predict) for _ in range(2)]
    for t in threads:
        t.start()
    det.fit(good[2:])
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(seen) == 6
    for s in seen:
        assert np.allclose(s, old, rtol=1e-5) or np.allclose(s, new, rtol=1e-5), (s, old, new)


def test_a_gpu_that_is_not_there_fails_at_fit_before_any_work():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from dinopatch.backbone.device import DeviceUnavailableError

    det = DinoPatch(**FAST, device="cuda:1")  # the constructor only stores, as scikit-learn's do
    with pytest.raises(DeviceUnavailableError, match="'cuda:1'.*no CUDA GPU is usable"):
        det.fit([np.zeros((8, 8), np.uint8)])  # not even a part: the device is checked first
    with pytest.raises(ValueError, match="device"):
        DinoPatch(**FAST, device="gpu").fit(screws("good", 2, seed=1))


def test_auto_device_runs_on_the_cpu_and_says_so(parts, caplog):
    pytest.importorskip("torch")
    import logging

    caplog.set_level(logging.INFO, logger="dinopatch")
    det = DinoPatch(**FAST, device="auto").fit(parts[0][:2])
    assert det.backbone_for().device in ("cpu", "cuda:0")
    assert any("device='auto'" in r.getMessage() for r in caplog.records)


def test_a_swapped_cached_graph_is_never_used(parts, tmp_path):
    pytest.importorskip("onnxruntime")
    good, bad = parts
    det = DinoPatch(**dict(FAST, engine="onnx")).fit(good[:2])
    graph = det.model_.graph
    assert graph["engine"] == "onnx" and graph["sha256"] == det.backbone_for().sha256
    path = det.save(tmp_path / "m.npz")
    cached = det.backbone_for().path
    onnx = pytest.importorskip("onnx")
    swapped = onnx.load(str(cached))
    swapped.doc_string = "another graph with the genuine metadata"  # a valid graph, other bytes
    onnx.save(swapped, str(cached))
    loaded = DinoPatch.load(path)
    np.testing.assert_allclose(loaded.score_images(bad[:1]), det.score_images(bad[:1]), rtol=1e-5)
    # Torch is installed here, so the graph was exported again rather than used as found.
    assert loaded.backbone_for().sha256 == graph["sha256"]
