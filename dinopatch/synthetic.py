"""A synthetic inspection line: parts and textures with defects and their ground-truth masks.

The categories stand in for MVTec AD where no data set can be downloaded:
``pasta`` is a flat texture (a tray of penne in a fixed layout, used with
alignment off) and ``screw`` a part at a random pose (used with alignment on).
:func:`synthesize` writes a category in the MVTec AD folder layout.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

CATEGORIES = ("pasta", "screw")
DEFECTS = {"pasta": ("crack", "spot", "discolouration", "foreign"),
           "screw": ("missing_washer", "short_thread", "bent_thread", "extra_object")}


# ----------------------------------------------------------------------------- drawing helpers

def pose_matrix(angle: float, scale: float, centre) -> np.ndarray:
    """2x3 matrix: rotate by ``angle`` degrees, scale, move the origin to ``centre``."""
    c, s = scale * math.cos(math.radians(angle)), scale * math.sin(math.radians(angle))
    return np.array([[c, -s, centre[0]], [s, c, centre[1]]])


def _then(m: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The matrix applying ``a`` first, then ``m``."""
    return np.hstack([m[:, :2] @ a[:, :2], m[:, :2] @ a[:, 2:] + m[:, 2:]])


def _fixed(m: np.ndarray, pts) -> np.ndarray:
    """Points mapped by ``m``, in OpenCV's 4-bit fixed point (sub-pixel drawing)."""
    p = np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]
    return np.rint(p * 16).astype(np.int32)


def fill_polygon(img, m, pts, colour, label=None, value=255, outline=None):
    """Fill polygon ``pts`` (mapped by ``m``) into ``img`` (if any) and, untinted, into ``label``."""
    p = _fixed(m, pts)
    if img is not None:
        cv2.fillPoly(img, [p], colour, cv2.LINE_AA, 4)
    if outline is not None:
        cv2.polylines(img, [p], True, outline, 1, cv2.LINE_AA, 4)
    if label is not None:
        cv2.fillPoly(label, [p], value, cv2.LINE_8, 4)


def draw_line(img, m, a, b, colour, thickness):
    pa, pb = _fixed(m, [a, b])
    cv2.line(img, tuple(map(int, pa)), tuple(map(int, pb)), colour, max(1, int(round(thickness))), cv2.LINE_AA, 4)


def _rect(x0, x1, half):
    return [(x0, -half), (x1, -half), (x1, half), (x0, half)]


def circle_points(r, n=24):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def check_defect(category: str, defect: str, size: int = 256, defects: dict | None = None, min_size: int = 32) -> None:
    """ValueError unless ``category`` and ``defect`` are among ``defects`` (default :data:`DEFECTS`)."""
    defects = DEFECTS if defects is None else defects
    if int(size) < min_size:
        raise ValueError(f"synthetic images need size >= {min_size} px, got {size}")
    if category not in defects:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(defects)}")
    if defect != "good" and defect not in defects[category]:
        raise ValueError(f"{category} has no defect {defect!r}; choose from good, {', '.join(defects[category])}")


def finish_image(img: np.ndarray, rng: np.random.Generator, noise: float, drift: float = 0.05) -> np.ndarray:
    """Light the scene: per-channel gain, a gradient of up to ``drift`` across the frame, sensor noise."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w) - 0.5
    t = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(-drift, drift) * (xx * np.cos(t) + yy * np.sin(t))
    gain = rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, 3)
    out = img.astype(np.float32) * light[..., None].astype(np.float32) * gain.astype(np.float32)
    out += rng.normal(0, noise, out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- pasta

_PASTA, _PASTA_LIGHT, _PASTA_RIDGE = (70, 175, 225), (120, 215, 248), (40, 120, 175)
_TRAY, _PASTA_HOLE = (38, 48, 62), (30, 70, 115)


def render_pasta(rng: np.random.Generator, size: int = 256, defect: str = "good") -> tuple[np.ndarray, np.ndarray]:
    """A tray of penne in a fixed layout, jittered by a pixel or two.

    Returns:
        image uint8 ``[size, size, 3]`` BGR, mask uint8 ``[size, size]`` (255 = defect).
    """
    check_defect("pasta", defect, size)
    u = size / 256  # pixels per pixel of the 256 px design
    shift = rng.uniform(-1.5, 1.5, 2) * u
    look = np.random.default_rng(rng.integers(2**63))  # the same look for any defect drawn next
    img = np.full((size, size, 3), _TRAY, np.uint8)
    fg = np.zeros((size, size), np.uint8)
    pieces = []
    length, half, dx, dy = 0.19 * size, 0.038 * size, 0.25 * size, 0.14 * size
    for j in range(-1, 9):
        for i in range(-1, 5):
            centre = np.array([(i + 0.5 * (j % 2) + 0.25) * dx, (j + 0.4) * dy]) + shift + rng.uniform(-1, 1, 2) * u
            m = pose_matrix((28 if j % 2 else -28) + rng.uniform(-1.5, 1.5), 1.0, centre)
            slant = 0.35 * half  # penne are cut on the bias
            body = [(-length / 2 - slant, -half), (length / 2 - slant, -half),
                    (length / 2 + slant, half), (-length / 2 + slant, half)]
            fill_polygon(img, m, body, _PASTA, fg, outline=_PASTA_RIDGE)
            fill_polygon(img, m, [(x, y * 0.4 - 0.15 * half) for x, y in body], _PASTA_LIGHT)
            for y in (-0.55 * half, 0.45 * half):
                draw_line(img, m, (-length / 2 + 0.25 * half, y), (length / 2 - 0.25 * half, y), _PASTA_RIDGE, u)
            oval = circle_points(1, 16) @ np.array([[0.3 * half, 0], [slant, half]])  # an open end of the tube
            for end in (-length / 2, length / 2):
                fill_polygon(img, m, oval + (end, 0), _PASTA_RIDGE)
                fill_polygon(img, m, 0.55 * oval + (end, 0), _PASTA_HOLE)
            pieces.append(centre)
    pieces = [c for c in pieces if 0.15 * size < c[0] < 0.85 * size and 0.15 * size < c[1] < 0.85 * size]
    mask = np.zeros((size, size), np.uint8)
    if defect == "crack":
        start, t = pieces[rng.integers(len(pieces))], rng.uniform(0, np.pi)
        d = np.array([np.cos(t), np.sin(t)])
        pts = [start + d * s * size + d[::-1] * (-1, 1) * rng.uniform(-0.012, 0.012) * size
               for s in np.linspace(-0.12, 0.12, 9)]
        cv2.polylines(mask, [np.rint(np.array(pts) * 16).astype(np.int32)], False, 255, max(2, round(2 * u)),
                      cv2.LINE_8, 4)
        mask &= fg
        img[mask > 0] = (25, 40, 60)
    elif defect == "spot":
        for k in range(rng.integers(1, 4)):
            c = pieces[rng.integers(len(pieces))] + rng.uniform(-4, 4, 2) * u
            fill_polygon(None, pose_matrix(0, 1, c), circle_points(rng.uniform(0.022, 0.035) * size), None, mask)
        mask &= fg
        soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 1.0 * u)[..., None]
        img[:] = img * (1 - 0.8 * soft) + np.array([25, 50, 85]) * 0.8 * soft
    elif defect == "discolouration":
        c = pieces[rng.integers(len(pieces))]
        fill_polygon(None, pose_matrix(rng.uniform(0, 180), 1, c), circle_points(1) * (0.10, 0.065) * size, None, mask)
        mask &= fg
        tint = np.array([(120, 150, 110), (60, 90, 160), (150, 160, 160)][rng.integers(3)])
        sel = mask > 0
        img[sel] = 0.3 * img[sel] + 0.7 * tint * (img[sel].mean(1, keepdims=True) / 170)
    elif defect == "foreign":
        c = pieces[rng.integers(len(pieces))] + rng.uniform(-0.05, 0.05, 2) * size
        n = rng.integers(4, 8)
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.025, 0.045, n) * size
        poly = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        colour = [(200, 110, 30), (60, 150, 40), (235, 235, 240)][rng.integers(3)]
        fill_polygon(img, pose_matrix(0, 1, c), poly, colour, mask, outline=(30, 30, 30))
    return finish_image(img, look, 3.0), mask


# ----------------------------------------------------------------------------- screw

# The screw in its own frame, in units of the image side: head at -x, tip at +x.
_HEAD, _WASHER, _SHANK, _TIP = (-0.31, -0.215, 0.095), (-0.215, -0.165, 0.15), (-0.165, 0.23, 0.05), 0.31
_PITCH = 0.03
_STEEL, _STEEL_DARK, _STEEL_LIGHT, _BACKGROUND = (125, 120, 115), (55, 52, 50), (185, 180, 175), (212, 214, 210)


def render_screw(rng: np.random.Generator, size: int = 256, angle: float | None = None, scale: float | None = None,
                 shift=None, defect: str = "good") -> tuple[np.ndarray, np.ndarray]:
    """One screw on a light background at a random (or given) pose.

    Args:
        rng: draws what is not given, then the look (lighting, noise), then
            the defect: the same seed renders good and defective parts alike.
        angle: degrees, default uniform in [0, 360).
        scale: default uniform in [0.85, 1.15].
        shift: (dx, dy) of the centre in pixels, default up to 10% of ``size``.
        defect: ``"good"`` or one of ``DEFECTS["screw"]``.

    Returns:
        image uint8 ``[size, size, 3]`` BGR, mask uint8 ``[size, size]`` (255 = defect).
    """
    check_defect("screw", defect, size)
    angle = rng.uniform(0, 360) if angle is None else angle
    scale = rng.uniform(0.85, 1.15) if scale is None else scale
    shift = rng.uniform(-0.1, 0.1, 2) * size if shift is None else np.asarray(shift, float)
    look = np.random.default_rng(rng.integers(2**63))
    m = pose_matrix(angle, scale * size, np.array([size / 2, size / 2]) + shift)
    bend = (rng.uniform(0.35, 0.5), rng.choice([-1, 1]) * rng.uniform(20, 30)) if defect == "bent_thread" else None
    short = rng.uniform(0.45, 0.55) if defect == "short_thread" else 1.0
    img, good = (np.full((size, size, 3), _BACKGROUND, np.uint8) for _ in range(2))
    good_parts, parts = (np.zeros((size, size), np.uint8) for _ in range(2))
    _draw_screw(good, good_parts, m, washer=True, short=1.0, bend=None)
    _draw_screw(img, parts, m, washer=defect != "missing_washer", short=short, bend=bend)
    # The defect is where a part moved or went, and where the picture visibly changed.
    changed = np.abs(good.astype(np.int16) - img).max(axis=2) > 40
    mask = np.where((good_parts != parts) | changed, 255, 0).astype(np.uint8)
    if defect == "extra_object":
        c = _extra_object_place(rng, m, size)
        if rng.random() < 0.5:  # a nut: hexagon with a hole
            nut = pose_matrix(rng.uniform(0, 60), scale * size, c)
            fill_polygon(img, nut, circle_points(0.045, 6), _STEEL, mask, outline=_STEEL_DARK)
            fill_polygon(img, nut, circle_points(0.02), _BACKGROUND, outline=_STEEL_DARK)
        else:  # a pin
            pin = pose_matrix(rng.uniform(0, 180), scale * size, c)
            fill_polygon(img, pin, _rect(-0.06, 0.06, 0.014), _STEEL_LIGHT, mask, outline=_STEEL_DARK)
    return finish_image(img, look, 2.5), mask


def _draw_screw(img, label, m, washer: bool, short: float, bend):
    """Draw the parts; ``label`` gets one value per part so two renders can be compared."""
    x0, x1, half = _SHANK
    end = x0 + short * (x1 - x0)
    px = math.hypot(m[0, 0], m[1, 0])  # pixels per unit
    fill_polygon(img, m, [(_HEAD[0], -_HEAD[2] * 0.8), (_HEAD[0] + 0.015, -_HEAD[2]), (_HEAD[1], -_HEAD[2]),
                   (_HEAD[1], _HEAD[2]), (_HEAD[0] + 0.015, _HEAD[2]), (_HEAD[0], _HEAD[2] * 0.8)],
          _STEEL, label, 1, outline=_STEEL_DARK)
    for y in (-0.3 * _HEAD[2], 0.3 * _HEAD[2]):  # the edges of the hexagon's faces
        draw_line(img, m, (_HEAD[0] + 0.004, y), (_HEAD[1] - 0.004, y), _STEEL_DARK, 0.004 * px)
    # The shank starts under the head: without the washer it shows in the gap.
    segments = [(_WASHER[0], end, m)]
    if bend is not None:
        xb = x0 + bend[0] * (x1 - x0)
        bent = _then(pose_matrix(bend[1], 1, (xb, 0)), np.array([[1.0, 0, -xb], [0, 1, 0]]))  # about (xb, 0)
        segments = [(_WASHER[0], xb, m), (xb, end, _then(m, bent))]
    for a, b, t in segments:
        fill_polygon(img, t, _rect(a, b + 0.002, half), _STEEL, label, 3, outline=_STEEL_DARK)
        for x in np.arange(x0 + _PITCH / 2, b - _PITCH / 2, _PITCH):
            if x >= a:
                draw_line(img, t, (x, -half), (x + 0.6 * _PITCH, half), _STEEL_DARK, 0.006 * px)
        fill_polygon(img, t, _rect(a, b, 0.012), _STEEL_LIGHT)  # the highlight along the axis
    fill_polygon(img, segments[-1][2], [(end, -half), (end + _TIP - x1, 0), (end, half)], _STEEL, label, 3,
          outline=_STEEL_DARK)
    if washer:
        fill_polygon(img, m, _rect(_WASHER[0], _WASHER[1], _WASHER[2]), _STEEL_LIGHT, label, 2, outline=_STEEL_DARK)


def _extra_object_place(rng, m, size) -> np.ndarray:
    """A spot beside the screw, on whichever side has more room."""
    along = rng.uniform(-0.15, 0.15)
    sides = [m @ (along, s * 0.23, 1) for s in (-1, 1)]
    room = [min(p.min(), size - p.max()) for p in sides]
    return np.clip(sides[int(np.argmax(room))], 0.08 * size, 0.92 * size)


# ----------------------------------------------------------------------------- data sets

_RENDER = {"pasta": render_pasta, "screw": render_screw}


def make_sample(category: str, defect: str, rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its mask.

    Args:
        category: one of :data:`CATEGORIES`.
        defect: ``"good"`` or one of ``DEFECTS[category]``.
        rng: a numpy ``Generator``.
        size: image side in pixels.

    Returns:
        image uint8 ``[size, size, 3]`` BGR, mask uint8 ``[size, size]``
        (255 = defect, all zero for ``"good"``).
    """
    check_defect(category, defect, size)
    return _RENDER[category](rng, size, defect=defect)


def make_images(category: str, defect: str, n: int, seed: int, size: int = 256) -> list[np.ndarray]:
    """``n`` synthetic images (no masks) from one seeded generator, as tests and benchmarks want them."""
    rng = np.random.default_rng(seed)
    return [make_sample(category, defect, rng, size)[0] for _ in range(n)]


def _write_png(path: Path, im: np.ndarray) -> None:
    cv2.imencode(".png", im)[1].tofile(str(path))  # like _decode: paths of any encoding


def synthesize(category: str, root: str | os.PathLike, n_train: int = 40, n_test_good: int = 12,
               n_test_defect: int = 6, size: int = 256, seed: int = 0) -> Path:
    """Write a synthetic data set in the MVTec AD layout.

    Args:
        category: one of :data:`CATEGORIES`.
        root: the folder to write (created; files of the same name are replaced).
        n_train: good training images.
        n_test_good: good test images.
        n_test_defect: test images per defect type, each with its mask.
        size: image side in pixels.
        seed: the same seed writes the same images.

    Returns:
        ``root`` as a Path.
    """
    check_defect(category, "good", size)
    root = Path(root)
    # One stream per folder: the training images do not depend on the test counts.
    groups = [("train", "good", n_train), ("test", "good", n_test_good)]
    groups += [("test", d, n_test_defect) for d in DEFECTS[category]]
    for k, (split, defect, n) in enumerate(groups):
        rng = np.random.default_rng([seed, k])
        (root / split / defect).mkdir(parents=True, exist_ok=True)
        if defect != "good":
            (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im, mask = make_sample(category, defect, rng, size)
            _write_png(root / split / defect / f"{i:03d}.png", im)
            if defect != "good":
                _write_png(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root
