"""The golden set and the measured engine choice: refusals, evidence, save/load, another machine.

No test here depends on which engine is fastest on this CPU: candidates are the
torch reference and wrappers around it, built by the test.
"""
import dataclasses
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch, engine_choice, golden
from dinopatch.calibration import Threshold
from dinopatch.modelfile import ModelFileError, read, write


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    det = DinoPatch(**FAST).fit(screws("good", 5, 0))
    path = det.save(tmp_path_factory.mktemp("m") / "model.npz")
    return det, path


class Noisy:
    """A damaged engine: the reference's tokens plus noise of a given size."""

    def __init__(self, engine, scale, seed=0):
        self.inner, self.scale, self.rng = engine, scale, np.random.default_rng(seed)
        self.engine, self.fingerprint, self.grid = "noisy", engine.fingerprint, engine.grid

    def __call__(self, frames, positions=None, **kw):
        out = self.inner(frames, positions)
        return (out + self.rng.normal(0, self.scale, out.shape)).astype(np.float32)


class Overfit(Noisy):
    """An engine exact on the frames it was calibrated on and off by noise on any other frame: a quantised
    graph that learnt its calibration set."""

    def __init__(self, engine, scale, seen):
        super().__init__(engine, scale)
        self.seen = {f.tobytes() for f in seen}

    def __call__(self, frames, positions=None, **kw):
        out = self.inner(frames, positions)
        off = np.array([f.tobytes() not in self.seen for f in frames])
        out[off] += self.rng.normal(0, self.scale, out[off].shape).astype(np.float32)
        return out


def _measure(det, model, builds):
    return engine_choice.measure(det, model, candidates=tuple(builds), build=lambda name: builds[name](),
                                 repeats=1, progress=None)


def _scores(model):
    g = model.golden
    return golden.scores(model.post, g.distances, g.valid)


def test_golden_set_in_model_and_survives_save_load(fitted):
    det, path = fitted
    g = det.model_.golden
    assert g.frames.dtype == np.uint8 and g.frames.shape == (8, 112, 112, 3)
    assert g.distances.dtype == np.float32 and g.distances.shape == (8, 8, 8)
    assert g.defect.tolist() == [False] * 3 + [True] * 3 + [False] * 2 and g.reference == "torch"
    assert g.nominal.tolist() == [False] * 6 + [True] * 2
    scores = _scores(det.model_)
    assert np.isfinite(scores).all() and (scores[:6] > 0).all()  # no blend or defect frame is in the bank verbatim
    assert (scores[6:] == 0).all()  # the nominal frames are: the reference's own tokens
    np.testing.assert_array_equal(g.blends, g.frames[:3])  # what an int8 graph is quantised on
    loaded = DinoPatch.load(path)
    np.testing.assert_array_equal(loaded.model_.golden.frames, g.frames)
    np.testing.assert_array_equal(loaded.model_.golden.distances, g.distances)
    np.testing.assert_array_equal(_scores(loaded.model_), scores)
    # the reference run again on the loaded model gives the stored distances
    again = golden.distances(loaded, loaded.model_, loaded.backbone_for(), g.frames, g.valid)
    np.testing.assert_allclose(again, g.distances, rtol=1e-5, atol=1e-5)


def test_tuned_model_checks_engines_by_what_it_now_judges(fitted, tmp_path):
    det, _ = fitted
    tuned = det.tuned(Threshold.given(det.threshold_.image * 0.5), sigma=0.0)
    loaded = DinoPatch.load(tuned.save(tmp_path / "tuned.npz"))
    assert loaded.model_.post.sigma == 0.0
    ref = loaded.backbone_for(loaded.model_)
    record = engine_choice.measure(loaded, loaded.model_, candidates=("torch",), build=lambda name: ref, repeats=1,
                                   progress=None)
    assert record["rows"][0]["flips"] == 0 and record["rows"][0]["max_deviation"] < 1e-5


def _edited(path, tmp_path, header_edit=None, array_edit=None):
    header, arrays = read(path)
    header = {k: v for k, v in header.items() if k not in ("format", "version", "arrays", "sha256", "signature")}
    if header_edit:
        header_edit(header)
    if array_edit:
        array_edit(arrays)
    out = tmp_path / "edited.npz"
    write(out, header, arrays)
    return out


@pytest.mark.parametrize("edit", [
    dict(array_edit=lambda a: a.__setitem__("golden_distances", a["golden_distances"].astype(np.float64))),
    dict(array_edit=lambda a: a.__setitem__("golden_frames", a["golden_frames"][:, :64])),
    dict(array_edit=lambda a: a.__setitem__("golden_distances", np.full_like(a["golden_distances"], np.nan))),
    dict(array_edit=lambda a: a.__setitem__("golden_distances", a["golden_distances"] + 100.0)),  # verdicts disagree
    dict(array_edit=lambda a: a.pop("golden_valid")),
    dict(header_edit=lambda h: h["golden"]["verdicts"].__setitem__(0, not h["golden"]["verdicts"][0])),
    dict(header_edit=lambda h: h.pop("golden")),  # arrays without their record
    dict(array_edit=lambda a: a.pop("golden_nominal")),
    dict(array_edit=lambda a: a.__setitem__("golden_nominal", a["golden_defect"].copy())),  # defect and nominal
    dict(array_edit=lambda a: a.__setitem__("golden_nominal", ~a["golden_defect"])),  # no blend left
])
def test_damaged_golden_set_refused(fitted, tmp_path, edit):
    with pytest.raises(ModelFileError):
        DinoPatch.load(_edited(fitted[1], tmp_path, **edit))


def test_an_engine_exact_only_on_the_blends_it_was_calibrated_on_is_refused(fitted):
    det, _ = fitted
    model = det.model_
    ref, g = det.backbone_for(model), model.golden
    seen = np.concatenate([g.blends, g.frames[g.defect]])  # a defect frame is a blend with a pasted defect
    record = _measure(det, model, {"torch": lambda: ref,
                                   "openvino:int8": lambda: Overfit(ref, 0.005 * model.threshold.image, seen)})
    row = {r["engine"]: r for r in record["rows"]}["openvino:int8"]
    assert row["flips"] == 0 and row["max_deviation"] > engine_choice.MAX_DEVIATION and "deviation" in row["refused"]
    assert record["chosen"] == "torch"


def test_golden_set_size_is_bounded(fitted, tmp_path):
    n = golden.MAX_FRAMES + 1

    def grow(arrays):
        for name in ("golden_frames", "golden_valid", "golden_defect", "golden_nominal", "golden_distances"):
            arrays[name] = np.resize(arrays[name], (n, *arrays[name].shape[1:]))

    def verdicts(header):
        header["golden"]["verdicts"] = list(np.resize(header["golden"]["verdicts"], n).tolist())
    with pytest.raises(ModelFileError, match=f"golden set of {n} frames"):
        DinoPatch.load(_edited(fitted[1], tmp_path, header_edit=verdicts, array_edit=grow))


def test_damaged_engine_refused_and_choice_from_evidence(fitted):
    det, _ = fitted
    model = det.model_
    ref = det.backbone_for(model)
    t = model.threshold.image
    # noise large enough to push every golden score over the threshold: verdicts flip
    record = _measure(det, model, {"torch": lambda: ref, "onnx:fp32": lambda: Noisy(ref, 10.0 * t)})
    rows = {r["engine"]: r for r in record["rows"]}
    assert rows["torch"]["refused"] is None and rows["torch"]["flips"] == 0
    assert not (_scores(model) > t).all()  # the noise can push a passing frame over
    assert rows["onnx:fp32"]["flips"] > 0 and "flip" in rows["onnx:fp32"]["refused"]
    assert record["chosen"] == "torch"
    assert engine_choice.check_record(json.loads(json.dumps(record))) == record


def test_choice_is_fastest_qualifying_with_ties_and_forbid():
    def row(name, ms, dev, refused=None):
        return engine_choice.candidate_row(name, ms, 0 if refused is None else 1, dev, refused)

    record = {"machine": "x", "bound": engine_choice.MAX_DEVIATION, "tie": engine_choice.TIE, "reference": "torch",
              "forbid": [],
              "rows": [row("torch", 100.0, 0.0), row("onnx:fp32", 50.0, 0.0), row("openvino:bf16", 49.0, 0.004),
                       row("onnx:int8", 20.0, 0.03, "1 verdict flip(s) on the golden set")]}
    assert engine_choice.choose(record) == "onnx:fp32"  # a tie with bf16 (within 5%): the smaller deviation
    assert engine_choice.choose(record, forbid=("fp32",)) == "openvino:bf16"
    record["rows"][3] = row("onnx:int8", 20.0, 0.01)
    assert engine_choice.choose(record) == "onnx:int8"
    assert engine_choice.choose(record, forbid=("int8",)) == "onnx:fp32"
    assert engine_choice.choose(dict(record, forbid=["int8"])) == "onnx:fp32"
    record["chosen"] = "torch"
    with pytest.raises(ValueError, match="disagrees with its evidence"):
        engine_choice.check_record(record)
    record["chosen"] = "onnx:int8"
    record["rows"][1]["flips"] = 2  # qualifies without the evidence for it
    with pytest.raises(ValueError, match="without the evidence"):
        engine_choice.check_record(record)


def test_deviation_beyond_bound_refused(fitted):
    model = fitted[0].model_
    scores, t = _scores(model), model.threshold.image
    bound = engine_choice.MAX_DEVIATION
    assert engine_choice.judge("onnx:fp32", scores + 0.5 * bound * t, scores, t, 1.0)["refused"] is None
    far = np.abs(scores - t) > 0.1 * t  # moved by 1.5 bounds, these cannot cross the threshold
    assert far.any()
    row = engine_choice.judge("onnx:fp32", scores + 1.5 * bound * t * far, scores, t, 1.0)
    assert row["flips"] == 0 and "deviation" in row["refused"]


def test_choice_stored_in_file_and_edited_choice_refused(fitted, tmp_path):
    det, path = fitted
    model = det.model_
    ref = det.backbone_for(model)
    record = _measure(det, model, {"torch": lambda: ref, "onnx:int8": lambda: Noisy(ref, 10.0 * model.threshold.image)})
    record["machine"] = engine_choice.machine()
    det2 = DinoPatch.load(path)
    det2.model_ = dataclasses.replace(det2.model_, engine_choice=record)
    out = det2.save(tmp_path / "chosen.npz")
    loaded = DinoPatch.load(out)
    assert loaded.model_.engine_choice == record

    def edit(h):
        h["engine_choice"]["chosen"] = "onnx:int8"
    with pytest.raises(ModelFileError, match="disagrees with its evidence"):
        DinoPatch.load(_edited(out, tmp_path, header_edit=edit))


def test_another_machine_measures_once_and_caches(fitted, tmp_path, monkeypatch):
    det, path = fitted
    model = det.model_
    ref = det.backbone_for(model)
    record = _measure(det, model, {"torch": lambda: ref})
    record["machine"] = "elsewhere"
    det2 = DinoPatch.load(path)
    det2.model_ = dataclasses.replace(det2.model_, engine_choice=record)
    out = det2.save(tmp_path / "elsewhere.npz")
    calls, real = [], engine_choice.measure

    def fake_measure(d, m, progress=None, **kw):
        calls.append(1)
        return real(d, m, candidates=("torch",), build=lambda name: ref, repeats=1, progress=None)
    monkeypatch.setattr(engine_choice, "measure", fake_measure)
    first = DinoPatch.load(out, engine="auto")
    assert calls == [1] and first.model_.engine_choice["machine"] == engine_choice.machine()
    cached = engine_choice.cache_path(first.model_id, engine_choice.machine())
    assert cached.is_file()
    assert DinoPatch.load(out).model_.engine_choice["machine"] == "elsewhere"  # a hand engine needs no choice
    DinoPatch.load(out, engine="auto")
    assert calls == [1]  # read from the cache, not measured again
    cached.write_text(cached.read_text().replace('"chosen": "torch"', '"chosen": "onnx:int8"'))
    with pytest.warns(UserWarning, match="invalid engine choice"):
        DinoPatch.load(out, engine="auto")
    assert calls == [1, 1]


def test_hand_engine_flip_warns_or_fails_strict(fitted):
    det, _ = fitted
    model = det.model_
    noisy = Noisy(det.backbone_for(model), 10.0 * model.threshold.image)
    hand = DinoPatch(**dict(FAST, engine="onnx:fp32"))
    hand.use_engine(noisy)
    with pytest.warns(UserWarning, match="does not reproduce the reference"):
        row = engine_choice.check_by_hand(hand, model)
    assert row["flips"] > 0
    with pytest.raises(engine_choice.EngineMismatchError):
        engine_choice.check_by_hand(hand, model, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hand.use_engine(det.backbone_for(model))
        assert engine_choice.check_by_hand(hand, model)["refused"] is None


def test_info_and_tune_engine_commands(fitted, tmp_path, capsys):
    from dinopatch.cli import main

    det, path = fitted
    model = det.model_
    ref = det.backbone_for(model)
    record = _measure(det, model, {"torch": lambda: ref, "onnx:int8": lambda: ref})
    det2 = DinoPatch.load(path)
    det2.model_ = dataclasses.replace(det2.model_, engine_choice=record)
    out = det2.save(tmp_path / "chosen.npz")
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "golden set: 8 frames (3 with pasted defects, 2 nominal as they are), scored by torch" in text
    assert all(name in text for name in ("torch", "onnx:int8", "qualifies", f"chosen: {record['chosen']}"))
    assert main(["tune-engine", "-m", str(out), "--from-evidence", "--forbid", "int8"]) == 0
    assert capsys.readouterr().out.strip().endswith("chosen: torch (forbidden: int8)")
    forbidden = tmp_path / "no-int8.npz"
    assert main(["tune-engine", "-m", str(out), "--from-evidence", "--forbid", "int8", "-o", str(forbidden)]) == 0
    capsys.readouterr()
    det3 = DinoPatch.load(forbidden)
    loaded = det3.model_.engine_choice
    assert loaded["forbid"] == ["int8"] and loaded["chosen"] == "torch" and loaded["rows"] == record["rows"]
    assert det3.engine == "auto" and engine_choice.in_force(det3.engine, det3.model_)[0] == "torch"
    assert main(["tune-engine", "-m", str(path), "--from-evidence"]) == 2  # the fixture's model chose nothing
    assert "holds no engine choice" in capsys.readouterr().err


def test_forbidden_candidate_is_not_built(fitted):
    det, _ = fitted
    ref = det.backbone_for(det.model_)

    def build(name):
        assert name == "torch", f"{name} was built although forbidden"
        return ref
    record = engine_choice.measure(det, det.model_, candidates=("torch", "onnx:int8"), build=build, repeats=1,
                                   progress=None, forbid=("int8",))
    assert record["rows"][1]["refused"] == "skipped: forbidden" and record["chosen"] == "torch"
    assert record["forbid"] == ["int8"] and engine_choice.check_record(record) == record


def test_openvino_int8_made_from_the_golden_set_and_read_back_by_hash(fitted):
    pytest.importorskip("openvino", reason="openvino is not installed")
    pytest.importorskip("nncf", reason="nncf is not installed (OpenVINO int8 is quantised by it)")
    from dinopatch.backbone import make_backbone, openvino_int8
    from dinopatch.backbone.onnx_export import token_cosine

    det, _ = fitted
    model = det.model_
    record = engine_choice.measure(det, model, candidates=("openvino:int8",), repeats=1, progress=None)
    row = record["rows"][0]
    assert row["sha256"] and row["ms_per_part"] > 0, row  # refused or not, it ran and was judged
    p = model.params
    kwargs = dict(name=p["backbone"], weights=p["weights"], image_size=p["image_size"], device="cpu")
    again = make_backbone("openvino:int8", model.fingerprint, sha256=row["sha256"], **kwargs)
    frames = model.golden.frames[:2]
    assert token_cosine(again(frames), det.backbone_for(model)(frames)) > 0.95
    with pytest.raises(ValueError, match="made when the engine is measured"):
        make_backbone("openvino:int8", model.fingerprint, **kwargs)
    xml = openvino_int8.cached(row["sha256"])
    xml.write_bytes(xml.read_bytes() + b" ")
    with pytest.raises(ValueError, match="do not hash"):
        make_backbone("openvino:int8", model.fingerprint, sha256=row["sha256"], **kwargs)


def test_quantising_sends_no_telemetry():
    """NNCF stubs its telemetry inside pytest by itself, so the check runs in a fresh interpreter."""
    pytest.importorskip("nncf", reason="nncf is not installed (OpenVINO int8 is quantised by it)")
    code = ("import os; os.environ.pop('NNCF_CI', None); import dinopatch.backbone.openvino_int8; "
            "import nncf.telemetry.wrapper as w; print(type(w.telemetry).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split()[-1] == "MagicMock", out.stdout + out.stderr  # NNCF's stub: nothing is sent
    code = code.replace("import dinopatch.backbone.openvino_int8; ", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split()[-1] == "NNCFTelemetry"  # the check can fail: without DinoPatch it would send
