"""The good set checked at fit: odd images named, left out, kept on purpose or refused (112 and 224 px input)."""
import json

import cv2
import numpy as np
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch, modelfile
from dinopatch.align import Aligner
from dinopatch.benchmark_sets import make_set
from dinopatch.goodset import LOCAL_RATIO, PEAKED, RATIO, FitReport, K, outlier_names, screen
from dinopatch.modelfile import ModelFileError


@pytest.fixture(scope="module")
def dirty():
    """Nine good screws with a black frame (#3) and a screw without its washer (#7) among them."""
    good = screws("good", 9, seed=1)
    return good[:3] + [np.zeros_like(good[0])] + good[3:6] + screws("missing_washer", 1, seed=9) + good[6:]


@pytest.fixture(scope="module")
def dropped(dirty):
    return DinoPatch(**FAST).fit(dirty)


def test_no_part_and_duplicates_are_named_before_the_backbone(dirty):
    copy = cv2.imdecode(cv2.imencode(".jpg", dirty[0], [cv2.IMWRITE_JPEG_QUALITY, 90])[1], cv2.IMREAD_COLOR)
    images = dirty + [dirty[1].copy(), copy]
    names = [f"part{i}.png" for i in range(len(images))]
    aligner = Aligner(size=112).fit(images)
    flags = screen([aligner.place(im) for im in images], names)
    assert [(f.name, f.reason) for f in flags] == [
        ("part3.png", "no part"), ("part11.png", "duplicate"), ("part12.png", "duplicate")]
    assert "identical to part1.png" in flags[1].detail and "part0.png" in flags[2].detail
    off = Aligner(size=112, enabled=False).fit(images[:3])
    assert screen([off.place(im) for im in images[:3]], names[:3]) == []


def test_a_black_frame_and_a_defective_part_are_left_out_and_named(dirty, dropped):
    report = dropped.fit_report_
    assert [(f.name, f.reason) for f in report.flagged] == [("#3", "no part"), ("#7", "outlier")]
    assert report.images == 11 and report.used == 9 and report.outliers == "drop"
    scores = {n: s for n, s, _ in report.scores}
    assert dropped.threshold_.source["images"] == 9 and "#3" not in scores
    assert "left out of the bank and the threshold" in report.describe()
    assert all(s < scores["#7"] / 2 for n, s in scores.items() if n != "#7")


def test_kept_on_purpose_or_refused(dirty, dropped):
    kept = DinoPatch(**FAST, outliers="keep").fit(dirty)
    assert kept.fit_report_.used == 11 and kept.threshold_.source["images"] == 11
    assert {f.name for f in kept.fit_report_.flagged} == {"#3", "#7"}
    assert kept.threshold_.image > 2 * dropped.threshold_.image  # what the check keeps away from the line
    with pytest.raises(ValueError, match=r"#3: no part"):
        DinoPatch(**FAST, outliers="error").fit(dirty)
    with pytest.raises(ValueError, match="outliers must be one of"):
        DinoPatch(**FAST, outliers="strict").fit(dirty)


@pytest.fixture(scope="module")
def wheels():
    """Twelve good toothed wheels at any rotation (224 px), and one of each defect."""
    d = make_set("wheel", n_train=12, n_test_good=0, n_test_defect=1, size=224, seed=3)
    return d["train"], dict(zip(d["defects"], d["test"]))


def test_a_clean_set_drops_nothing(wheels):
    det = DinoPatch(**dict(FAST, image_size=224)).fit(wheels[0])
    assert det.fit_report_.flagged == () and det.fit_report_.used == 12 == det.threshold_.source["images"]


@pytest.mark.parametrize("defect", ["broken_tooth", "burr", "crack"])
def test_a_defect_twice_the_median_is_named(wheels, defect):
    good, bad = wheels
    report = DinoPatch(**dict(FAST, image_size=224)).fit(good[:6] + [bad[defect]] + good[6:]).fit_report_
    scores = {n: s for n, s, _ in report.scores}
    median = np.median(list(scores.values()))
    assert [(f.name, f.reason) for f in report.flagged] == [("#6", "outlier")]
    assert "(a few patches raised)" in report.flagged[0].detail
    assert scores["#6"] < RATIO * median  # under the whole-map ratio: the wheel's own flaw would set the threshold
    assert max(v for k, v in scores.items() if k != "#6") < LOCAL_RATIO * median


def test_a_good_part_far_from_the_rest_is_named_and_can_be_kept():
    """The cost of the rule: of eight good screws at 112 px, one scores 2.6x the median held out."""
    images = screws("good", 8, seed=4)
    report = DinoPatch(**FAST).fit(images).fit_report_
    assert [(f.name, f.reason) for f in report.flagged] == [("#6", "outlier")] and report.used == 7
    assert "2.6 x the median" in report.flagged[0].detail
    kept = DinoPatch(**FAST, outliers="keep").fit(images)
    assert kept.fit_report_.used == 8 == kept.threshold_.source["images"]


def test_the_rule_is_a_ratio_and_a_spread_of_the_logarithms():
    scores = [(f"#{i}", v, 1.0) for i, v in enumerate([1.0, 1.1, 0.9, 1.05, 0.95, 1.0])]
    assert outlier_names(scores) == []
    # The ratio decides, as the spread is small: the lower one where a few patches are raised,
    assert outlier_names(scores + [("#6", LOCAL_RATIO + 0.01, 1.0)]) == ["#6"]
    assert outlier_names(scores + [("#6", LOCAL_RATIO - 0.01, 1.0)]) == []
    edge = (LOCAL_RATIO + 0.01) / PEAKED  # the percentile at which that score no longer stands out of its map
    assert outlier_names(scores + [("#6", LOCAL_RATIO + 0.01, edge * 0.99)]) == ["#6"]
    assert outlier_names(scores + [("#6", LOCAL_RATIO + 0.01, edge * 1.01)]) == []
    # ... the higher one where the whole map is raised with the score.
    assert outlier_names(scores + [("#6", RATIO + 0.01, RATIO)]) == ["#6"]
    assert outlier_names(scores + [("#6", RATIO - 0.01, RATIO)]) == []
    spread = [(f"#{i}", v, 1.0) for i, v in enumerate([1.0, 2.0, 4.0, 2.0, 1.0, 4.0])]  # median 2, logs 2x apart
    limit = 2.0 * np.exp(K * 1.4826 * np.log(2.0))
    assert limit > RATIO * 2 and outlier_names(spread + [("#6", limit * 1.001, 1.0)]) == ["#6"]
    assert outlier_names(spread + [("#6", limit * 0.999, 1.0)]) == []
    assert outlier_names(scores[:3] + [("#6", 100.0, 1.0)]) == []  # too few to judge
    assert outlier_names([(f"#{i}", 0.0, 0.0) for i in range(5)] + [("#5", 1e-9, 0.0)]) == ["#5"]  # above nothing


def test_the_report_survives_the_model_file(dropped, tmp_path):
    loaded = DinoPatch.load(dropped.save(tmp_path / "m.npz"))
    assert loaded.fit_report_ == dropped.fit_report_ and loaded.outliers == "drop"


def _edited(det, tmp_path, edit, part: str = "fit_report") -> str:
    header, arrays = modelfile.read(det.save(tmp_path / "base.npz"))
    header = json.loads(json.dumps({k: v for k, v in header.items() if k not in ("format", "version", "arrays")}))
    edit(header[part] if part else header)
    return modelfile.write(tmp_path / "edited.npz", header, arrays)


def test_a_file_from_before_the_check_kept_every_image_and_the_policy_must_be_the_reports(dropped, tmp_path):
    def before(header):
        del header["params"]["outliers"], header["fit_report"]

    old = DinoPatch.load(_edited(dropped, tmp_path, before, part=""))
    assert old.outliers == "keep" and old.fit_report_ is None  # the parameter table's missing value
    with pytest.raises(ModelFileError, match="not the parameters' outliers"):
        DinoPatch.load(_edited(dropped, tmp_path, lambda h: h["params"].update(outliers="keep"), part=""))


def test_the_policy_is_a_flag_of_fit():
    from dinopatch.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["fit", "x.png", "-o", "m.npz", "--outliers", "keep"]).outliers == "keep"
    assert parser.parse_args(["fit", "x.png", "-o", "m.npz"]).outliers == "drop"
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "x.png", "-o", "m.npz", "--outliers", "strict"])


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["flagged"].pop(), "scores give"),
    (lambda r: r["scores"].append(["#7", 99.0, 1.0]), "scores give"),
    (lambda r: r["scores"][0].pop(), "malformed"),
    (lambda r: r.update(used=11), "used with"),
    (lambda r: r.update(k=1.0), "rule"),
    (lambda r: r.update(ratio=1.0), "rule"),
    (lambda r: r["flagged"][0].update(reason="bad luck"), "malformed"),
    (lambda r: r.pop("scores"), "malformed"),
])
def test_an_edited_report_is_refused(dropped, tmp_path, edit, message):
    with pytest.raises(ModelFileError, match=message):
        DinoPatch.load(_edited(dropped, tmp_path, edit))


def test_a_report_from_before_is_none():
    assert FitReport.from_record(FitReport(3, 3, "keep", (), ()).record()).used == 3


def test_the_command_line_names_them_by_path(tmp_path, capsys):
    from conftest import BLOCKS_MATTER

    from dinopatch.cli import main

    folder = tmp_path / "good"
    folder.mkdir()
    images = screws("good", 5, seed=1)
    for i, im in enumerate(images + [np.zeros_like(images[0]), images[2]]):
        cv2.imwrite(str(folder / f"{i:03d}.png"), im)
    argv = ["fit", str(folder), "-o", str(tmp_path / "m.npz"), "--weights", BLOCKS_MATTER, "--image-size", "112",
            "--engine", "torch"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "good set: 5 of 7 images used" in out
    assert f"{folder / '005.png'}: no part" in out and f"{folder / '006.png'}: duplicate" in out
    assert f"identical to {folder / '002.png'}" in out
    # The pose report beside it names the frame without a part too.
    lines = out.splitlines()
    pose = next(i for i, line in enumerate(lines) if line.startswith("pose: "))
    assert "good image doubtful" in lines[pose] and lines[pose + 1].startswith(f"  {folder / '005.png'}: no part")
