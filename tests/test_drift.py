import json

import numpy as np
import pytest
from conftest import screws

from dinopatch import DinoPatch
from dinopatch.drift import STATISTICS, H, Monitor, Reference, replay
from dinopatch.modelfile import ModelFileError
from dinopatch.stamp import Stamp

MU = np.array([195.0, 34.0, 1.06])  # brightness, contrast, scale of good parts (as the synthetic screws have)
SD = np.array([5.7, 1.1, 0.09])
# The flag must rise within this many parts of a lighting ramp of -1% brightness a part (20 good parts at fit).
RAMP_PARTS = 20


def _monitor(rng, n_ref=20):
    ref = Reference(STATISTICS, MU + SD * rng.standard_normal((n_ref, 3)))
    return Monitor(ref, 2.5 + 0.2 * rng.standard_normal(n_ref))


def _part(rng, brightness_factor=1.0):
    x = MU + SD * rng.standard_normal(3)
    x[0] *= brightness_factor
    return 2.5 + 0.2 * rng.standard_normal(), dict(zip(STATISTICS, x))


@pytest.mark.parametrize("seed", range(5))
def test_lighting_ramp_raises_the_flag_within_the_stated_parts(seed):
    rng = np.random.default_rng(seed)
    m = _monitor(rng)
    for i in range(1, 101):
        field = m.update(*_part(rng, 1.0 - 0.01 * i), good=True)
        if field["flag"]:
            break
    assert m.flag and m.first_flag_part <= RAMP_PARTS, m.summary()
    assert field["reason"].startswith("brightness down") and "refit" in field["reason"]


@pytest.mark.parametrize("seed", range(5))
def test_500_stable_parts_never_raise_it(seed):
    rng = np.random.default_rng(100 + seed)
    m = _monitor(rng)
    for _ in range(500):
        assert not m.update(*_part(rng), good=True)["flag"], m.summary()
    assert m.summary()["good_parts"] == 500 and max(m.summary()["cusum"].values()) < H


def test_which_parts_move_which_charts_and_a_few_odd_ones_do_not_raise_it():
    rng = np.random.default_rng(7)
    m = _monitor(rng)
    for _ in range(50):
        m.update(9.0, dict(zip(STATISTICS, MU)), good=False)  # a defect's score is the detector's business
    dark = {"brightness": 50.0, "contrast": 34.0, "scale": 1.06}
    for _ in range(50):
        m.update(2.5, dark, good=False, aligned=False)  # nor is a frame the aligner could not place
    assert not m.flag and m.good == 0 and max(m.summary()["cusum"].values()) == 0
    for _ in range(3):
        m.update(2.5, dark, good=True)  # three odd good parts in a row: each counts at most the clip
    assert not m.flag
    for _ in range(3):
        m.update(2.5, dark, good=True)
    assert m.flag and "brightness down" in m.reason


def test_score_creeping_up_raises_it_and_the_flag_stays_up():
    rng = np.random.default_rng(3)
    m = _monitor(rng)
    for i in range(60):
        score, stats = _part(rng)
        m.update(score + 0.05 * i, stats, good=True)
    assert m.flag and m.reason.startswith("score up")
    for _ in range(20):
        m.update(*_part(rng), good=True)
    assert m.flag


def test_reference_is_checked_on_load():
    ok = Reference(STATISTICS, MU[None] + np.zeros((3, 3)))
    header, arrays = ok.state()
    assert Reference.from_state(header, arrays).names == STATISTICS
    assert Reference.from_state(None, {}) is None  # a file from before drift existed
    for bad_header, bad_values in [({"statistics": ["brightness", "colour", "scale"]}, arrays["drift_reference"]),
                                   ({"statistics": ["scale", "scale", "scale"]}, arrays["drift_reference"]),
                                   (header, np.full((3, 3), np.nan)), (header, np.zeros((3, 2))),
                                   (header, np.zeros((3, 3), np.float32)), (None, arrays["drift_reference"]),
                                   (header, None)]:
        with pytest.raises(ValueError, match="drift"):
            Reference.from_state(bad_header, {} if bad_values is None else {"drift_reference": bad_values})


@pytest.fixture(scope="module")
def drift_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("drift") / "model.npz"
    from conftest import FAST

    DinoPatch(**FAST).fit(screws("good", 12, seed=1)).save(path)
    return path


def test_model_file_carries_the_reference_and_an_edited_one_is_refused(drift_model, tmp_path):
    from dinopatch import modelfile

    det = DinoPatch.load(drift_model)
    ref = det.model_.drift
    assert ref.names == STATISTICS and ref.values.shape == (12, 3) and np.isfinite(ref.values).all()
    header, arrays = modelfile.read(drift_model)
    arrays["drift_reference"] = np.full((12, 2), 1.0)
    modelfile.write(tmp_path / "edited.npz", header, arrays)
    with pytest.raises(ModelFileError, match="drift"):
        DinoPatch.load(tmp_path / "edited.npz")


def test_end_to_end_lighting_ramp_on_scored_parts(drift_model):
    """Real parts, real scores: stable parts keep the flag down; darkening them 1% a part raises it."""
    det = DinoPatch.load(drift_model)
    parts = screws("good", 16, seed=5)
    stable = Stamp(det)
    for image, result in zip(parts, det.predict(parts)):
        assert not stable({}, image, result)["drift"]["flag"]
    ramp = Stamp(det)
    darker = [np.clip(im * (1.0 - 0.01 * (i + 1)), 0, 255).astype(np.uint8) for i, im in enumerate(parts * 2)]
    fields = [ramp({}, im, r)["drift"] for im, r in zip(darker, det.predict(darker))]
    first = next(i for i, f in enumerate(fields) if f["flag"]) + 1
    assert first <= RAMP_PARTS and "down" in fields[-1]["reason"], (first, ramp.monitor.summary())
    # What the drift command reads back from predictions.jsonl gives the same verdict.
    lines = [json.dumps({"score": r.score, "is_anomaly": r.is_anomaly, "aligned": r.aligned, "error": None,
                         "drift": f}) for f, r in zip(fields, det.predict(darker))]
    again = replay(Monitor.for_model(det), lines)
    assert again.flag and again.first_flag_part == first


def test_drift_command_reads_a_run_back(drift_model, tmp_path, capsys):
    import cv2

    from dinopatch.cli import main

    parts = tmp_path / "parts"
    parts.mkdir()
    for i, im in enumerate(screws("good", 24, seed=6)):
        cv2.imwrite(str(parts / f"{i:02d}.png"), np.clip(im * (1.0 - 0.01 * (i + 1)), 0, 255).astype(np.uint8))
    assert main(["predict", str(parts), "-m", str(drift_model), "-o", str(tmp_path / "out"), "-q",
                 "--no-overlays"]) == 0
    said = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "drift.json").read_text())
    assert summary["flag"] and f"DRIFT from part {summary['first_flag_part']}" in said
    assert main(["drift", "-m", str(drift_model), str(tmp_path / "out" / "predictions.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == summary, "read back, the run gives the same summary"


def test_the_stream_runtime_follows_drift_like_predict(drift_model):
    from dinopatch.stream import stream

    det = DinoPatch.load(drift_model)
    darker = [np.clip(im * (1.0 - 0.01 * (i + 1)), 0, 255).astype(np.uint8)
              for i, im in enumerate(screws("good", 24, seed=5))]
    frames = list(stream(det, darker, drift=Monitor.for_model(det)))
    stamp = Stamp(det)
    expected = [stamp({}, im, r)["drift"] for im, r in zip(darker, det.predict(darker))]
    assert [f.drift for f in frames] == expected and frames[-1].drift["flag"]
    assert all(f.drift is None for f in stream(det, darker[:2]))
