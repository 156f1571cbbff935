"""Evaluation: a disjoint, stratified tuning split and a report a person can read."""
import json

import numpy as np
import pytest
from conftest import FAST

from dinopatch import DinoPatch
from dinopatch.data import MVTecFolder
from dinopatch.evaluate import evaluate, line_summary, split
from dinopatch.synthetic import synthesize


def test_split_is_stratified_disjoint_and_seeded():
    defects = ["good"] * 10 + ["crack"] * 4 + ["spot"] * 3 + ["lone"]
    tune, report = split(defects, 0.5, seed=3)
    assert set(tune).isdisjoint(report) and len(tune) + len(report) == len(defects)
    picked = [defects[i] for i in tune]
    assert picked.count("good") == 5 and picked.count("crack") == 2 and picked.count("spot") in (1, 2)
    assert "lone" not in picked  # a single image is always reported
    again, _ = split(defects, 0.5, seed=3)
    np.testing.assert_array_equal(tune, again)
    assert not np.array_equal(tune, split(defects, 0.5, seed=4)[0])


@pytest.fixture(scope="module")
def screw_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    folder = MVTecFolder(synthesize("screw", root / "screw", n_train=8, n_test_good=4, n_test_defect=2, size=128,
                                    seed=1))
    det = DinoPatch(**FAST).fit(folder.train_paths())
    out = tmp_path_factory.mktemp("report")
    return folder, det, out, evaluate(det, folder, out, progress=False)


def test_report_contents(screw_report):
    folder, det, out, m = screw_report
    tuned, reported = set(m["split"]["tune"]), set(m["split"]["report"])
    assert tuned and reported and tuned.isdisjoint(reported)
    assert not m["optimistic"]
    # Missing washers and extra objects are far from every good screw (scores 7-11 against 2-3 with
    # these weights): the ranking is known, so the image metrics are too.
    assert m["image_auroc"] == 1.0 and m["average_precision"] == 1.0 and m["tuned"]["image_auroc"] == 1.0
    assert m["pixel_auroc"] > 0.8
    assert set(m["settings"]) == {"sigma", "score", "threshold", "pixel_threshold", "morph_kernel",
                                  "threshold_source"}
    # The tuned threshold sits in the best-F1 gap of the tuning scores.
    assert m["tuned"]["f1"] == pytest.approx(m["tuned"]["best_f1"])
    assert m["per_defect"] and all(v["n"] >= 1 for v in m["per_defect"].values())
    assert json.load(open(out / "metrics.json"))["split"] == m["split"]
    for name in ("roc.png", "pr.png", "hist.png", "index.html"):
        assert (out / name).stat().st_size > 500, name
    assert len(list((out / "overlays").glob("*.png"))) == len(folder.test_items())
    page = (out / "index.html").read_text()
    assert "roc.png" in page and "overlays/" in page


def test_the_line_counts_are_the_models_own_verdicts_and_lead_the_page(screw_report):
    folder, det, out, m = screw_report
    items = folder.test_items()
    results = det.predict([it.path for it in items])
    labels = np.array([it.label for it in items], bool)
    flagged = np.array([r.is_anomaly for r in results])
    line = m["line"]
    assert (line["good_rejected"], line["n_good"]) == (int(flagged[~labels].sum()), int((~labels).sum()))
    assert (line["defects_caught"], line["n_defect"]) == (int(flagged[labels].sum()), int(labels.sum()))
    assert sum(v["defects_caught"] for v in line["per_defect"].values()) == line["defects_caught"]
    assert line["threshold"] == det.threshold_.image and 0.0 <= line["seg_f1"] <= 1.0
    assert 0.0 <= m["aupro_05"] <= 1.0 and all("aupro_05" in v for v in m["per_defect"].values())
    page = (out / "index.html").read_text()
    counts = (f"{line['good_rejected']} of {line['n_good']} good parts rejected, "
              f"{line['defects_caught']} of {line['n_defect']} defects caught")
    body = page[page.index("<body>"):]
    # The counts come first, before any table; metrics are named in words, not by their keys.
    assert counts in body and body.index(counts) < body.index("<table>")
    assert "image_auroc" not in page and "AU-PRO of the maps up to 5% false-positive pixels" in page
    printed = line_summary(m).splitlines()
    assert counts in printed[0] and max(map(len, printed)) <= 100
    assert [row.split()[0] for row in printed[1:]] == list(line["per_defect"])


def test_tuning_on_reported_images_is_flagged(screw_report, tmp_path):
    folder, det, _, _ = screw_report
    m = evaluate(det, folder, tmp_path, tune_on_report=True, progress=False)
    assert m["optimistic"] and m["split"]["tune"] == m["split"]["report"]
    assert "Optimistic" in (tmp_path / "index.html").read_text()


def test_threshold_from_good_parts_only(screw_report, tmp_path):
    folder, det, _, _ = screw_report
    m = evaluate(det, folder, tmp_path, threshold="good", progress=False)
    assert m["settings"]["threshold"] == det.threshold_.image
    assert m["settings"]["threshold_source"] == det.threshold_.describe()


def test_tuned_model_is_saved_with_its_source(screw_report, tmp_path):
    folder, det, _, _ = screw_report
    m = evaluate(det, folder, tmp_path / "r", progress=False, save_model=tmp_path / "tuned.npz")
    tuned = DinoPatch.load(m["saved_model"])
    assert tuned.threshold_.source["method"] == "evaluation" and tuned.threshold_.image == m["settings"]["threshold"]
    assert tuned.sigma == m["settings"]["sigma"] and tuned.score == m["settings"]["score"]
    assert det.threshold_.source["method"] == "leave-one-out"  # the evaluated detector is unchanged
    results = tuned.predict([img["path"] for img in m["images"]])
    assert [r.is_anomaly for r in results] == [img["is_anomaly"] for img in m["images"]]
    assert all("tuned by evaluation" in r.threshold_source for r in results)


def small_folder(source: MVTecFolder, root, goods: int, defects: int) -> MVTecFolder:
    """An MVTec folder with ``goods`` good and ``defects`` defective test images taken from ``source``."""
    import shutil

    items = source.test_items()
    keep = [it for it in items if it.label == 0][:goods] + [it for it in items if it.label == 1][:defects]
    for it in keep:
        (root / "test" / it.defect).mkdir(parents=True, exist_ok=True)
        shutil.copy(it.path, root / "test" / it.defect / it.path.name)
        if it.mask_path:
            (root / "ground_truth" / it.defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(it.mask_path, root / "ground_truth" / it.defect / it.mask_path.name)
    return MVTecFolder(root)


def strict_json(path) -> dict:
    def refuse(name):
        raise AssertionError(f"{name} literal in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("goods, defects", [(3, 0), (3, 1), (1, 1)])
def test_one_or_no_defect_image_gives_null_for_what_cannot_be_computed(screw_report, tmp_path, goods,
                                                                        defects):
    folder, det, _, _ = screw_report
    small = small_folder(folder, tmp_path / "data", goods=goods, defects=defects)
    m = evaluate(det, small, tmp_path / "r", progress=False, save_model=tmp_path / "tuned.npz")
    assert strict_json(tmp_path / "r" / "metrics.json") == m
    assert m["n_good"] >= 1 and m["n_defect"] == defects and m["accuracy"] is not None
    # The tuning part has good parts only, or nothing: nothing to rank there.
    assert m["tuned"]["image_auroc"] is None
    if defects:  # the lone defect is reported beside good parts: its ranking is known (see above)
        assert m["image_auroc"] == 1.0 and m["pixel_auroc"] is not None
    else:
        assert m["image_auroc"] is None and m["pixel_auroc"] is None and m["average_precision"] is None
    # Few images: every kind is named in the warnings.
    assert any("test/good" in w for w in m["warnings"]) and len(m["warnings"]) == 1 + defects
    assert "Few images" in (tmp_path / "r" / "index.html").read_text()
    assert DinoPatch.load(tmp_path / "tuned.npz").threshold_.image == m["settings"]["threshold"]


@pytest.mark.parametrize("kwargs, match", [(dict(tune_fraction=0.0), "tune_fraction"),
                                           (dict(tune_fraction=float("nan")), "tune_fraction"),
                                           (dict(tune_fraction=1.5), "tune_fraction"),
                                           (dict(threshold="best"), "threshold")])
def test_arguments_are_checked_before_any_work(screw_report, tmp_path, monkeypatch, kwargs, match):
    folder, det, _, _ = screw_report

    def no_scoring(*a, **k):
        raise AssertionError("scored before the arguments were checked")

    monkeypatch.setattr(det, "patch_distances", no_scoring)
    with pytest.raises(ValueError, match=match):
        evaluate(det, folder, tmp_path / "r", progress=False, **kwargs)
    assert not (tmp_path / "r").exists()


def test_a_wrong_layout_names_the_expected_one_and_writes_nothing(screw_report, tmp_path):
    _, det, _, _ = screw_report
    (tmp_path / "data" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="MVTec AD layout: train/good"):
        evaluate(det, MVTecFolder(tmp_path / "data"), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_the_pose_report_is_on_the_page_and_in_the_numbers(screw_report):
    import cv2

    folder, det, out, m = screw_report
    aligner, pose = det.model_.aligner, m["pose"]
    assert pose == json.load(open(out / "metrics.json"))["pose"]
    assert pose["symmetry"] == aligner.symmetry() and pose["fold"] == aligner.fold_
    lo, hi = aligner.ranges()["size"]
    assert pose["size_range"] == pytest.approx([lo, hi]) and lo < 1.0 < hi
    assert 0 < pose["misalignment"]["mean"] <= pose["misalignment"]["max"]
    assert all(0 <= v <= 1 for v in pose["misalignment"]["worst_at"])
    # Fit's screws all have a part and a pose in range: none doubtful, and the page says so.
    assert pose["doubtful"] == [] and not aligner.report_["doubtful"]
    page = (out / "index.html").read_text()
    for text in (pose["symmetry"], f"{lo:.2f}-{hi:.2f} of the good parts' median size", "pose.png",
                 "Doubtful good images</td><td class=l>none"):
        assert text in page, text
    pic = cv2.imread(str(out / "pose.png"))
    h, w, _ = pic.shape
    assert w == 640 and w // 2 < h < w  # two square panels side by side, a caption band above, a colour bar below
    mean_part, heat = pic[h // 3:2 * h // 3, :w // 2], pic[h // 3:2 * h // 3, w // 2:]
    assert mean_part.std() > 10 and heat.std() > 10  # a part and a map, not blank panels
    assert (np.abs(heat.astype(int) - mean_part.astype(int)).sum(axis=2) > 60).mean() > 0.05  # the map is coloured


def test_a_loaded_model_makes_its_pose_report_again_from_its_parts(screw_report, tmp_path):
    import dataclasses

    from dinopatch import pose_report

    folder, det, out, m = screw_report
    loaded = DinoPatch.load(det.save(tmp_path / "m.dpz"))
    assert loaded.model_.aligner.report_ is None  # the file keeps the parts, not the report
    again = json.loads(json.dumps(pose_report.summary(pose_report.of_model(loaded.model_))))
    assert again["symmetry"] == m["pose"]["symmetry"] and again["fold"] == m["pose"]["fold"]
    assert again["size_range"] == pytest.approx(m["pose"]["size_range"])
    assert again["misalignment"] == pytest.approx(m["pose"]["misalignment"], abs=1e-6)
    assert again["doubtful"] == m["pose"]["doubtful"]
    # Without its good parts, a model says what it does not know instead of inventing it.
    bare = pose_report.summary(pose_report.of_model(dataclasses.replace(loaded.model_, good=None)))
    assert bare["misalignment"] is None and bare["doubtful"] is None
    assert bare["size_range"] == pytest.approx(m["pose"]["size_range"])
    panel = pose_report.panel(bare)
    assert "not kept in this model file" in panel and "not known" in panel


def test_doubtful_good_images_are_named_on_the_panel():
    from dinopatch import pose_report

    report = {"mean_part": np.zeros((8, 8), np.float32), "misalignment": np.eye(8, dtype=np.float32) * 3,
              "symmetry": "no rotational symmetry: poses compared over the full turn", "fold": 1,
              "ranges": {"size": (0.97, 1.03), "peak_ratio": 1.2, "residual": 0.4, "stray": 0.001},
              "doubtful": {2: "no part outline found"}, "names": ["a.png", "b.png", "<blank>.png"]}
    pose = pose_report.summary(report)
    assert pose["doubtful"] == [{"name": "<blank>.png", "reason": "no part outline found"}]
    assert pose["misalignment"] == {"mean": pytest.approx(3 / 8), "max": 3.0, "worst_at": [0.0, 0.0]}
    panel = pose_report.panel(pose)
    assert "<li>&lt;blank&gt;.png: no part outline found</li>" in panel and "0.97-1.03" in panel
    assert "not aligned" in pose_report.panel(None)


def test_the_command_claims_every_file_evaluate_writes(screw_report):
    from dinopatch.cli import REPORT_FILES

    _, _, out, _ = screw_report
    assert {p.name for p in out.iterdir()} <= set(REPORT_FILES)  # --force removes them, a rerun refuses them
    assert (out / "pose.png").exists()


@pytest.mark.parametrize("threshold", ["tuned", "good"])
def test_the_tuned_mask_threshold_and_kernel_follow_from_the_sweep_the_file_carries(screw_report, tmp_path,
                                                                                   threshold):
    """A raised mask threshold empties every mask; with the checksum recomputed it loaded before the sweep."""
    from conftest import edited_copy

    from dinopatch.calibration import tuned_mask
    from dinopatch.evaluate import MORPH_KERNELS
    from dinopatch.modelfile import ModelFileError

    folder, det, _, _ = screw_report
    m = evaluate(det, folder, tmp_path / "r", progress=False, threshold=threshold, save_model=tmp_path / "t.npz")
    t = DinoPatch.load(m["saved_model"]).threshold_
    assert t.pixel_tuned and t.mask_counts.shape == (len(MORPH_KERNELS), len(t.mask_thresholds), 3)
    assert t.mask_counts[0, 0, 0] + t.mask_counts[0, 0, 2] > 0  # the tuning part has labelled defect pixels
    assert tuned_mask(t.mask_kernels, t.mask_thresholds, t.mask_counts) == (t.pixel, m["settings"]["morph_kernel"])

    def load(edit):
        return DinoPatch.load(edited_copy(m["saved_model"], tmp_path / "edited.npz", edit, golden=True))

    def zeros(h, a):
        for name in ("tuning_mask_kernels", "tuning_mask_thresholds", "tuning_mask_counts"):
            a[name] = np.zeros((0,) * a[name].ndim, a[name].dtype)

    other = next(k for k in MORPH_KERNELS if k != m["settings"]["morph_kernel"])
    for edit, match in [(lambda h, a: h["threshold"].update(pixel=h["threshold"]["pixel"] * 3),
                         "pixel threshold .* is not the one its tuning sweep gives"),
                        (lambda h, a: h["params"].update(morph_kernel=other),
                         f"morph_kernel {other} is not the one the mask threshold's tuning sweep gives"),
                        (zeros, "needs its sweep"),
                        (lambda h, a: h["threshold"].update(pixel_tuned=False), "a mask sweep beside a mask threshold"
                         "|disagrees with its held-out maps"),
                        (lambda h, a: a.update(tuning_mask_counts=a["tuning_mask_counts"][..., ::-1].copy()),
                         "the mask sweep's counts|pixel threshold .* is not the one")]:
        with pytest.raises(ModelFileError, match=match):
            load(edit)


def test_a_fixtured_report_says_whether_its_frames_were_registered(tmp_path):
    folder = MVTecFolder(synthesize("pasta", tmp_path / "pasta", n_train=6, n_test_good=2, n_test_defect=2,
                                    size=112, seed=0))
    det = DinoPatch(**dict(FAST, align=False)).fit(folder.train_paths())
    m = evaluate(det, folder, tmp_path / "r", progress=False)
    assert m["pose"] is None and m["registration"] == det.model_.aligner.registration_.describe()
    page = (tmp_path / "r" / "index.html").read_text()
    assert "not aligned" in page and "Fixtured frames" in page
