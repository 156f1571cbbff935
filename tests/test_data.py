"""Readers, the MVTec folder layout and the synthetic parts."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from dinopatch.data import MVTecFolder, as_image, load_images, read_image, read_mask
from dinopatch.synthetic import CATEGORIES, DEFECTS, make_sample, render_screw, synthesize


def test_as_image_coercions():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert as_image(gray) is gray  # no copy when already uint8 contiguous
    np.testing.assert_array_equal(as_image(gray[..., None]), gray)
    bgra = np.dstack([gray, gray, gray, np.full_like(gray, 7)])
    np.testing.assert_array_equal(as_image(bgra), bgra[..., :3])
    np.testing.assert_array_equal(as_image(gray.astype(np.uint16) << 8), gray)
    np.testing.assert_array_equal(as_image(np.array([[True, False]])), [[255, 0]])
    np.testing.assert_array_equal(as_image(np.array([[0.0, 0.5, 1.0]])), [[0, 128, 255]])
    np.testing.assert_array_equal(as_image(np.array([[-3.0, 17.0, 300.0]])), [[0, 17, 255]])
    strided = np.zeros((4, 6), np.uint8)[:, ::2]
    assert as_image(strided).flags.c_contiguous


@pytest.mark.parametrize("bad, error, match", [
    (np.array([[0.0, np.nan]]), ValueError, "NaN"),
    (np.array([[np.inf]], np.float32), ValueError, "NaN or inf"),
    (np.zeros((0, 0), np.uint8), ValueError, "empty"),
    (np.zeros((5, 0, 3), np.uint8), ValueError, "empty"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, r"\(4, 4, 2\)"),
    (np.zeros(5, np.uint8), ValueError, r"\(5,\)"),
    (np.zeros((2, 4, 4, 3), np.uint8), ValueError, "shape"),
    (None, TypeError, "NoneType"),
    ([[1, 2]], TypeError, "list"),
])
def test_as_image_rejects(bad, error, match):
    with pytest.raises(error, match=match):
        as_image(bad)


def test_read_image_and_mask(tmp_path):
    im = np.random.default_rng(0).integers(0, 256, (10, 12, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), im)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), im)
    cv2.imwrite(str(tmp_path / "g.png"), im[..., 0])
    assert read_image(str(tmp_path / "g.png")).shape == (10, 12)
    cv2.imwrite(str(tmp_path / "deep.png"), im.astype(np.uint16) << 8)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), im)
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        read_image(tmp_path / "junk.png")

    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 2:4] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", (4, 6)), mask > 0)
    big = read_mask(tmp_path / "m.png", (8, 12))
    assert big.dtype == bool and big.shape == (8, 12) and big.sum() == 4 * (mask > 0).sum()
    with pytest.raises(FileNotFoundError):
        read_mask(tmp_path / "nothing.png", (4, 6))


def test_load_images(tmp_path):
    im = np.zeros((5, 5, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), im)
    out = load_images([im, tmp_path / "a.png", str(tmp_path / "a.png"), np.ones((5, 5), bool)])
    assert [o.shape for o in out] == [(5, 5, 3)] * 3 + [(5, 5)]
    assert len(load_images(x for x in [im])) == 1
    for single in (im, str(tmp_path / "a.png"), tmp_path / "a.png"):
        with pytest.raises(TypeError, match="list"):
            load_images(single)
    with pytest.raises(TypeError, match="image 1"):
        load_images([im, 3])
    with pytest.raises(TypeError):
        load_images(None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthesize("screw", tmp_path_factory.mktemp("screw"), n_train=3, n_test_good=2, n_test_defect=1, size=64)


def test_mvtec_folder(tiny):
    folder = MVTecFolder(tiny)
    assert folder.root == Path(tiny)
    assert [p.name for p in folder.train_paths()] == ["000.png", "001.png", "002.png"]
    items = folder.test_items()
    assert [it.defect for it in items] == ["good", "good"] + sorted(DEFECTS["screw"])
    assert [it.label for it in items] == [0, 0, 1, 1, 1, 1]
    assert all(it.mask_path is None for it in items[:2])
    for it in items[2:]:
        assert it.mask_path == tiny / "ground_truth" / it.defect / "000_mask.png"
        assert read_mask(it.mask_path, (64, 64)).any()
    assert read_image(items[0].path).shape == (64, 64, 3)


def test_mvtec_folder_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MVTecFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="train"):
        MVTecFolder(tmp_path).train_paths()
    assert MVTecFolder(tmp_path).test_items() == []
    (tiny / "ground_truth" / "bent_thread" / "000_mask.png").unlink()
    bent = [it for it in MVTecFolder(tiny).test_items() if it.defect == "bent_thread"]
    assert bent[0].label == 1 and bent[0].mask_path is None


def test_synthesize_is_seeded(tmp_path):
    def files(seed, name):
        root = synthesize("pasta", tmp_path / name, n_train=2, n_test_good=1, n_test_defect=1, size=64, seed=seed)
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    a, b, c = files(0, "a"), files(0, "b"), files(1, "c")
    assert len(a) == 2 + 1 + 2 * len(DEFECTS["pasta"])
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


@pytest.mark.parametrize("category", CATEGORIES)
def test_samples_and_masks(category):
    rng = np.random.default_rng(0)
    im, mask = make_sample(category, "good", rng, size=96)
    assert im.shape == (96, 96, 3) and im.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == np.uint8 and not mask.any()
    for defect in DEFECTS[category]:
        for seed in range(3):
            im, mask = make_sample(category, defect, np.random.default_rng(seed), size=96)
            assert im.shape == (96, 96, 3) and set(np.unique(mask)) == {0, 255}, (defect, seed)
    with pytest.raises(ValueError, match="choose from"):
        make_sample(category, "dent", rng)
    with pytest.raises(ValueError, match="category"):
        make_sample("bolt", "good", rng)


@pytest.mark.parametrize("category, defect", [(c, d) for c in CATEGORIES for d in DEFECTS[c]])
def test_mask_marks_what_changed(category, defect):
    # The same seed draws the same pose and look: only the defect differs.
    good, _ = make_sample(category, "good", np.random.default_rng(7), size=128)
    bad, mask = make_sample(category, defect, np.random.default_rng(7), size=128)
    changed = np.abs(good.astype(int) - bad.astype(int)).max(axis=2) > 30
    inside = mask > 0
    near = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0
    assert changed[inside].mean() > 0.5, "most mask pixels look different"
    assert changed[~near].mean() < 0.002, "nothing changes far from the mask"


def test_render_screw_at_a_given_pose():
    a, _ = render_screw(np.random.default_rng(0), 96, angle=30, scale=1.0, shift=(0, 0))
    b, _ = render_screw(np.random.default_rng(1), 96, angle=30, scale=1.0, shift=(0, 0))
    c, _ = render_screw(np.random.default_rng(0), 96, angle=120, scale=1.0, shift=(0, 0))
    part = lambda im: im.mean(axis=2) < 170  # noqa: E731  the screw is darker than the background
    assert (part(a) ^ part(b)).mean() < 0.01
    assert (part(a) ^ part(c)).mean() > 0.05


def test_too_small_to_draw():
    with pytest.raises(ValueError, match="size"):
        make_sample("screw", "good", np.random.default_rng(0), size=16)
