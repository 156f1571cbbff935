"""The tolerance map: per-location offsets of held-out good patches, and the tolerance each location gets."""
import numpy as np
import pytest
from conftest import FAST
from test_autotune import _pattern

from dinopatch import DinoPatch, autotune, modelfile, tolerance
from dinopatch.modelfile import ModelFileError
from dinopatch.viz import TOLERANCE_COLOURS, tolerance_picture


def _counts(offsets: np.ndarray) -> np.ndarray:
    """Counts ``[L, 3]`` from per-image offsets ``[N, h, w]``."""
    flat = offsets.reshape(len(offsets), -1)
    return np.stack([(flat == r).sum(0) for r in tolerance.STEPS], axis=1)


def test_still_parts_get_zero_and_a_wobbling_line_keeps_its_tolerance():
    offsets = np.zeros((20, 5, 6), int)
    offsets[:12, 2, :] = 1  # a thin feature along row 2 wobbles by one step in 12 of 20 parts
    offsets[:3, 4, 5] = 2  # one noisy location in a corner
    tmap = tolerance.tolerance_map(_counts(offsets), (5, 6)).reshape(5, 6)
    assert tmap.dtype == np.int8
    assert (tmap[2] == 1).all() and tmap[4, 5] == 0 and (np.delete(tmap, 2, axis=0) == 0).all()
    assert tolerance.differs(tmap.ravel(), _counts(offsets))


def test_a_small_share_displaced_does_not_widen_and_neighbours_widen_together():
    offsets = np.zeros((40, 4, 4), int)
    offsets[:2, 1, 1] = 2  # 2 of 40 (5%): within the share
    offsets[:10, 2, 2] = offsets[:10, 2, 3] = 2  # two neighbours at 25%: both keep 2
    tmap = tolerance.tolerance_map(_counts(offsets), (4, 4)).reshape(4, 4)
    assert tmap[1, 1] == 0 and tmap[2, 2] == tmap[2, 3] == 2 and tmap.sum() == 4
    assert (tolerance.tolerance_map(_counts(offsets), (4, 4), largest=1) <= 1).all()
    uniform = np.zeros((10, 3, 3), int)
    assert not tolerance.differs(tolerance.tolerance_map(_counts(uniform), (3, 3)), _counts(uniform))


def test_locations_without_evidence_get_zero_and_count_for_nothing():
    counts = np.zeros((9, 3), np.int64)
    counts[[0, 1, 3, 4]] = [0, 0, 7]  # a region of four locations, all displaced by 2
    tmap = tolerance.tolerance_map(counts, (3, 3))
    assert list(tmap) == [2, 2, 0, 2, 2, 0, 0, 0, 0]
    assert tolerance.check_offsets(counts, (3, 3), positions=[0, 1, 3, 4]) is not None
    assert tolerance.differs(tmap, counts) is False


def test_offsets_measured_on_tokens_find_the_wobbling_row():
    """Row 3 is a strip of a longer pattern that lies one step further along in each third of the parts:
    a held-out part finds its row 3 one step away in the others, every other row in place."""
    rng = np.random.default_rng(0)
    n, h, w, d = 9, 6, 7, 16
    base = rng.standard_normal((h, w, d)).astype(np.float32)
    strip = rng.standard_normal((w + 2, d)).astype(np.float32)
    tokens = np.repeat(base[None], n, axis=0) + 0.01 * rng.standard_normal((n, h, w, d)).astype(np.float32)
    shift = np.arange(n) % 3
    for i in range(n):
        tokens[i, 3] = strip[shift[i]:shift[i] + w] + 0.01 * rng.standard_normal((w, d)).astype(np.float32)
    folds = [np.flatnonzero(shift == s) for s in range(3)]  # no part is held out beside one at its own place
    counts = tolerance.offset_counts(tokens, folds)
    assert counts.shape == (h * w, 3) and (counts.sum(1) == n).all()
    tmap = tolerance.tolerance_map(counts, (h, w)).reshape(h, w)
    assert (tmap[3, 1:-1] >= 1).all() and (np.delete(tmap, 3, axis=0) == 0).all(), tmap
    np.testing.assert_allclose(tolerance.shares(counts), counts.sum(0) / counts.sum())


@pytest.mark.parametrize("bad", [
    np.zeros((9, 2), np.int64),  # wrong shape
    np.full((9, 3), 1.0),  # not integers
    np.array([[-1, 2, 1]] * 9),  # negative
    np.array([[1, 0, 0]] * 8 + [[2, 0, 0]]),  # one location counts another number of images
    np.zeros((9, 3), np.int64),  # no evidence at all
])
def test_check_offsets_refuses_inconsistent_evidence(bad):
    with pytest.raises(ValueError, match="tolerance offsets"):
        tolerance.check_offsets(bad, (3, 3))
    counts = np.zeros((9, 3), np.int64)
    counts[[0, 1]] = [3, 0, 0]
    with pytest.raises(ValueError, match="tolerance offsets"):  # counts outside the region
        tolerance.check_offsets(counts, (3, 3), positions=[0])


# -- end to end: fit, the auto candidate, the model file (blocks-matter weights, 112 px) ---------------------


def _band_parts(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    """A fixed part whose top band (two token rows at 112 px) slides sideways by up to 40 px of 200."""
    rng, base, out = np.random.default_rng(seed), _pattern(), []
    for _ in range(n):
        im = np.clip(base.astype(np.int16) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
        im[:50] = np.roll(im[:50], int(rng.integers(-40, 41)), axis=1)
        out.append(im)
    return out


@pytest.fixture(scope="module")
def band_fits():
    images = _band_parts()
    return {mode: DinoPatch(**dict(FAST, align=False, tolerance=mode)).fit(images) for mode in ("map", "auto")}


def test_map_fit_scores_with_the_map_of_its_evidence(band_fits):
    model = band_fits["map"].model_
    tmap = tolerance.tolerance_map(model.offsets, (8, 8), 7)
    assert model.auto is None and model.bank.tolerance.dtype == np.int8
    np.testing.assert_array_equal(model.bank.tolerance, tmap)
    assert tmap.reshape(8, 8)[:2].min() >= 1 and (tmap.reshape(8, 8)[3:] == 0).all()  # the sliding band only


def test_auto_has_the_map_as_a_candidate_where_offsets_differ(band_fits):
    det = band_fits["auto"]
    table, chosen = det.auto_["evidence"]["image_auroc"], det.auto_["chosen"]["tolerance"]
    assert any(k.startswith("tolerance=map ") for k in table)
    tried = list(dict.fromkeys(k.split()[0] for k in table))
    assert tried[:2] == ["tolerance=0", "tolerance=map"]  # most patches stay put: the map must beat 0 to replace it
    steps = det.model_.bank.tolerance
    assert (isinstance(steps, np.ndarray) if chosen == "map" else steps == chosen)


def test_search_starts_at_the_offset_half_the_patches_need():
    band = np.tile([[5, 0, 0]], (64, 1))
    band[:16] = [0, 3, 2]
    moved = autotune.tolerance_steps([0.1406, 0.5495, 0.3099], np.tile([[1, 4, 2]], (64, 1)), 8)
    assert moved == [1, 0, 2]  # a part moved as a whole: one step is where the search starts, not a challenger
    texture = autotune.tolerance_steps([0.82, 0.144, 0.036], band, 8)
    assert texture == [0, "map", 1]  # neighbours a little closer on 18% of patches: the widening must win


def test_a_map_without_differences_is_no_candidate():
    assert not autotune._map_differs(np.tile([[5, 0, 0]], (64, 1)), 8)
    steps = autotune.tolerance_steps([0.5, 0.5, 0.0], np.tile([[5, 5, 0]], (64, 1)), 8)
    assert steps == [0, 1]


@pytest.mark.parametrize("mode", ["map", "auto"])
def test_map_survives_save_and_load(band_fits, tmp_path, mode):
    det = band_fits[mode]
    loaded = DinoPatch.load(det.save(tmp_path / f"{mode}.npz"))
    np.testing.assert_array_equal(loaded.model_.offsets, det.model_.offsets)
    steps = det.model_.bank.tolerance
    np.testing.assert_array_equal(loaded.model_.bank.tolerance, steps)
    images = _band_parts(2, seed=9)
    np.testing.assert_allclose([r.score for r in loaded.predict(images)], [r.score for r in det.predict(images)],
                               rtol=1e-6)


def _edit_arrays(det, tmp_path, edit):
    header, arrays = modelfile.read(det.save(tmp_path / "base.npz"))
    header = {k: v for k, v in header.items() if k not in ("format", "version", "arrays")}
    edit(arrays)
    return modelfile.write(tmp_path / "edited.npz", header, arrays)


def _widen(arrays):
    arrays["tolerance_map"] = np.where(arrays["tolerance_map"] == 0, 1, arrays["tolerance_map"]).astype(np.uint8)


def _move_evidence(arrays):
    c = arrays["tolerance_offsets"].copy()
    c[:, 0] += c[:, 1] + c[:, 2]
    c[:, 1:] = 0  # every patch "found in place": the map of this evidence is all zeros
    arrays["tolerance_offsets"] = c


@pytest.mark.parametrize("edit, message", [
    (_widen, "disagrees with its evidence"),
    (_move_evidence, "disagrees with its evidence"),
    (lambda a: a.pop("tolerance_map"), "without its map"),
    (lambda a: a.pop("tolerance_offsets"), "without its map or its evidence"),
    (lambda a: a.update(tolerance_map=np.full(63, 1, np.uint8)), "is not 64 values"),
    (lambda a: a.update(tolerance_map=np.full(64, 3, np.uint8)), "is not 64 values"),
    (lambda a: a.update(tolerance_offsets=a["tolerance_offsets"][:, :2].copy()), "tolerance offsets"),
])
def test_edited_map_or_evidence_is_refused(band_fits, tmp_path, edit, message):
    with pytest.raises(ModelFileError, match=message):
        DinoPatch.load(_edit_arrays(band_fits["map"], tmp_path, edit))


def test_auto_record_is_checked_against_the_offsets(band_fits, tmp_path):
    with pytest.raises(ModelFileError, match="offset shares disagree|search"):
        DinoPatch.load(_edit_arrays(band_fits["auto"], tmp_path, _move_evidence))
    with pytest.raises(ModelFileError, match="search"):  # the map candidate's evidence dropped
        DinoPatch.load(_edit_arrays(band_fits["auto"], tmp_path, lambda a: a.pop("tolerance_offsets")))


def test_picture_of_the_fitted_map(band_fits):
    tmap = band_fits["map"].model_.bank.tolerance
    pic = tolerance_picture(tmap, (8, 8), cell=10)
    assert pic.dtype == np.uint8 and pic.shape == (8 * 10 + 18, 80, 3)
    for l in (0, 63):  # a cell's corner pixel carries its tolerance's colour (the number sits in the middle)
        y, x = divmod(l, 8)
        assert tuple(pic[y * 10 + 1, x * 10 + 1]) == TOLERANCE_COLOURS[tmap[l]]
    assert tolerance_picture(tmap, (8, 8), image=np.zeros((112, 112), np.uint8)).shape[:2] == (8 * 20 + 20, 160)
    with pytest.raises(ValueError, match="64 tolerances"):
        tolerance_picture(np.full(64, 3), (8, 8))
