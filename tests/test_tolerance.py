"""The tolerance map: per-location offsets of held-out good patches, and the radius each location gets."""
import numpy as np
import pytest

from dinopatch import tolerance


def _counts(offsets: np.ndarray) -> np.ndarray:
    """Counts ``[L, 3]`` from per-image offsets ``[N, h, w]``."""
    flat = offsets.reshape(len(offsets), -1)
    return np.stack([(flat == r).sum(0) for r in tolerance.RADII], axis=1)


def test_still_parts_get_zero_and_a_wobbling_line_keeps_its_radius():
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
