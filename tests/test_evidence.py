"""Every verdict-bearing value of a model file is bound to its evidence: consistent edits with the checksum
recomputed are refused by name, and a user's threshold is checked as a file's is, at fit, load and save."""
import numpy as np
import pytest
from conftest import FAST, edited_copy, screws

from dinopatch import DinoPatch, evidence
from dinopatch.modelfile import ModelFileError


@pytest.fixture(scope="module")
def model(evidence_model):
    det, path, parts = evidence_model
    return det, path, parts, evidence.reach(det.model_.bank.features)


def _verdicts(det, parts):
    return [r.is_anomaly for r in det.predict(parts)]


def _load(path, tmp_path, edit, name="edited.npz"):
    return DinoPatch.load(edited_copy(path, tmp_path / name, edit, golden=True))


def _threshold(image, source, **more):
    return lambda h, a: h["threshold"].update(image=image, pixel=image, source=source, **more)


# ----------------------------------------------------------------------------- consistent edits

def test_a_threshold_rewritten_as_the_users_is_held_to_the_banks_reach(model, tmp_path):
    det, path, _, reach = model
    beyond = 0.9 * evidence.THRESHOLD_REACH * np.sqrt((det.model_.bank.features.astype(np.float32) ** 2).sum(-1).max())
    with pytest.raises(ModelFileError, match="above the bank's reach"):
        _load(path, tmp_path, _threshold(float(beyond), {"method": "user"}))
    assert _load(path, tmp_path, _threshold(0.9 * reach, {"method": "user"})).threshold_.image == 0.9 * reach


def test_an_evaluation_threshold_is_derived_from_its_tuning_scores_and_capped_at_the_reach(model, tmp_path):
    det, path, _, reach = model
    source = {"method": "evaluation", "images": 2, "split": "made up"}

    def tuned(value, scores):
        def edit(header, arrays):
            _threshold(value, source, pixel_tuned=True)(header, arrays)
            arrays.update(tuning_scores=np.array(scores, np.float64), tuning_labels=np.array([False, True]))
        return edit

    with pytest.raises(ModelFileError, match="not the one its tuning scores give"):
        _load(path, tmp_path, tuned(50.0, [1.0, 3.0]))
    # Tuning scores made up to give the raised value: the rule caps it at the reach, so the file disagrees.
    with pytest.raises(ModelFileError, match=f"at most the bank's reach {reach:.4g}"):
        _load(path, tmp_path, tuned(50.0, [49.0, 51.0]))


def _scaled(factor, *, maps=False):
    def edit(header, arrays):
        t = header["threshold"]
        t.update(image=t["image"] * factor, pixel=t["pixel"] * factor)
        arrays["calibration_scores"] = arrays["calibration_scores"] * factor
        arrays["calibration_maxima"] = arrays["calibration_maxima"] * factor
        if maps:
            arrays["calibration_distances"] = arrays["calibration_distances"] * np.float32(factor)
    return edit


def test_calibration_scores_scaled_with_the_threshold_are_refused(model, tmp_path):
    _, path, _, _ = model
    with pytest.raises(ModelFileError, match="calibration score .* is not what its held-out map gives"):
        _load(path, tmp_path, _scaled(3.0))
    # The held-out maps scaled too: the bank and the background samples say what they were.
    with pytest.raises(ModelFileError, match="held-out distance .* is not (its distance to the bank's other parts|"
                                             "the background term its samples give)"):
        _load(path, tmp_path, _scaled(3.0, maps=True))


def test_the_score_method_must_be_the_one_the_threshold_was_measured_with(model, tmp_path):
    _, path, _, _ = model

    def mean(header, arrays):
        header["params"]["score"] = "mean"
        header.pop("auto", None)
        if header["threshold"].get("measured_with"):
            header["threshold"]["measured_with"]["score"] = "mean"

    with pytest.raises(ModelFileError, match="calibration score .* with score 'mean'"):
        _load(path, tmp_path, mean)


def test_the_auto_choice_rewritten_with_its_evidence_is_refused(model, tmp_path):
    _, path, _, _ = model

    def choose_mean(header, arrays):
        step = header["auto"]["evidence"]["test"]["steps"][0]
        assert step["candidate"].endswith("score=mean")
        step["win_share"] = 1.0
        header["auto"]["chosen"] = {"score": "mean"}

    with pytest.raises(ModelFileError, match="measured with"):
        _load(path, tmp_path, choose_mean)


def test_the_background_checks_statistics_follow_from_their_samples(model, tmp_path):
    """An object beside the part scores on the background check (its pose is not trusted either, which
    flags it whatever the score: the scores are what the check gives)."""
    det, path, parts, _ = model
    scores = [r.score for r in det.predict(parts["litter"])]
    assert min(scores) > 3 * det.threshold_.image
    for edit in (lambda h, a: h["foreground"].update(unit=1e-9),
                 lambda h, a: a.update(background_scale=np.full((64, 4), 1000.0, np.float32)),
                 lambda h, a: a.update(background_stats=a["background_stats"] * 100),
                 lambda h, a: a.update(background_stats=a["background_stats"] * 0.5),
                 lambda h, a: a.update(background_worst=a["background_worst"] * 1e-9)):
        try:
            loaded = _load(path, tmp_path, edit)
        except ModelFileError:
            continue
        np.testing.assert_allclose([r.score for r in loaded.predict(parts["litter"])], scores, rtol=1e-6)


def test_held_out_maps_raised_with_the_mask_threshold_are_refused(model, tmp_path):
    """Raising the maps raises the per-location mask threshold until no defect gets a mask."""
    _, path, _, _ = model
    with pytest.raises(ModelFileError, match="held-out distance"):
        _load(path, tmp_path, _scaled(5.0, maps=True))


def test_the_model_id_is_the_content(model, tmp_path):
    det, path, _, _ = model
    loaded = DinoPatch.load(path)
    assert loaded.model_id == det.model_id and len(det.model_id) == 12
    renamed = _load(path, tmp_path, lambda h, a: h.update(note="an edit that changes no verdict"))
    assert renamed.model_id != det.model_id
    with pytest.raises(ModelFileError, match="model id"):
        _load(path, tmp_path, lambda h, a: h.update(model_id=det.model_id))


# ----------------------------------------------------------------------------- user thresholds

def test_load_with_a_threshold_beyond_the_reach_is_refused(model):
    _, path, parts, reach = model
    for value in (1e4, 1.5 * reach):
        with pytest.raises(ValueError, match=f"image threshold {value:g} .given. is above the bank's reach"):
            DinoPatch.load(path, threshold=value)
    within = DinoPatch.load(path, threshold=0.9 * reach)
    assert within.threshold_.image == 0.9 * reach
    assert all(within.predict(parts["litter"])[i].is_anomaly for i in range(3))


def test_fit_with_a_threshold_beyond_the_reach_is_refused_and_one_within_saves_and_loads(tmp_path):
    good = screws("good", 4, seed=1)
    with pytest.raises(ValueError, match="image threshold 1e\\+09 .given. is above the bank's reach"):
        DinoPatch(**FAST, threshold=1e9).fit(good)
    det = DinoPatch(**FAST, threshold=1.0).fit(good)
    loaded = DinoPatch.load(det.save(tmp_path / "given.npz"))
    assert loaded.threshold_.image == 1.0 and loaded.threshold_.describe() == "given by the user"


def test_a_loaded_threshold_saves_and_loads_back_alike(model, tmp_path):
    _, path, parts, reach = model
    given = DinoPatch.load(path, threshold=0.5 * reach)
    again = DinoPatch.load(given.save(tmp_path / "again.npz"))
    assert again.threshold_.image == 0.5 * reach
    assert _verdicts(again, parts["defect"]) == _verdicts(given, parts["defect"])


@pytest.mark.parametrize("config", [dict(calibration=0.4), dict(bank_dtype="float16"), dict(match="local+global"),
                                    dict(tolerance="map"), dict(outliers="keep", foreground=True)])
def test_held_out_maps_are_derived_again_from_the_bank_whatever_its_settings(config, tmp_path):
    det = DinoPatch(**dict(FAST, **config)).fit(screws("good", 6, seed=1))
    path = det.save(tmp_path / "m.npz")
    assert DinoPatch.load(path).model_id == det.model_id
    with pytest.raises(ModelFileError, match="held-out distance"):
        _load(path, tmp_path, _scaled(1.05, maps=True))
