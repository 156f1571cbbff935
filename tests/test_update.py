"""Update from operator-confirmed good parts: the same model as a fit on the union, its lineage in the
file, clear defects refused unless forced."""
import json
from datetime import datetime, timezone

import numpy as np
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch, modelfile
from dinopatch.modelfile import ModelFileError
from dinopatch.update import part_hash


@pytest.fixture(scope="module")
def parts():
    return screws("good", 40, seed=3), screws("good", 3, seed=9) + screws("bent_thread", 3, seed=9)


@pytest.fixture(scope="module")
def parent(parts, tmp_path_factory):
    """A model file fitted on the first 20 good parts (one of which its good-set check leaves out)."""
    return DinoPatch(**FAST).fit(parts[0][:20]).save(tmp_path_factory.mktemp("update") / "parent.npz")


def test_an_update_is_the_fit_on_the_union_and_says_where_it_came_from(parts, parent, tmp_path):
    good, test = parts
    before = datetime.now(timezone.utc).replace(microsecond=0)
    updated = DinoPatch.load(parent)
    parent_id = updated.model_id
    # The good-set check runs again on the union: what it names among 40 parts need not be what it named among 20.
    assert updated.fit_report_.images == 20
    child = DinoPatch.load(updated.update(good[20:]).save(tmp_path / "child.npz"))
    union = DinoPatch(**FAST).fit(good)

    got = np.array([r.score for r in child.predict(test)])
    want = np.array([r.score for r in union.predict(test)])
    assert np.abs(got - want).max() <= 1e-5, f"max score difference {np.abs(got - want).max():.3g}"
    assert child.threshold_.image == pytest.approx(union.threshold_.image, abs=1e-5)
    assert child.fit_report_.images == union.fit_report_.images == 40
    assert child.fit_report_.kept() == union.fit_report_.kept()
    assert child.model_id != parent_id

    (entry,) = child.model_.good.lineage
    assert entry["parent"] == parent_id and entry["added"] == 20 and entry["kept"] == 20 and entry["forced"] == []
    assert entry["sha256"] == [part_hash(im) for im in good[20:]]
    when = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert before <= when <= datetime.now(timezone.utc)
    assert len(child.model_.good.images) == 40


def test_a_clear_defect_is_refused_with_its_reason_and_taken_when_forced(parts, parent):
    good, test = parts
    det = DinoPatch.load(parent)
    blank = np.full((128, 128, 3), 128, np.uint8)  # nothing to place
    with pytest.raises(ValueError, match="clear defects") as refused:
        det.update([good[20], test[3], blank])
    said = str(refused.value)
    # The bent part is refused as scored far beyond the good parts, or as a pose the aligner doubts.
    assert "#1: " in said and "#2: the model cannot place it" in said and "#0" not in said
    assert det.model_.good.lineage == ()  # refused: the model is unchanged

    det.update([good[20], test[3]], force=True)
    (entry,) = det.model_.good.lineage
    assert entry["forced"] == ["#1"] and entry["added"] == 2


def _edited(path, tmp_path, edit) -> str:
    header, arrays = modelfile.read(path)
    header = json.loads(json.dumps({k: v for k, v in header.items() if k not in ("format", "version", "arrays")}))
    edit(header, arrays)
    return modelfile.write(tmp_path / "edited.npz", header, arrays)


def test_edited_parts_or_lineage_are_refused_on_load(parts, parent, tmp_path):
    child = DinoPatch.load(parent).update(parts[0][20:22]).save(tmp_path / "child.npz")

    def pixel(header, arrays):
        arrays["good_pixels"] = arrays["good_pixels"].copy()
        arrays["good_pixels"][7] ^= 1

    def parent_id(header, arrays):
        header["good_parts"]["lineage"][0]["parent"] = "not-an-id"

    def kept(header, arrays):
        header["good_parts"]["lineage"][0]["kept"] = 1

    def added(header, arrays):
        header["good_parts"]["lineage"][0]["sha256"][0] = header["good_parts"]["sha256"][0]

    def time(header, arrays):
        header["good_parts"]["lineage"][0]["time"] = "yesterday"

    for edit, what in ((pixel, "SHA-256"), (parent_id, "parent id"), (kept, "kept"), (added, "last parts"),
                       (time, "ISO 8601")):
        with pytest.raises(ModelFileError, match=what):
            DinoPatch.load(_edited(child, tmp_path, edit))


def test_update_on_the_command_line(parts, parent, tmp_path, capsys):
    import cv2

    from dinopatch.cli import main

    files = []
    for i, im in enumerate(parts[0][20:22]):
        files.append(tmp_path / f"new{i}.png")
        cv2.imwrite(str(files[-1]), im)
    out = tmp_path / "child.npz"
    assert main(["update", "-m", str(parent), *map(str, files), "-o", str(out)]) == 0
    assert "updated with 2 good parts" in capsys.readouterr().out
    (entry,) = DinoPatch.load(out).model_.good.lineage
    assert entry["sha256"] == [part_hash(cv2.imread(str(f))) for f in files]
    assert main(["update", "-m", str(parent), str(files[0]), "-o", str(parent), "--force"]) == 2  # not the input


def test_with_a_coreset_the_bank_keeps_its_ratio_of_the_union(parts):
    good, _ = parts
    det = DinoPatch(**FAST, coreset_ratio=0.25, outliers="keep").fit(good[:6]).update(good[6:8])
    assert det.model_.bank.features.shape[1] == 2  # ceil(0.25 * 8) rows per location, not 2 + 1 appended
    assert det.model_.good.lineage[0]["parent"] == "unsaved"  # updated before it was ever saved


def test_a_model_without_its_parts_cannot_be_updated_and_says_so(parts, parent, tmp_path):
    def lacks(header, arrays):
        del header["good_parts"], arrays["good_pixels"]

    def before_update(header, arrays):
        lacks(header, arrays)
        del header["params"]["keep_parts"]

    with pytest.raises(ModelFileError, match="lacks good parts"):
        DinoPatch.load(_edited(parent, tmp_path, lacks))
    small = DinoPatch(**FAST, keep_parts=False).fit(parts[0][:3]).save(tmp_path / "small.npz")
    for det in (DinoPatch.load(_edited(parent, tmp_path, before_update)), DinoPatch.load(small)):
        assert det.keep_parts is False and det.model_.good is None
        with pytest.raises(ValueError, match="keeps no good parts"):
            det.update(parts[0][20:21])
