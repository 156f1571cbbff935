"""The public API contract of DinoPatch, on small synthetic parts (112 px input: 8x8 tokens)."""
import dataclasses

import numpy as np
import pytest
from conftest import FAST
from conftest import screws as make_screws

from dinopatch import DinoPatch, Result
from dinopatch.fitted import NotFittedError
from dinopatch.modelfile import ModelFileError
from dinopatch.synthetic import make_sample


@pytest.fixture(scope="module")
def screws():
    good = make_screws("good", 10, 1)
    test_good = make_screws("good", 4, 2)
    test_bad = make_screws("missing_washer", 2, 3) + make_screws("extra_object", 2, 4)
    return good, test_good, test_bad


@pytest.fixture(scope="module")
def fitted(screw_detector):
    # The session's detector is fitted on the same ten good screws.
    return screw_detector


def test_result_contract(fitted, screws):
    gray = screws[1][0][..., 0]
    odd = np.ascontiguousarray(screws[1][1][:100, :90])
    images = [gray, odd, screws[2][0]]
    results = fitted.predict(images)
    assert len(results) == 3
    for im, r in zip(images, results):
        assert isinstance(r, Result)
        assert isinstance(r.score, float) and np.isfinite(r.score)
        assert r.anomaly_map.dtype == np.float32 and r.anomaly_map.shape == im.shape[:2]
        assert r.mask.dtype == bool and r.mask.shape == im.shape[:2]
        assert r.threshold == fitted.threshold_.image and "the 10 good parts (conformal, leave-one-out)" \
            in r.threshold_source
        assert r.is_anomaly == (r.score > r.threshold or not r.aligned)
        assert isinstance(r.aligned, bool)


def test_defects_score_higher(fitted, screws):
    good = fitted.score_images(screws[1])
    bad = fitted.score_images(screws[2])
    assert bad.min() > good.max(), (good, bad)


def test_threshold_by_leave_one_out(fitted, screws):
    # Each of the 10 nominal images scored against a bank of the other 9.
    t = fitted.threshold_
    assert t.source == {"method": "leave-one-out", "images": 10, "false_alarm_rate": 0.0}
    assert t.scores.shape == (10,) and t.image == t.scores.max()
    # Defects score far above it; unseen good parts near the nominal scores (10 samples
    # of the nominal spread: one unseen part in four may land just above their maximum).
    good, bad = fitted.score_images(screws[1]), fitted.score_images(screws[2])
    assert (good <= t.image).sum() >= 3 and good.max() < 1.5 * t.image < bad.min()


def test_sklearn_sign_and_verdicts_agree(fitted, screws):
    images = screws[1] + screws[2]
    verdicts = [r.is_anomaly for r in fitted.predict(images)]
    assert verdicts[4:] == [True] * 4 and verdicts[:4].count(False) >= 3
    assert (fitted.decision_function(images) < 0).tolist() == verdicts


def test_batch_size_does_not_change_scores(fitted, screws):
    images = screws[1] + screws[2]
    a = fitted.score_images(images)
    fitted.batch_size = 1
    try:
        b = fitted.score_images(images)
    finally:
        fitted.batch_size = 8
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_save_load_round_trip(fitted, screws, tmp_path):
    path = fitted.save(tmp_path / "screw.npz")
    loaded = DinoPatch.load(path)
    assert loaded.get_params() == fitted.get_params()
    images = screws[1] + screws[2]
    np.testing.assert_array_equal(loaded.score_images(images), fitted.score_images(images))
    assert loaded.threshold_ == fitted.threshold_ and loaded.model_id == fitted.model_id


def test_load_rejects_bank_of_wrong_shape(fitted, tmp_path):
    from dinopatch import modelfile

    path = fitted.save(tmp_path / "m.npz")
    header, arrays = modelfile.read(path)
    arrays["bank"] = arrays["bank"][:10]
    del header["format"], header["version"], header["arrays"]
    modelfile.write(path, header, arrays)
    with pytest.raises(ModelFileError, match="does not fit"):
        DinoPatch.load(path)


def test_unfitted_and_empty():
    with pytest.raises(NotFittedError):
        DinoPatch(**FAST).predict([np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="at least one"):
        DinoPatch(**FAST).fit([])


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        DinoPatch(**FAST).fit([tmp_path / "missing.png"])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        DinoPatch(**FAST).fit([junk])


def test_params_checked_at_fit(screws):
    with pytest.raises(ValueError, match="multiple of 14"):
        DinoPatch(**dict(FAST, image_size=100)).fit(screws[0])
    with pytest.raises(ValueError, match="score"):
        DinoPatch(**dict(FAST, score="median")).fit(screws[0])


def test_texture_mode_without_alignment():
    rng = np.random.default_rng(0)
    good = [make_sample("pasta", "good", rng, size=112)[0] for _ in range(6)]
    det = DinoPatch(**dict(FAST, align=False)).fit(good)
    assert np.isfinite(det.threshold_.image)
    r = det.predict([make_sample("pasta", "spot", rng, size=112)[0]])[0]
    assert r.aligned and r.anomaly_map.shape == (112, 112)


def test_threshold_at_a_false_alarm_rate(screws):
    det = DinoPatch(**dict(FAST, calibration=0.5, false_alarm_rate=0.4)).fit(screws[0])
    t = det.threshold_
    assert t.source["method"] == "held-out" and t.scores.shape == (5,)
    # Conformal: the ceil(6 * 0.6) = 4th smallest of the five held-out scores, one above it.
    assert (t.scores > t.image).sum() == 1 and t.image in t.scores


def test_a_given_engine_is_used_and_must_have_the_models_weights(fitted, screws):
    engine = fitted.backbone_for()
    det = DinoPatch(**FAST).use_engine(engine)
    assert det.fit(screws[0][:4]).backbone_for() is engine and det.model_.fingerprint == engine.fingerprint
    other = dataclasses.replace(det.model_, fingerprint="0" * 64)  # a model of other weights
    with pytest.raises(ValueError, match="differ from the model's"):
        det.backbone_for(other)


def test_model_is_public_and_says_when_there_is_none():
    with pytest.raises(NotFittedError, match="not fitted yet"):
        DinoPatch(**FAST).model_
