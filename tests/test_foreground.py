"""Foreground-only tokens: the backbone on a subset of patches, and the detector built on it.

The reference for a subset of patches is independent of the gather in
:meth:`TorchBackbone.forward_tensor`: timm's own forward with an attention
mask that hides the dropped patches from every query gives, at the kept
patches, what running only those patches gives.
"""
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import BLOCKS_MATTER  # noqa: E402

from dinopatch.backbone import TorchBackbone, check_positions, preprocess  # noqa: E402
from dinopatch.backbone.onnx_export import token_error  # noqa: E402

NAME, SIZE = "dinov2_vits14", 112  # an 8x8 grid


def _images(batch: int, seed: int = 1) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (batch, 12, 12, 3), dtype=np.uint8)
    return np.stack([cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for im in small])


@pytest.fixture(scope="module")
def reference() -> TorchBackbone:
    return TorchBackbone(NAME, BLOCKS_MATTER, SIZE, layers=2)


def _masked_reference(backbone: TorchBackbone, images: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Tokens at ``positions`` from timm's full forward, the other patches masked out as keys."""
    m = backbone.model
    x = torch.from_numpy(preprocess(images, SIZE, backbone.spec.mean, backbone.spec.std))
    n = m.num_prefix_tokens + 64
    keys = torch.zeros(n, dtype=torch.bool)
    keys[:m.num_prefix_tokens] = True
    keys[m.num_prefix_tokens + torch.from_numpy(positions)] = True
    with torch.inference_mode():
        feats = m.forward_intermediates(x, indices=backbone.layers, norm=True, output_fmt="NLC",
                                        intermediates_only=True, attn_mask=keys.expand(1, 1, n, n))
    return torch.stack(feats).mean(0)[:, positions].numpy()


POSITIONS = np.array([9, 10, 11, 17, 18, 19, 20, 27, 28, 36, 44, 45, 46, 54])


def test_torch_subset_matches_masked_attention(reference):
    x = _images(2)
    got = reference(x, POSITIONS)
    ref = _masked_reference(reference, x, POSITIONS)
    assert got.shape == (2, len(POSITIONS), 384)
    assert token_error(got, ref) <= 1e-5
    # The subset is not the full grid's tokens at those places: attention saw fewer patches.
    assert token_error(got, reference(x).reshape(2, 64, -1)[:, POSITIONS]) > 1e-2


def test_torch_every_position_is_the_full_path(reference):
    x = _images(2)
    np.testing.assert_array_equal(reference(x, np.arange(64)), reference(x).reshape(2, 64, -1))


@pytest.mark.parametrize("bad", [[], [3, 3], [5, 2], [-1, 4], [64], [[1, 2]], [1.0, 2.0]])
def test_bad_positions_are_refused(reference, bad):
    with pytest.raises(ValueError, match="positions"):
        reference(_images(1), np.array(bad))
    with pytest.raises(ValueError, match="positions"):
        check_positions(np.array(bad), (8, 8))


def test_onnx_subset_matches_torch(reference, tmp_path):
    pytest.importorskip("onnxruntime")
    from dinopatch.backbone import OnnxBackbone
    from dinopatch.backbone.onnx_export import export_backbone

    engine = OnnxBackbone(path=export_backbone(reference, tmp_path / "l2.onnx"), layers=2)
    x = _images(3)
    for positions in (POSITIONS, np.arange(64), np.array([63])):
        got, ref = engine(x, positions), reference(x, positions)
        assert got.shape == ref.shape == (3, len(positions), 384)
        assert token_error(got, ref) <= 1e-4
    assert token_error(engine(x), reference(x)) <= 1e-4  # the full grid, [B, h, w, D]
    with pytest.raises(ValueError, match="positions"):
        engine(x, np.array([64]))


# --- the region, the padding and the background check ------------------------------------------------

def test_region_is_the_dilated_union():
    from dinopatch.foreground import region

    a, b = np.zeros((112, 112), np.float32), np.zeros((112, 112), np.float32)
    a[20:24, 30:34] = 1  # patch (1, 2)
    b[60, 60] = 1        # patch (4, 4)
    cells = np.zeros((8, 8), bool)
    cells[0:3, 1:4] = cells[3:6, 3:6] = True   # each dilated by one patch
    np.testing.assert_array_equal(region([a, b], (8, 8), margin=1), np.flatnonzero(cells))
    # The aligner settles the half turn before the backbone: no twin on the other side.
    np.testing.assert_array_equal(region([a], (8, 8), margin=0), [1 * 8 + 2])


def test_background_padding_pastes_no_part_into_the_frame():
    from dinopatch.align import Aligner
    from dinopatch.synthetic import render_screw

    rng = np.random.default_rng(0)
    nominal = [render_screw(rng, 256)[0] for _ in range(6)]
    # The part near the photo's edge: the canonical frame reaches far beyond the photo.
    edge, _ = render_screw(rng, 256, angle=0.0, scale=1.0, shift=(0, 95))
    dark = {}
    for padding in ("reflect", "background"):
        al = Aligner(size=224, padding=padding).fit(nominal)
        canon, valid, alignment = al.transform(edge)
        assert alignment.trusted and (valid == 0).mean() > 0.1
        gray = canon.mean(axis=2)[valid == 0]
        dark[padding] = (gray < 160).mean()  # steel is below 160, the background about 212
    assert dark["reflect"] > 0.02 and dark["background"] == 0.0


def test_silhouette_lies_on_the_part_in_the_canonical_frame():
    from dinopatch.align import Aligner
    from dinopatch.synthetic import render_screw

    rng = np.random.default_rng(1)
    al = Aligner(size=224).fit([render_screw(rng, 256)[0] for _ in range(6)])
    image, _ = render_screw(rng, 256)
    canon, _, _ = al.transform(image)
    sil = al.silhouette(image) > 0.5
    steel = canon.mean(axis=2) < 170
    assert (steel & sil).sum() > 0.9 * steel.sum()  # the part's pixels are inside its silhouette
    assert sil.mean() < 0.3
    assert al.silhouette(np.full((64, 64, 3), 200, np.uint8)) is None  # no part, nothing to place


def test_patch_stats_judge_each_patch_against_the_lights_plane(rng):
    from dinopatch.foreground import patch_stats

    yy, xx = np.mgrid[0:84, 0:84] / 84.0  # 6 x 6 patches of 14 px
    frames, valid = [], np.ones((2, 84, 84), np.float32)
    for gain, slope in ((1.0, (40.0, 20.0)), (1.2, (-30.0, 50.0))):  # the light differs from part to part
        im = gain * (110 + slope[0] * xx + slope[1] * yy) + rng.normal(0, 2, (84, 84))
        im[28:42, 14:28] = 30  # an object on one patch
        frames.append(np.repeat(np.clip(np.rint(im), 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    valid[1, :, 70:] = 0  # the second frame is padding in its last column of patches (and a pixel of the next)
    valid[1, :, 69] = 0
    got = patch_stats(np.stack(frames), valid, (6, 6)).reshape(2, 6, 6, 4)
    assert np.isnan(got[1, :, 4:]).all() and np.isfinite(got[0]).all() and np.isfinite(got[1, :, :4]).all()
    for g in got:
        back = np.ones((6, 6), bool)
        back[2, 1] = False
        means = g[:, :4, :3][back[:, :4]]
        assert np.abs(means).max() < 1.5  # the light's plane, whatever its gain and slope, is not an object
        assert (g[2, 1, :3] < -60).all()  # the object is
    cells = np.stack(frames)[0, :, :, 0].reshape(6, 14, 6, 14).transpose(0, 2, 1, 3).reshape(6, 6, -1)
    np.testing.assert_allclose(got[0, ..., 3], cells.astype(np.float64).std(axis=2), atol=1e-2)  # the gray spread


def test_background_judges_each_location_by_the_parts_that_show_it():
    from dinopatch.foreground import FLOOR, Background

    stats = np.zeros((4, 3, 4), np.float32)
    stats[:, 0, 0] = [0, 10, 20, 30]
    stats[0, 1], stats[1:, 2] = np.nan, np.nan  # location 1: three parts show it; location 2: one does
    back = Background.fit(stats)
    assert back.mean[0, 0] == 15 and back.scale[0, 0] == pytest.approx(np.std([0, 10, 20, 30]))
    assert back.mean[1, 0] == 0 and back.scale[1, 0] == FLOOR and np.isnan(back.mean[2]).all()
    query = np.zeros((2, 3, 4), np.float32)
    query[0, 0, 0], query[0, 1:] = 50, 50
    query[1, 0] = np.nan  # a padded patch in the part judged
    z = back.z(query)
    assert z[0, 0] == pytest.approx(35 / np.std([0, 10, 20, 30])) and z[0, 1] == 25.0 and z[0, 2] == 0
    assert z[1, 0] == 0


@pytest.mark.parametrize("kernel", ["numpy", "numba", "cpp", "cuda"])
@pytest.mark.parametrize("tolerance", [0, 1, 2])
def test_bank_on_a_region_clips_the_tolerance_to_kept_locations(rng, kernel, tolerance):
    from dinopatch import kernels
    from dinopatch.bank import MemoryBank

    if kernel not in kernels.available():
        pytest.skip(f"{kernel} is not built here")
    positions = np.array([3, 8, 9, 10, 16, 17, 24, 25, 26, 31, 32, 33, 38])
    tokens = rng.standard_normal((5, 6, 7, 16)).astype(np.float32)
    queries = rng.standard_normal((3, 6, 7, 16)).astype(np.float32)
    queries[0, 2, 3] = tokens[1, 2, 3]  # an exact match
    bank = MemoryBank.fit(tokens, tolerance=tolerance, positions=positions)
    got = bank.distances(queries, kernel=kernel).reshape(3, -1)
    # A copy (as Ray and joblib make) pads and uploads its own bank.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(bank)).distances(queries, kernel=kernel).reshape(3, -1),
                                  got)
    flat_t, flat_q = tokens.reshape(5, 42, 16), queries.reshape(3, 42, 16)
    kept = set(positions.tolist())
    for l in range(42):
        if l not in kept:
            assert np.isnan(got[:, l]).all()
            continue
        y, x = divmod(l, 7)
        near = [m for m in kept if abs(m // 7 - y) <= tolerance and abs(m % 7 - x) <= tolerance]
        rows = flat_t[:, near].reshape(-1, 16).astype(np.float64)
        want = np.sqrt(((flat_q[:, l, None] - rows[None]) ** 2).sum(-1)).min(1)
        np.testing.assert_allclose(got[:, l], want, rtol=1e-5, atol=1e-4)
    assert got[0, 2 * 7 + 3] <= 1e-3
    with pytest.raises(ValueError, match="read-only"):
        bank.positions[0] = 4  # the padded grid and the device copy were made from it
    with pytest.raises(AttributeError):
        bank.positions = positions[1:]
    positions[0] = 4  # the caller's own array stays writable, and the bank's is a copy
    assert bank.positions[0] == 3


# --- the detector on foreground tokens ------------------------------------------------------------------

@pytest.fixture(scope="module")
def fg_detector():
    """Foreground tokens at 224 px (a 16x16 grid: the region leaves background to drop)."""
    from conftest import FAST, screws

    from dinopatch import DinoPatch

    return DinoPatch(**dict(FAST, image_size=224, foreground=True)).fit(screws("good", 8, seed=1))


def test_detector_runs_on_the_region_and_sees_an_object_beside_the_part(fg_detector):
    import cv2
    from conftest import screws

    fg = fg_detector.model_.foreground
    assert 0.1 < fg.fraction < 0.9 and fg_detector.model_.aligner.padding == "background"
    assert fg_detector.model_.bank.features.shape[0] == len(fg.positions)
    clean = screws("good", 3, seed=2)
    litter = [cv2.circle(im.copy(), (28, 28), 9, (60, 60, 60), -1) for im in clean]  # a dark nut in a corner
    raws = fg_detector.patch_distances(clean + litter)
    inside = np.zeros(256, bool)
    inside[fg.positions] = True
    for raw in raws[3:]:  # the worst location is outside the region: the background check found the object
        worst = np.argmax(np.where(np.isfinite(raw.distances), raw.distances, -1).ravel())
        assert not inside[worst]
    results = [fg_detector.result_from(r) for r in raws]
    assert all(not r.is_anomaly for r in results[:3]) and all(r.is_anomaly for r in results[3:])
    assert min(r.score for r in results[3:]) > 2 * max(r.score for r in results[:3])
    # Defects on the part itself are judged by the tokens of the region.
    bent = [fg_detector.result_from(r) for r in fg_detector.patch_distances(screws("bent_thread", 3, seed=3))]
    assert min(r.score for r in bent) > max(r.score for r in results[:3])


def test_model_file_keeps_the_region_and_onnx_scores_match_torch(fg_detector, tmp_path):
    pytest.importorskip("onnxruntime")
    from conftest import screws

    from dinopatch import DinoPatch

    images = screws("good", 2, seed=4) + screws("bent_thread", 2, seed=5)
    path = fg_detector.save(tmp_path / "fg.npz")
    loaded = DinoPatch.load(path)
    assert loaded.foreground is True
    np.testing.assert_array_equal(loaded.model_.foreground.positions, fg_detector.model_.foreground.positions)
    want = fg_detector.score_images(images)
    np.testing.assert_allclose(loaded.score_images(images), want, rtol=1e-6)
    onnx = DinoPatch.load(path, engine="onnx")
    np.testing.assert_allclose(onnx.score_images(images), want, rtol=1e-3)


def test_edited_region_is_refused(fg_detector, tmp_path):
    from dinopatch import DinoPatch, modelfile
    from dinopatch.modelfile import ModelFileError

    header, arrays = modelfile.read(fg_detector.save(tmp_path / "fg.npz"))
    stats, worst = arrays["background_stats"], arrays["background_worst"]
    for name, value, match in (("positions", arrays["positions"][1:], "positions"),
                               ("background_stats", stats * 1000, "outside what 8-bit images give"),
                               ("background_stats", stats * 1.5, "not what the part's pixels give"),
                               ("background_worst", worst * 1e-9, "not its distance to the bank's other parts")):
        edited = dict(arrays, **{name: value})
        path = modelfile.write(tmp_path / f"{name}.npz", {k: v for k, v in header.items() if k != "arrays"}, edited)
        with pytest.raises(ModelFileError, match=match):
            DinoPatch.load(path)


def test_foreground_option_is_checked():
    from conftest import FAST, screws

    from dinopatch import DinoPatch

    images = screws("good", 3, seed=1)
    with pytest.raises(ValueError, match="align=True"):
        DinoPatch(**dict(FAST, foreground=True, align=False)).fit(images)
    with pytest.raises(ValueError, match="foreground must be"):
        DinoPatch(**dict(FAST, foreground="yes")).fit(images)
    with pytest.raises(ValueError, match="at least 2"):
        DinoPatch(**dict(FAST, foreground=True, threshold=1.0)).fit(images[:1])


def test_auto_keeps_every_token_where_the_part_fills_the_frame(screw_detector):
    # At 112 px (an 8x8 grid) the dilated silhouette covers the frame: nothing to drop.
    assert screw_detector.foreground == "auto" and screw_detector.model_.foreground is None
    assert screw_detector.model_.aligner.padding == "reflect"


def test_cli_option_reaches_the_detector():
    import argparse

    from dinopatch import cli

    p = argparse.ArgumentParser()
    cli._add_detector_args(p)
    for flag, want in (("on", True), ("off", False), ("auto", "auto")):
        assert cli._new_detector(p.parse_args(["--foreground", flag])).foreground == want
