"""The pose of round and symmetric parts, and what the pose must not hide: size, ambiguity, other objects."""
import json
import re

import cv2
import numpy as np
import pytest

from dinopatch import benchmark_sets as bs
from dinopatch.align import Aligner
from dinopatch.pose import SIDE, PolarTemplate, Refiner, crop, pose_matrix
from dinopatch.synthetic import circle_points, fill_polygon, finish_image
from dinopatch.synthetic import pose_matrix as scene_pose

SCENE = 224
SIZE = 224


def wheel(rng, scale=1.0, plain=False, nut=None, angle=None):
    """A toothed wheel (bore, keyway, two holes) at a random rotation; its part -> input matrix.

    ``plain``: the teeth and the bore only, nothing that tells one tooth from the next.
    ``nut``: ``(x, y)`` of a nut lying in the image too.
    """
    angle = rng.uniform(0, 360) if angle is None else angle
    m = scene_pose(angle, scale * rng.uniform(0.995, 1.005) * SCENE, SCENE / 2 + rng.uniform(-0.04, 0.04, 2) * SCENE)
    img = np.full((SCENE, SCENE, 3), bs._BENCH, np.uint8)
    if plain:
        fill_polygon(img, m, bs._wheel_outline(), bs._BRASS, outline=bs._BRASS_EDGE)
        fill_polygon(img, m, circle_points(bs._BORE, 32), bs._BENCH, outline=bs._BRASS_EDGE)
    else:
        bs._draw_wheel(img, m)
    if nut is not None:
        bs._nut(img, np.asarray(nut, float), SCENE)
    return finish_image(img, np.random.default_rng(rng.integers(2**63)), 2.0, drift=0.05), m


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    return Aligner(size=SIZE).fit([wheel(rng)[0] for _ in range(10)])


def _turn(alignment, part_to_input):
    """Degrees the part's own frame is turned in the canonical frame (the same for every part when aligned)."""
    c = alignment.matrix[:, :2] @ part_to_input[:, :2]
    return float(np.degrees(np.arctan2(c[1, 0], c[0, 0])))


def test_round_part_is_turned_to_one_pose(fitted):
    rng = np.random.default_rng(1)
    scenes = [wheel(rng) for _ in range(10)]
    results = [fitted.transform(im)[2] for im, _ in scenes]
    assert all(al.trusted for al in results), [al.reason for al in results]
    turns = np.array([_turn(al, m) for al, (_, m) in zip(results, scenes)])
    spread = np.abs((turns - turns[0] + 180) % 360 - 180)
    assert spread.max() < 0.5, spread
    # The part's centre lands on the frame's centre within a pixel.
    centres = np.array([al.matrix @ [*m[:, 2], 1.0] for al, (_, m) in zip(results, scenes)])
    assert np.abs(centres - centres.mean(0)).max() < 1.0, centres
    assert all(al.peak_ratio > 1.05 and al.residual < 0.1 for al in results)
    assert fitted.fold_ == 1 and "no rotational symmetry" in fitted.symmetry()


@pytest.mark.parametrize("scale", [1.1, 0.9])
def test_wrong_size_is_not_trusted(fitted, scale):
    im, _ = wheel(np.random.default_rng(2), scale=scale)
    _, _, al = fitted.transform(im)
    assert not al.trusted
    said = re.search(r"part (\d\.\d\d)x the nominal length; nominal range 0\.97-1\.03", al.reason)
    assert said and float(said.group(1)) == pytest.approx(scale, abs=0.02), al.reason
    assert al.size == pytest.approx(scale, abs=0.02)


def test_size_tolerance_widens_the_range():
    rng = np.random.default_rng(3)
    aligner = Aligner(size=SIZE, size_tolerance=0.15).fit([wheel(rng)[0] for _ in range(6)])
    _, _, al = aligner.transform(wheel(rng, scale=1.1)[0])
    assert al.trusted, al.reason
    assert Aligner.from_state_dict(json.loads(json.dumps(aligner.state_dict()))).size_tolerance == 0.15


def test_object_in_a_corner_is_found_and_placed(fitted):
    rng = np.random.default_rng(4)
    im, _ = wheel(rng, nut=(0.9 * SCENE, 0.1 * SCENE))
    _, _, al = fitted.transform(im)
    assert not al.trusted and "an object away from the part near" in al.reason, al.reason
    where = al.outside_map(im.shape)
    assert where is not None and where.shape == im.shape[:2]
    ys, xs = np.nonzero(where)
    assert abs(xs.mean() - 0.9 * SCENE) < 6 and abs(ys.mean() - 0.1 * SCENE) < 6
    # The corner lies outside the canonical frame: the pose is found all the same.
    assert fitted.transform(wheel(np.random.default_rng(4))[0])[2].trusted


def test_ambiguous_pose_is_not_trusted(fitted):
    """Without its holes and keyway the wheel looks alike at every tooth: no pose may pass."""
    im, _ = wheel(np.random.default_rng(5), plain=True)
    _, _, al = fitted.transform(im)
    assert not al.trusted and "ambiguous pose" in al.reason, al.reason
    assert al.peak_ratio < fitted.ranges()["peak_ratio"]


def _plate(rng, holes=6):
    """A hexagonal plate with a ring of holes at a random rotation: 6-fold symmetric for 6 holes."""
    centre = SCENE / 2 + rng.uniform(-0.04, 0.04, 2) * SCENE
    m = scene_pose(rng.uniform(0, 360), SCENE * rng.uniform(0.99, 1.01), centre)
    img = np.full((SCENE, SCENE, 3), bs._BENCH, np.uint8)
    fill_polygon(img, m, circle_points(0.3, 6), bs._BRASS, outline=bs._BRASS_EDGE)
    for k in range(holes):
        t = np.radians(60 * k + 30)
        fill_polygon(img, m, circle_points(0.03, 16) + 0.17 * np.array([np.cos(t), np.sin(t)]), bs._BENCH,
                     outline=bs._BRASS_EDGE)
    return finish_image(img, np.random.default_rng(rng.integers(2**63)), 2.0, drift=0.05), m


def test_symmetric_part_is_compared_modulo_its_symmetry():
    rng = np.random.default_rng(6)
    aligner = Aligner(size=SIZE).fit([_plate(rng)[0] for _ in range(6)])
    assert aligner.fold_ == 6
    assert aligner.symmetry() == "symmetric under 6-fold rotation: poses compared modulo 60 degrees"
    scenes = [_plate(rng) for _ in range(6)]
    results = [aligner.transform(im)[2] for im, _ in scenes]
    assert all(al.trusted for al in results), [al.reason for al in results]
    turns = np.array([_turn(al, m) for al, (_, m) in zip(results, scenes)])
    assert (np.abs((turns - turns[0] + 30) % 60 - 30) < 0.5).all(), turns
    # One hole missing breaks the symmetry of that part: it does not match the template.
    lacking = Aligner(size=SIZE).fit([_plate(rng, holes=5)[0] for _ in range(6)])
    assert lacking.fold_ == 1


def test_polar_search_finds_a_known_turn():
    rng = np.random.default_rng(7)
    im, m = wheel(rng, angle=0.0)
    gray = cv2.cvtColor(im, cv2.COLOR_BGR2GRAY).astype(np.float32)
    centre = m[:, 2]
    template = crop(gray, _pose_matrix(centre, 0.0, False))
    polar = PolarTemplate(template)
    for turn in (0.0, 37.5, 200.25):
        turned = cv2.warpAffine(gray, cv2.getRotationMatrix2D(tuple(centre), -turn, 1.0), (SCENE, SCENE),
                                borderMode=cv2.BORDER_REPLICATE)
        pose = polar.search(crop(turned, _pose_matrix(centre, 0.0, False)), mirror=True)
        assert abs((pose.angle - turn + 180) % 360 - 180) < 0.3 and not pose.mirrored, (turn, pose)
        mirrored = cv2.flip(turned, 0)
        c = np.array([centre[0], SCENE - 1 - centre[1]])
        pose = polar.search(crop(mirrored, _pose_matrix(c, 0.0, False)), mirror=True)
        assert pose.mirrored, (turn, pose)



def test_float32_scores_are_a_float64_ffts(fitted):
    """The rotation scores, in float32 by OpenCV's DFT, are NumPy's float64 FFT of the same features to 1e-5, for
    the part and its mirror image, and the search's pose is the float64 scores' peak."""
    from dinopatch.align import _compose
    from dinopatch.outline import measure_part
    from dinopatch.pose import ANGLES, _correlate, _features, _spectrum

    def float64(f, t):  # out[k] = sum over rings and angles of f[:, theta + k] * t[:, theta]
        f, t = f.astype(np.float64), t.astype(np.float64)
        return np.fft.irfft((np.fft.rfft(f, axis=1) * np.conj(np.fft.rfft(t, axis=1))).sum(axis=0), n=ANGLES)

    rng = np.random.default_rng(11)
    t = _features(fitted.template_)
    for _ in range(4):
        part = measure_part(wheel(rng)[0], fitted.analysis_size)
        m = pose_matrix(part.centre, 0.0, fitted._scale(part, SIDE), False, SIDE)
        upright = crop(part.gray, _compose(m, part.to_input))
        f = _features(upright)
        for g in (f, np.roll(f[:, ::-1], 1, axis=1)):
            scores, reference = _correlate(g, _spectrum(t)), float64(g, t)
            assert scores.dtype == np.float64 and np.abs(scores - reference).max() < 1e-5
        reference = float64(f, t)
        k = int(np.argmax(reference))
        assert reference[k] > 0.5  # a clear peak, not a coin toss between two
        assert abs((fitted._polar.search(upright, mirror=False).angle - k + 180) % 360 - 180) < 0.5


def test_refiner_finds_a_known_small_turn_and_shift(fitted):
    template = fitted.template_
    c = (SIDE - 1) / 2
    refine = Refiner(template)
    for turn, shift in ((0.0, (0.0, 0.0)), (1.3, (0.6, -0.35)), (-2.5, (-3.0, 2.0))):
        moved = cv2.getRotationMatrix2D((c, c), turn, 1.0)
        moved[:, 2] += shift
        image = cv2.warpAffine(template, moved, (SIDE, SIDE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        back = refine(image)  # crop -> template: undoes the move
        rim = np.array([[c, c, 1.0], [c + 40, c, 1.0], [c, c - 40, 1.0]])
        landed = (np.vstack([back, [0, 0, 1]]) @ np.vstack([moved, [0, 0, 1]]))[:2] @ rim.T
        assert np.abs(landed - rim[:, :2].T).max() < 0.05, (turn, shift, landed - rim[:, :2].T)


def test_refiner_keeps_the_pose_it_cannot_refine(fitted):
    flat = np.full((SIDE, SIDE), 90.0, np.float32)
    assert np.array_equal(Refiner(fitted.template_)(flat), np.eye(2, 3))
    assert np.array_equal(Refiner(flat)(fitted.template_), np.eye(2, 3))
    # A crop further off than a coarse pose can be: the refinement is not trusted to have found it.
    far = cv2.warpAffine(fitted.template_, np.float64([[1, 0, 20], [0, 1, 0]]), (SIDE, SIDE),
                         borderMode=cv2.BORDER_REPLICATE)
    assert np.array_equal(Refiner(fitted.template_)(far), np.eye(2, 3))

def _pose_matrix(centre, angle, mirrored):
    return pose_matrix(centre, angle, SIDE / SCENE, mirrored, SIDE)


def test_state_round_trip_and_checks(fitted):
    state = json.loads(json.dumps(fitted.state_dict()))
    restored = Aligner.from_state_dict(state)
    im = wheel(np.random.default_rng(8))[0]
    a, b = fitted.transform(im)[2], restored.transform(im)[2]
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert restored.ranges() == pytest.approx(fitted.ranges())
    with pytest.raises(ValueError, match="older DinoPatch"):
        Aligner.from_state_dict(dict(state, version=3))
    with pytest.raises(ValueError, match="6-fold|1-fold|says"):
        Aligner.from_state_dict(dict(state, fold=6))
    with pytest.raises(ValueError, match="evidence"):
        Aligner.from_state_dict(dict(state, evidence=dict(state["evidence"], size=[float("nan")])))
    with pytest.raises(ValueError, match="evidence"):
        Aligner.from_state_dict(dict(state, evidence=dict(state["evidence"], residual=[0.1])))
    with pytest.raises(ValueError, match="template"):
        Aligner.from_state_dict(dict(state, template=[[0.0]]))
    with pytest.raises(ValueError, match="size_tolerance"):
        Aligner.from_state_dict(dict(state, size_tolerance=-1))


def test_fit_reports_the_pose_it_learned():
    rng = np.random.default_rng(9)
    images = [wheel(rng)[0] for _ in range(8)]
    images[3] = wheel(rng, scale=1.15)[0]  # one odd good image: named, and the range does not follow it
    images.append(np.full((SCENE, SCENE, 3), 200, np.uint8))
    aligner = Aligner(size=SIZE).fit(images)
    report = aligner.report_
    assert set(report["doubtful"]) == {3, 8}, report["doubtful"]
    assert "1.1" in report["doubtful"][3] and "no part" in report["doubtful"][8]
    assert report["ranges"]["size"][1] < 1.05
    assert report["mean_part"].shape == report["misalignment"].shape == (SIDE, SIDE)
    assert report["fold"] == 1 and report["symmetry"] == aligner.symmetry()
    # Aligned good parts agree with the mean part: a small fraction of its contrast on average.
    assert float(report["misalignment"].mean()) < 0.2, float(report["misalignment"].mean())
    lo, hi = report["ranges"]["size"]
    text = aligner.describe([f"im{i}" for i in range(len(images))]).splitlines()
    assert text[0] == f"pose: {aligner.symmetry()}; size {lo:.2f}-{hi:.2f} of the good parts' median; " \
                      "2 good images doubtful"
    assert text[1].startswith("  im3: part 1.1") and text[2].startswith("  im8: no part"), text
    # The region's copy pads otherwise and keeps the report; a loaded aligner has none to tell.
    padded = aligner.padded("background")
    assert padded.padding == "background" and padded.report_ is report
    assert Aligner.from_state_dict(aligner.state_dict()).describe() == ""


def test_detector_flags_what_the_pose_hides():
    """A wrong-size wheel and a nut in a corner: is_anomaly, aligned=False, the reason in the record,
    and the nut's place in the anomaly map and mask."""
    from conftest import FAST

    from dinopatch import DinoPatch
    from dinopatch.records import result_record

    rng = np.random.default_rng(10)
    det = DinoPatch(**FAST).fit([wheel(rng)[0] for _ in range(6)])
    big, _ = wheel(rng, scale=1.1)
    nut, _ = wheel(rng, nut=(0.1 * SCENE, 0.9 * SCENE))
    good, _ = wheel(rng)
    r_big, r_nut, r_good = det.predict([big, nut, good])
    assert r_good.aligned and not r_good.is_anomaly, r_good.alignment.reason
    for r in (r_big, r_nut):
        assert r.is_anomaly and not r.aligned
    assert "nominal length" in result_record(r_big, det)["reason"]
    assert "object away from the part" in result_record(r_nut, det)["reason"]
    corner = np.zeros((SCENE, SCENE), bool)
    corner[int(0.8 * SCENE):, :int(0.2 * SCENE)] = True
    assert r_nut.mask[corner].any() and r_nut.anomaly_map[corner].max() == r_nut.anomaly_map.max()
    assert r_nut.score > r_nut.threshold


def test_size_tolerance_is_a_detector_parameter_kept_in_the_model_file(tmp_path):
    from conftest import FAST

    from dinopatch import DinoPatch

    with pytest.raises(ValueError, match="size_tolerance"):
        DinoPatch(**FAST, size_tolerance=1.5).fit([wheel(np.random.default_rng(0))[0]])
    rng = np.random.default_rng(11)
    det = DinoPatch(**FAST, size_tolerance=0.15).fit([wheel(rng)[0] for _ in range(4)])
    loaded = DinoPatch.load(det.save(tmp_path / "wheel.npz"))
    assert loaded.size_tolerance == 0.15 and loaded._model.aligner.size_tolerance == 0.15
    big = wheel(rng, scale=1.1)[0]
    assert loaded.predict([big])[0].aligned  # within the widened range
