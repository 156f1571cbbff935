"""Alignment to a canonical pose, on a screw-like part rendered here at random poses."""
import json

import cv2
import numpy as np
import pytest

from dinopatch.align import Aligner, Alignment

SCENE = 320   # side of the rendered images
SIZE = 160    # side of the canonical frame
VARYING = 0.35  # size_tolerance: the renders' scale varies by 15% either way, as a camera's distance would
HEAD = (20.0, 0.0)  # head centre, part coordinates (x along the axis, y across)


def _part_layers(tab: bool):
    """Gray level and coverage of the part drawn head-left on a 200x80 canvas (4x supersampled)."""
    sup, w, h = 4, 200, 80
    gray = np.zeros((h * sup, w * sup), np.uint8)
    alpha = np.zeros_like(gray)

    def px(pts):
        return (np.array(pts, np.float64) * sup + [0, h * sup / 2]).round().astype(np.int32)

    shapes = [([(8, -26), (32, -26), (34, -22), (34, 22), (32, 26), (8, 26), (6, 22), (6, -22)], 70),  # head
              ([(34, -20), (42, -20), (42, 20), (34, 20)], 95),                                        # washer
              ([(42, -10), (160, -10), (160, 10), (42, 10)], 80),                                      # shank
              ([(160, -10), (190, 0), (160, 10)], 80)]                                                 # tip
    if tab:  # makes the outline differ from its mirror image
        shapes.append(([(12, 26), (24, 26), (24, 36), (12, 36)], 70))
    for pts, level in shapes:
        cv2.fillPoly(alpha, [px(pts)], 255)
        cv2.fillPoly(gray, [px(pts)], level)
    for x in range(46, 158, 8):  # slanted threads
        cv2.line(gray, tuple(px([(x, -10)])[0].tolist()), tuple(px([(x + 5, 10)])[0].tolist()), 40, 2 * sup)
    shrink = dict(dsize=(w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(gray, **shrink), cv2.resize(alpha, **shrink)


def render(rng, angle=None, scale=None, shift=None, tab=False, mirror=False, size=SCENE):
    """A BGR scene, the part's coverage [0, 1] and its head centre, at a random (or given) pose."""
    gray, alpha = _part_layers(tab)
    if mirror:
        gray, alpha = gray[::-1].copy(), alpha[::-1].copy()
    angle = rng.uniform(0, 360) if angle is None else angle
    scale = rng.uniform(0.85, 1.15) if scale is None else scale
    shift = rng.uniform(-0.1, 0.1, 2) * size if shift is None else np.asarray(shift, float)
    m = cv2.getRotationMatrix2D((100.0, 40.0), angle, scale * size / SCENE)
    m[:, 2] += size / 2 + shift - [100.0, 40.0]
    g = cv2.warpAffine(gray, m, (size, size)).astype(np.float32)
    a = cv2.warpAffine(alpha, m, (size, size)).astype(np.float32) / 255
    scene = 200 * (1 - a) + g * a + rng.normal(0, 4, a.shape)
    head = m @ [HEAD[0], 40 + HEAD[1], 1.0]
    return cv2.cvtColor(np.clip(scene, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR), a, head


def canonical_silhouette(alpha, alignment):
    return cv2.warpAffine(alpha, alignment.matrix, (SIZE, SIZE)) > 0.5


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(1)
    return Aligner(size=SIZE, size_tolerance=VARYING).fit([render(rng)[0] for _ in range(5)])


def test_random_poses_align(fitted):
    rng = np.random.default_rng(2)
    sils, head_left = [], []
    for _ in range(24):
        im, alpha, head = render(rng)
        canon, valid, al = fitted.transform(im)
        assert al.trusted, al.reason
        sils.append(canonical_silhouette(alpha, al))
        head_left.append((al.matrix @ [*head, 1.0])[0] < SIZE / 2)
    ious = [iou(a, b) for i, a in enumerate(sils) for b in sils[i + 1:]]
    print(f"silhouette IoU over all pairs: min {min(ious):.3f} mean {np.mean(ious):.3f}; "
          f"head on the left in {sum(head_left)}/24")
    assert min(ious) >= 0.9
    assert sum(head_left) >= 23
    # The part's length fills about `zoom` of the frame.
    lengths = [s.any(axis=0).sum() / SIZE for s in sils]
    assert np.allclose(lengths, fitted.zoom, atol=0.05), lengths


def test_outputs_and_diagnostics(fitted):
    rng = np.random.default_rng(3)
    im, alpha, _ = render(rng, angle=30.0, scale=1.0, shift=(0, 0))
    canon, valid, al = fitted.transform(im)
    assert canon.shape == (SIZE, SIZE, 3) and canon.dtype == np.uint8
    assert valid.shape == (SIZE, SIZE) and valid.dtype == np.float32
    assert isinstance(al, Alignment) and al.trusted and al.reason == ""
    assert al.matrix.shape == (2, 3)
    # getRotationMatrix2D turns counter-clockwise on screen: canonical +x (head to tip) is at -30 degrees.
    assert abs(al.angle - 330.0) < 2.0, al.angle
    m = cv2.moments(alpha)
    np.testing.assert_allclose(al.centre, [m["m10"] / m["m00"], m["m01"] / m["m00"]], atol=1.5)
    assert not al.flipped and not al.mirrored


def test_gray_and_bgr_inputs_agree(fitted):
    im, _, _ = render(np.random.default_rng(4))
    c_bgr, v_bgr, a_bgr = fitted.transform(im)
    c_gray, v_gray, a_gray = fitted.transform(im[..., 0])
    assert c_gray.shape == (SIZE, SIZE, 3) and a_gray.trusted
    np.testing.assert_allclose(a_gray.matrix, a_bgr.matrix)
    np.testing.assert_array_equal(c_gray, c_bgr)


def test_a_placement_warps_as_the_image_does(fitted):
    im, _, _ = render(np.random.default_rng(5))
    placed = fitted.place(im)
    for a, b in zip(fitted.transform(placed), fitted.transform(im)):
        np.testing.assert_array_equal(getattr(a, "matrix", a), getattr(b, "matrix", b))
    np.testing.assert_array_equal(fitted.silhouette(placed), fitted.silhouette(im))
    # One placement serves the aligner that pads with the background level too.
    padded = fitted.padded("background")
    np.testing.assert_array_equal(padded.transform(placed)[0], padded.transform(im)[0])
    off = Aligner(size=SIZE, enabled=False).fit([im])
    assert off.silhouette(off.place(im)) is None and off.place(im).part is None


def test_inverse_map_round_trip(fitted):
    im, alpha, _ = render(np.random.default_rng(5), shift=(25, -20))
    _, _, al = fitted.transform(im)
    # A map that is the part's canonical silhouette comes back onto the part.
    amap = canonical_silhouette(alpha, al).astype(np.float32)
    back = fitted.inverse_map(amap, al, im.shape)
    assert back.shape == im.shape[:2] and back.dtype == np.float32
    assert iou(back > 0.5, alpha > 0.5) > 0.9
    # A blob at the canonical centre lands on the part's centre.
    blob = np.zeros((SIZE, SIZE), np.float32)
    cv2.circle(blob, (SIZE // 2, SIZE // 2), 6, 1.0, -1)
    ys, xs = np.nonzero(fitted.inverse_map(blob, al, im.shape) > 0.5)
    np.testing.assert_allclose([xs.mean(), ys.mean()], al.centre, atol=1.5)


def test_valid_mask_marks_padding():
    rng = np.random.default_rng(6)
    aligner = Aligner(size=SIZE, size_tolerance=VARYING).fit([render(rng)[0] for _ in range(3)])
    im, _, _ = render(rng, angle=45.0, scale=0.9, shift=(70, 70))  # near the bottom-right corner, not cut
    canon, valid, al = aligner.transform(im)
    assert al.trusted, al.reason
    assert 0.05 < (valid == 0).mean() < 0.9
    assert set(np.unique(valid)) <= {0.0, 1.0}
    # Padding reflects the image: no black borders.
    assert canon[valid == 0].mean() > 150
    centred, valid_c, _ = aligner.transform(render(rng, shift=(0, 0))[0])
    assert valid_c.min() == 1.0



@pytest.mark.parametrize("shape, scale, angle", [((90, 120, 3), 0.9, 33.0), ((120, 150), 0.75, 0.0),
                                                 ((3, 3, 3), 40.0, 10.0), ((1, 600, 3), 0.5, 5.0),
                                                 ((300, 280, 3), 1.2, 20.0)])
def test_reflected_warp_is_opencvs(shape, scale, angle):
    """The reflect-padded frame is OpenCV's reflecting warp to a gray level, however far the frame leaves the
    image (or not at all: the last case), and the validity mask is the nearest pixel's."""
    from dinopatch.align import _warp
    from dinopatch.pose import pose_matrix

    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    h, w = shape[:2]
    m = pose_matrix(((w - 1) / 2 + 7, (h - 1) / 2 - 5), angle, scale, False, 96)
    canon, valid = _warp(image, m, 96)
    direct = cv2.warpAffine(image, m, (96, 96), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    assert canon.shape == direct.shape and np.abs(canon.astype(int) - direct).max() <= 1
    inside = cv2.warpAffine(np.ones((h, w), np.uint8), m, (96, 96), flags=cv2.INTER_NEAREST)
    assert np.array_equal(valid, inside) and valid.min() == (0.0 if h < 300 else 1.0)
    if image.ndim == 3:  # the colour frame (warped as BGRA) is each channel's own frame
        channels = [_warp(np.ascontiguousarray(image[..., c]), m, 96)[0] for c in range(3)]
        np.testing.assert_array_equal(canon, np.stack(channels, axis=2))

def test_validity_is_the_nearest_pixels():
    """The validity mask, filled row span by row span, is the nearest-neighbour warp of an all-ones image at any
    turn (quarter turns included, where a row runs along an image edge), scale, mirroring and offset; where a
    pixel centre falls exactly on the image's edge (half-pixel offsets), rounding may decide either way."""
    from dinopatch.align import _validity

    rng = np.random.default_rng(3)
    for i in range(300):
        size = int(rng.choice([37, 96, 224]))
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        angle = rng.integers(0, 4) * np.pi / 2 if i % 5 == 0 else rng.uniform(0, 2 * np.pi)
        scale, flip = float(np.exp(rng.uniform(-2, 3))), (-1.0 if i % 3 == 0 else 1.0)
        m = scale * np.array([[np.cos(angle), np.sin(angle), 0], [-flip * np.sin(angle), flip * np.cos(angle), 0]])
        m[:, 2] = size / 2 - m[:, :2] @ [w / 2 + rng.normal() * w / 2, h / 2 + rng.normal() * h / 2]
        if i % 4 == 0:
            m = np.round(m * 2) / 2
        inv = cv2.invertAffineTransform(m)
        nearest = cv2.warpAffine(np.ones((h, w), np.uint8), m, (size, size), flags=cv2.INTER_NEAREST)
        ys, xs = np.nonzero(_validity(inv, h, w, size) != nearest)
        source = inv @ np.stack([xs, ys, np.ones_like(xs)])
        edge = np.abs(np.abs(source - [[(w - 1) / 2], [(h - 1) / 2]]) - [[w / 2], [h / 2]]).min(axis=0)
        assert (edge < 1e-9).all(), (i, len(xs), edge.max(initial=0))
        if i % 4:
            assert len(xs) == 0, (i, len(xs))


def test_resolution_does_not_matter(fitted):
    im, _, _ = render(np.random.default_rng(12))
    _, _, ref = fitted.transform(im)
    for side in (101, 2000):
        _, _, al = fitted.transform(cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA))
        assert al.trusted, al.reason
        assert abs((al.angle - ref.angle + 180) % 360 - 180) < 3
        assert al.scale * side == pytest.approx(ref.scale * SCENE, rel=0.05)


def test_disabled_is_a_plain_resize():
    aligner = Aligner(size=SIZE, enabled=False).fit([np.zeros((50, 70), np.uint8)])
    im = np.random.default_rng(7).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    canon, valid, al = aligner.transform(im)
    np.testing.assert_array_equal(canon, cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC))
    assert valid.shape == (SIZE, SIZE) and valid.min() == 1.0 and al.trusted
    assert aligner.inverse_map(np.ones((SIZE, SIZE), np.float32), al, im.shape).shape == (90, 130)
    small, _, _ = aligner.transform(np.zeros((1, 1), np.uint8))
    assert small.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("case", ["blank", "1x1", "sliver", "tiny_part", "cut_off", "too_small", "round"])
def test_untrusted_cases_still_give_a_result(fitted, case):
    rng = np.random.default_rng(8)
    if case == "blank":
        im = np.full((120, 90, 3), 128, np.uint8)
    elif case == "1x1":
        im = np.zeros((1, 1), np.uint8)
    elif case == "sliver":
        im = rng.integers(0, 256, (3, 2000, 3), dtype=np.uint8)
    elif case == "tiny_part":
        im = np.full((SCENE, SCENE), 200, np.uint8)
        cv2.circle(im, (100, 100), 3, 60, -1)
    elif case == "cut_off":
        im = render(rng, angle=0.0, scale=1.0, shift=(0, 135))[0]  # lying across the bottom border
    elif case == "too_small":
        im = render(rng, scale=0.5)[0]
    else:  # a disc of about the nominal size: its axis is undefined
        im = np.full((SCENE, SCENE), 200, np.uint8)
        cv2.circle(im, (SCENE // 2, SCENE // 2), int(2 * fitted.nominal_size_ * SCENE), 70, -1)
    canon, valid, al = fitted.transform(im)
    assert not al.trusted and al.reason
    assert canon.shape == (SIZE, SIZE, 3) and canon.dtype == np.uint8 and valid.shape == (SIZE, SIZE)
    # The fallback is a centred resize of the whole image.
    h, w = im.shape[:2]
    np.testing.assert_allclose(al.centre, [(w - 1) / 2, (h - 1) / 2])
    assert al.angle == 0.0 and al.scale == pytest.approx(SIZE / max(h, w))
    back = fitted.inverse_map(np.ones((SIZE, SIZE), np.float32), al, im.shape)
    assert back.shape == (h, w)


def test_state_dict_round_trip(fitted):
    state = json.loads(json.dumps(fitted.state_dict()))
    restored = Aligner.from_state_dict(state)
    assert restored.state_dict() == fitted.state_dict()
    for im in [render(np.random.default_rng(9))[0], np.zeros((5, 5), np.uint8)]:
        a, b = fitted.transform(im), restored.transform(im)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2].matrix, b[2].matrix)
    with pytest.raises(ValueError, match="version"):
        Aligner.from_state_dict({"size": 3})
    with pytest.raises(ValueError, match="version"):
        Aligner.from_state_dict(dict(state, version=1))
    with pytest.raises(ValueError, match="lacks"):
        Aligner.from_state_dict({k: v for k, v in state.items() if k != "zoom"})


def test_mirror_resolves_a_part_lying_on_its_other_face():
    rng = np.random.default_rng(10)
    nominal = [render(rng, tab=True)[0] for _ in range(4)]
    scenes = [render(rng, tab=True, mirror=bool(i % 2)) for i in range(8)]
    for mirror in (False, True):
        aligner = Aligner(size=SIZE, mirror=mirror, size_tolerance=VARYING).fit(nominal)
        results = [aligner.transform(im)[2] for im, _, _ in scenes]
        sils = [canonical_silhouette(a, al) for (_, a, _), al in zip(scenes, results)]
        worst = min(iou(a, b) for i, a in enumerate(sils) for b in sils[i + 1:])
        if mirror:
            assert worst > 0.9
            # Each face is consistently mirrored or not, the two faces oppositely.
            faces = {al.mirrored for al in results[::2]}, {not al.mirrored for al in results[1::2]}
            assert len(faces[0]) == 1 and faces[0] == faces[1]
        else:  # without mirroring, each face lands on its own side: the tab is where the other face lacks it
            same = min(iou(a, b) for sil in (sils[::2], sils[1::2]) for i, a in enumerate(sil) for b in sil[i + 1:])
            across = max(iou(a, b) for a in sils[::2] for b in sils[1::2])
            assert worst < same and across < same, (worst, same, across)
            assert not any(al.mirrored for al in results)


def test_bad_inputs(fitted):
    with pytest.raises(TypeError, match="numpy array"):
        fitted.transform([[0, 1], [2, 3]])
    with pytest.raises(TypeError, match="list"):
        fitted.fit([np.zeros((8, 8), np.uint8), [[0, 1]]])
    with pytest.raises(ValueError, match="NaN"):
        fitted.transform(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="empty"):
        fitted.transform(np.zeros((0, 5), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        fitted.transform(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="at least one"):
        Aligner(size=SIZE).fit([])
    with pytest.raises(ValueError, match="no part outline"):
        Aligner(size=SIZE).fit([np.full((64, 64), 9, np.uint8)])
    with pytest.raises(ValueError, match="zoom"):
        Aligner(size=SIZE, zoom=1.5)
    with pytest.raises(RuntimeError, match="not fitted"):
        Aligner(size=SIZE).transform(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="canonical"):
        fitted.inverse_map(np.zeros((3, 3), np.float32), fitted.transform(np.zeros((8, 8), np.uint8))[2], (8, 8))


def test_fit_skips_nominal_images_without_a_part():
    rng = np.random.default_rng(11)
    images = [render(rng)[0] for _ in range(3)]
    a = Aligner(size=SIZE).fit(images)
    b = Aligner(size=SIZE).fit(images + [np.full((SCENE, SCENE, 3), 200, np.uint8)])
    assert a.state_dict() == b.state_dict()
