"""The foreground region's margin chosen at fit by measurement, kept with its evidence, and fit aligning once."""
import copy

import numpy as np
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch, margin, modelfile
from dinopatch.align import Aligner
from dinopatch.autotune import ALPHA
from dinopatch.foreground import MARGINS, region
from dinopatch.modelfile import ModelFileError

IMAGES = screws("good", 8, seed=1)


@pytest.fixture(scope="module")
def fitted():
    """Foreground tokens at 224 px (a 16x16 grid: the region leaves background to drop)."""
    return DinoPatch(**dict(FAST, image_size=224, foreground=True)).fit(IMAGES)


def _row(m, patches, verdicts, auroc=0.9, worse=0.5):
    return {"margin": m, "patches": patches, "verdicts": verdicts, "auroc": auroc, "worse_share": worse}


def test_the_rule_keeps_the_narrowest_margin_with_the_references_right_verdicts_and_no_worse_auroc():
    defect = [False, True, True]
    ref = _row(2, 150, [False, True, False], worse=None)  # right, right, wrong (a missed defect)
    assert margin.choose([ref, _row(0, 60, [False, True, False])], defect) == 0
    assert margin.choose([ref, _row(0, 60, [True, True, False]), _row(1, 100, [False, True, False])], defect) == 1
    assert margin.choose([ref, _row(0, 60, [False, False, False]), _row(1, 100, [False, True, False])], defect) == 1
    worse = _row(0, 60, [False, True, False], worse=1 - ALPHA)
    assert margin.choose([ref, worse, _row(1, 100, [False, True, False])], defect) == 1
    assert margin.choose([ref, _row(0, 60, [True, True, False]), _row(1, 100, [False, False, True])], defect) == 2
    # Catching the defect the reference missed loses nothing; a tie in AUROC is not worse.
    caught = _row(0, 60, [False, True, True], auroc=0.8, worse=1 - ALPHA - 0.01)
    assert margin.choose([ref, caught], defect) == 0 and margin.flips(caught, ref, defect) == (0, 1)


def test_fit_keeps_the_chosen_region_and_its_evidence(fitted):
    fg = fitted.model_.foreground
    record = fg.margin
    assert record["reference"] == MARGINS[-1] and record["candidates"][0]["margin"] == MARGINS[-1]
    chosen = record["chosen"]
    rows, defect = record["candidates"], record["defect"]
    assert chosen == margin.choose(rows, defect) and margin.check_record(record, len(fg.positions))
    assert defect == [False] * 3 + [True] * 3  # the golden frames: blends, then the same with a defect
    # The region is the union of the good parts' silhouettes dilated by the chosen margin.
    al = Aligner(size=224).fit(IMAGES)
    sils = [s for s in map(al.silhouette, IMAGES) if s is not None]
    np.testing.assert_array_equal(fg.positions, region(sils, (16, 16), chosen))
    sizes = {r["margin"]: r["patches"] for r in record["candidates"]}
    assert sizes[chosen] == len(fg.positions) and sizes[chosen] <= sizes[MARGINS[-1]]
    for row in rows[1:]:  # every narrower margin measured before the choice failed the rule
        if row["margin"] != chosen:
            assert margin.flips(row, rows[0], defect)[0] or row["worse_share"] >= 1 - ALPHA
    assert f"margin {chosen}" in margin.describe(fg) and f"{len(fg.positions)} of 256 patches" in margin.describe(fg)


def test_the_record_survives_the_model_file(fitted, tmp_path):
    loaded = DinoPatch.load(fitted.save(tmp_path / "m.npz"))
    assert loaded.model_.foreground.margin == fitted.model_.foreground.margin


def _flip_a_right_verdict(record):
    rows = {r["margin"]: r for r in record["candidates"]}
    ref, row = rows[record["reference"]], rows[record["chosen"]]
    if row is ref:  # the widest was chosen: make the narrowest qualify
        record["candidates"][1].update(verdicts=list(ref["verdicts"]), worse_share=0.0)
        return
    i = next(i for i, (r, d) in enumerate(zip(ref["verdicts"], record["defect"])) if r == d)
    row["verdicts"][i] = not row["verdicts"][i]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(chosen=MARGINS[-1] if r["chosen"] != MARGINS[-1] else 0), "evidence gives|search"),
    (lambda r: r.update(reference=5), "malformed"),
    (lambda r: r["candidates"][0].update(patches=-3), "malformed"),
    (lambda r: r["candidates"][0].update(auroc="high"), "malformed"),
    (lambda r: r["candidates"].pop(0), "search|malformed"),
    (lambda r: [c.update(patches=c["patches"] + 1) for c in r["candidates"]], "patch counts"),
    (_flip_a_right_verdict, "evidence gives|search"),
    (lambda r: r.update(defect=[1, 0]), "golden labels"),
])
def test_an_edited_record_is_refused(fitted, tmp_path, edit, message):
    header, arrays = modelfile.read(fitted.save(tmp_path / "m.npz"))
    header = {k: v for k, v in copy.deepcopy(header).items() if k != "arrays"}
    edit(header["foreground"]["margin"])
    with pytest.raises(ModelFileError, match=message):
        DinoPatch.load(modelfile.write(tmp_path / "edited.npz", header, arrays))


@pytest.mark.parametrize("edit", [lambda fg: fg.pop("margin"), lambda fg: fg.update(margin=None)])
def test_a_region_without_its_margin_evidence_is_refused(fitted, tmp_path, edit):
    header, arrays = modelfile.read(fitted.save(tmp_path / "m.npz"))
    header = {k: v for k, v in header.items() if k not in ("format", "version", "arrays")}
    edit(header["foreground"])
    with pytest.raises(ModelFileError, match="foreground|margin"):
        DinoPatch.load(modelfile.write(tmp_path / "old.npz", header, arrays))


@pytest.mark.parametrize("params", [dict(image_size=224, foreground=True), dict()])
def test_fit_aligns_each_good_image_once(params, monkeypatch):
    calls = []
    place = Aligner._place

    def counted(self, image):
        calls.append(image.shape)
        return place(self, image)

    monkeypatch.setattr(Aligner, "_place", counted)
    det = DinoPatch(**dict(FAST, **params)).fit(IMAGES)
    assert (det.model_.foreground is not None) == bool(params)
    assert len(calls) == len(IMAGES)


def test_fit_and_info_say_the_region_and_its_margin(fitted, tmp_path, capsys):
    import cv2
    from conftest import BLOCKS_MATTER

    from dinopatch.cli import main

    folder = tmp_path / "good"
    folder.mkdir()
    for i, im in enumerate(IMAGES):
        cv2.imwrite(str(folder / f"{i:03d}.png"), im)
    argv = ["fit", str(folder), "-o", str(tmp_path / "m.npz"), "--weights", BLOCKS_MATTER, "--image-size", "224",
            "--engine", "torch", "--foreground", "on", "--tolerance", "1", "--sigma", "4", "--score", "max"]
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("foreground: ")]
    assert len(said) == 1 and " of 256 patches, margin " in said[0]
    assert main(["info", str(tmp_path / "m.npz")]) == 0
    assert said[0] in capsys.readouterr().out.splitlines()
