"""A harder synthetic benchmark: subtle defects the demo's saturated sets do not have.

Five categories, each deterministic by seed:

* ``weave``: a woven texture in a fixed framing, jittered by a fraction of a
  patch and lit with a drifting gradient (alignment off).  Defects: a thin
  low-contrast ``scratch``, a faint ``stain``, a ``pulled`` thread (two
  cells woven the wrong way).
* ``circuit``: a board with thin traces in a fixed layout, jittered by a few
  pixels (alignment off).  Defects: an ``open`` trace (a short gap), a
  ``short`` (a thin bridge between two traces), a ``missing_pad``.
* ``comb``: a comb with thin teeth at a random pose (alignment on).  Defects:
  a ``broken_tooth`` (its tip missing), a ``bent_tooth``, a ``nick`` (a
  small notch in the spine).
* ``wheel``: a toothed wheel with a bore, a keyway and two holes (a few
  asymmetric features on a near-round outline), turned anywhere in 0-360
  degrees (alignment on).  Defects: a ``broken_tooth``, a ``burr`` on the
  rim, a thin ``crack`` from a tooth's root.
* ``wheel_size``: the same wheel at a fixed scale (the camera's distance is
  fixed), turned anywhere (alignment on).  Defects: an ``oversize`` or
  ``undersize`` wheel (10-20% off), and a ``stray_object`` (a nut lying in a
  corner of the image, away from the wheel).

Each ``render_<category>(rng, size, defect)`` returns the image, uint8
``[size, size, 3]`` BGR, and its defect mask, uint8 ``[size, size]`` (255 =
defect); :func:`make_set` renders one category's training and test images.
:mod:`dinopatch.benchmark_quality` scores a detector on them.
"""

from __future__ import annotations

import cv2
import numpy as np

from .synthetic import check_defect as check_names
from .synthetic import circle_points, draw_line, fill_polygon, finish_image, pose_matrix

CATEGORIES = ("weave", "circuit", "comb", "wheel", "wheel_size")
DEFECTS = {
    "weave": ("scratch", "stain", "pulled"),
    "circuit": ("open", "short", "missing_pad"),
    "comb": ("broken_tooth", "bent_tooth", "nick"),
    "wheel": ("broken_tooth", "burr", "crack"),
    "wheel_size": ("oversize", "undersize", "stray_object"),
}
ALIGN = {"weave": False, "circuit": False, "comb": True, "wheel": True, "wheel_size": True}
# Lighting drift of these sets: a stronger gradient than the demo's (0.05).
DRIFT = 0.1


def check_defect(category: str, defect: str, size: int) -> None:
    check_names(category, defect, size, DEFECTS, min_size=64)


def _changed(good: np.ndarray, img: np.ndarray, size: int) -> np.ndarray:
    """The defect mask: where the picture visibly changed, closed over a pixel or two."""
    mask = (np.abs(good.astype(np.int16) - img).max(axis=2) > 12).astype(np.uint8) * 255
    k = max(3, round(0.012 * size) | 1)
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))


# ----------------------------------------------------------------------------- weave

_WEAVE = np.array([95, 120, 150], np.float32)  # BGR of the thread


def render_weave(
    rng: np.random.Generator, size: int = 224, defect: str = "good"
) -> tuple[np.ndarray, np.ndarray]:
    """A plain weave: cells of three threads, alternately along x and y."""
    check_defect("weave", defect, size)
    cell = 0.047 * size  # not a divisor of the 14 px patch: patches see different phases
    shift = rng.uniform(-0.2, 0.2, 2) * size / 16  # a fifth of a patch at most
    look = np.random.default_rng(rng.integers(2**63))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = xx / cell + shift[0] / cell, yy / cell + shift[1] / cell
    ci, cj = np.floor(x).astype(int), np.floor(y).astype(int)
    along_x = (ci + cj) % 2 == 0
    mask = np.zeros((size, size), np.uint8)
    if defect == "pulled":
        i, j = (int(v) for v in rng.integers(3, int(size / cell) - 4, 2))
        sel = ((cj == j) | (cj == j + 1)) & ((ci == i) | (ci == i + 1))
        along_x = np.where(sel, ~along_x, along_x)
        mask[sel] = 255
    across = np.where(along_x, y - cj, x - ci)
    along = np.where(along_x, x, y)
    grain = look.uniform(0.96, 1.04, (int(size / cell) + 3,) * 2)[
        cj + 1, ci + 1
    ]  # thread-to-thread variation
    shade = (0.72 + 0.28 * np.cos(2 * np.pi * 3 * across) ** 2) * (0.97 + 0.03 * np.sin(2 * np.pi * along))
    img = (_WEAVE * (shade * grain)[..., None]).astype(np.float32)
    if defect == "scratch":
        c, t = rng.uniform(0.25, 0.75, 2) * size, rng.uniform(0, np.pi)
        d = np.array([np.cos(t), np.sin(t)]) * rng.uniform(0.08, 0.12) * size
        cv2.line(
            mask,
            tuple(np.rint((c - d) * 16).astype(int)),
            tuple(np.rint((c + d) * 16).astype(int)),
            255,
            max(1, round(0.009 * size)),
            cv2.LINE_8,
            4,
        )
        img[mask > 0] += 40
    elif defect == "stain":
        c = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.03, 0.04) * size
        blob = np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * r * r)).astype(np.float32)
        img *= 1 - 0.4 * blob[..., None] * np.array([1.0, 0.8, 0.5], np.float32)
        mask[blob > 0.4] = 255
    return finish_image(np.clip(img, 0, 255).astype(np.uint8), look, 3.0, drift=DRIFT), mask


# ----------------------------------------------------------------------------- circuit

_BOARD, _COPPER, _PAD = (60, 95, 40), (70, 150, 185), (150, 190, 210)


def _circuit_layout(size: int) -> dict:
    """The board's design, the same for every image (its own fixed seed)."""
    rng = np.random.default_rng(1234)
    traces, y = [], 0.12
    while y < 0.9:  # horizontal runs with one jog each
        x0, x1 = rng.uniform(0.08, 0.3), rng.uniform(0.7, 0.92)
        xj = rng.uniform(0.45, 0.6)  # first runs of neighbours overlap in [0.3, 0.45]: room for a short
        dy = rng.choice([-1, 1]) * 0.03
        traces.append([(x0, y), (xj, y), (xj + 0.03, y + dy), (x1, y + dy)])
        y += rng.uniform(0.065, 0.085)
    pads = [(p[0], p[1]) for t in traces for p in (t[0], t[-1])]
    return {"traces": [np.array(t) * size for t in traces], "pads": np.array(pads) * size}


def _draw_circuit(size, shift, layout, skip_pad=None, gap=None, bridge=None) -> np.ndarray:
    img = np.full((size, size, 3), _BOARD, np.uint8)
    m = pose_matrix(0, 1, shift)
    width = 0.011 * size
    for t in layout["traces"]:
        for a, b in zip(t[:-1], t[1:]):
            draw_line(img, m, a, b, _COPPER, width)
    for k, p in enumerate(layout["pads"]):
        if k != skip_pad:
            fill_polygon(img, m, circle_points(0.018 * size) + p, _PAD, outline=_COPPER)
    if gap is not None:
        draw_line(img, m, gap[0], gap[1], _BOARD, 2.2 * width)
    if bridge is not None:
        draw_line(img, m, bridge[0], bridge[1], _COPPER, 0.8 * width)
    return img


def render_circuit(
    rng: np.random.Generator, size: int = 224, defect: str = "good"
) -> tuple[np.ndarray, np.ndarray]:
    """Copper traces and pads on a board, fixed layout, jittered by up to 1.5% of the side.

    That is a quarter patch at 224 px: aligned to within a patch, as a fixtured part is.
    """
    check_defect("circuit", defect, size)
    layout = _circuit_layout(size)
    shift = rng.uniform(-0.015, 0.015, 2) * size
    look = np.random.default_rng(rng.integers(2**63))
    traces = layout["traces"]
    kw = {}
    if defect == "missing_pad":
        kw["skip_pad"] = int(rng.integers(len(layout["pads"])))
    elif defect == "open":
        t = traces[rng.integers(len(traces))]
        s = rng.uniform(0.2, 0.8)
        p = t[0] + s * (t[1] - t[0])  # on the first run, away from the jog
        kw["gap"] = (p - (0.012 * size, 0), p + (0.012 * size, 0))
    elif defect == "short":
        k = int(rng.integers(len(traces) - 1))
        x = rng.uniform(
            max(traces[k][0][0], traces[k + 1][0][0]) + 0.03 * size,
            min(traces[k][1][0], traces[k + 1][1][0]) - 0.03 * size,
        )
        kw["bridge"] = ((x, traces[k][0][1]), (x + 0.02 * size, traces[k + 1][0][1]))
    good = _draw_circuit(size, shift, layout)
    img = _draw_circuit(size, shift, layout, **kw)
    mask = _changed(good, img, size)
    return finish_image(img, look, 3.0, drift=DRIFT), mask


# ----------------------------------------------------------------------------- comb

_PLASTIC, _PLASTIC_EDGE, _TABLE = (50, 60, 150), (30, 35, 90), (205, 210, 212)
_TEETH, _SPINE, _TOOTH = (
    15,
    (-0.32, 0.32, -0.2, -0.12),
    (0.012, 0.2),
)  # spine x0, x1, y0, y1; tooth half, length


def _draw_comb(img, m, wobble, broken=None, bent=None, nick=None):
    """The comb; ``wobble`` ``[teeth, 2]``: each tooth's length factor and angle in degrees.

    The wobble is the spread of moulding: nominal, and as large as the subtlest defects.
    """
    x0, x1, y0, y1 = _SPINE
    fill_polygon(img, m, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], _PLASTIC, outline=_PLASTIC_EDGE)
    half, length = _TOOTH
    for k, x in enumerate(np.linspace(x0 + 0.02, x1 - 0.02, _TEETH)):
        end = y1 + length * wobble[k, 0] * (0.8 if k == broken else 1.0)
        turn = pose_matrix(wobble[k, 1] + (bent[1] if k == (bent[0] if bent else None) else 0), 1, (0, 0))[:, :2]
        t = np.hstack([m[:, :2] @ turn, m[:, :2] @ (np.array([x, y1]) - turn @ (x, y1))[:, None] + m[:, 2:]])
        fill_polygon(
            img,
            t,
            [(x - half, y1 - 0.005), (x + half, y1 - 0.005), (x + half * 0.7, end), (x - half * 0.7, end)],
            _PLASTIC,
            outline=_PLASTIC_EDGE,
        )
    if nick is not None:
        fill_polygon(img, m, circle_points(0.009, 12) + (nick, y0), _TABLE)


def render_comb(
    rng: np.random.Generator, size: int = 224, defect: str = "good"
) -> tuple[np.ndarray, np.ndarray]:
    """A comb with thin teeth on a table, at a random pose; its teeth vary a little in length and angle."""
    check_defect("comb", defect, size)
    angle, scale = rng.uniform(0, 360), rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.06, 0.06, 2) * size
    look = np.random.default_rng(rng.integers(2**63))
    m = pose_matrix(angle, scale * size, np.array([size / 2, size / 2]) + shift)
    wobble = np.stack([rng.uniform(0.96, 1.04, _TEETH), rng.uniform(-1, 1, _TEETH)], 1)
    kw = {}
    tooth = int(rng.integers(1, _TEETH - 1))
    if defect == "broken_tooth":
        kw["broken"] = tooth
    elif defect == "bent_tooth":
        kw["bent"] = (tooth, rng.choice([-1, 1]) * rng.uniform(4, 6))
    elif defect == "nick":
        kw["nick"] = rng.uniform(_SPINE[0] + 0.08, _SPINE[1] - 0.08)
    good, img = (np.full((size, size, 3), _TABLE, np.uint8) for _ in range(2))
    _draw_comb(good, m, wobble)
    _draw_comb(img, m, wobble, **kw)
    mask = _changed(good, img, size)
    return finish_image(img, look, 2.5, drift=DRIFT), mask


# ----------------------------------------------------------------------------- wheel

_BRASS, _BRASS_EDGE, _BRASS_DARK, _BENCH = (60, 150, 190), (30, 80, 110), (25, 50, 70), (200, 205, 208)
# In units of the image side: tip and root radius, teeth, bore, keyway (half width, depth), holes (radius, angles).
_RIM, _ROOT, _WHEEL_TEETH, _BORE, _KEY, _HOLE = 0.3, 0.265, 24, 0.07, (0.018, 0.03), (0.03, (20.0, 140.0))
_HOLE_RADIUS = 0.175


def _wheel_outline(broken: int | None = None, burr: float | None = None) -> np.ndarray:
    """The rim's polygon ``[n, 2]``: trapezoid teeth; tooth ``broken`` cut to the root, a ``burr`` at that angle."""
    t = np.linspace(0, 2 * np.pi, _WHEEL_TEETH * 32, endpoint=False)
    phase = (t * _WHEEL_TEETH / (2 * np.pi)) % 1.0
    lift = np.clip(np.minimum(phase - 0.1, 0.9 - phase) / 0.15, 0, 1)  # 0 at the root, 1 on the tip
    if broken is not None:
        lift[(t * _WHEEL_TEETH / (2 * np.pi)).astype(int) == broken] *= 0.35
    r = _ROOT + (_RIM - _ROOT) * lift
    if burr is not None:
        r += 0.022 * np.exp(-0.5 * ((np.angle(np.exp(1j * (t - burr)))) / 0.02) ** 2)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _draw_wheel(img, m, broken=None, burr=None, crack=None):
    fill_polygon(img, m, _wheel_outline(broken, burr), _BRASS, outline=_BRASS_EDGE)
    fill_polygon(img, m, circle_points(0.2, 48), _BRASS_EDGE)  # the hub's step
    fill_polygon(img, m, circle_points(0.195, 48), _BRASS)
    fill_polygon(img, m, circle_points(_BORE, 32), _BENCH, outline=_BRASS_EDGE)
    kh, kd = _KEY
    fill_polygon(img, m, [(_BORE - 0.01, -kh), (_BORE + kd, -kh), (_BORE + kd, kh), (_BORE - 0.01, kh)], _BENCH,
                 outline=_BRASS_EDGE)
    for a in _HOLE[1]:
        c = _HOLE_RADIUS * np.array([np.cos(np.radians(a)), np.sin(np.radians(a))])
        fill_polygon(img, m, circle_points(_HOLE[0], 24) + c, _BENCH, outline=_BRASS_EDGE)
    if crack is not None:  # from a tooth's root inwards, a little crooked
        d = np.array([np.cos(crack), np.sin(crack)])
        pts = [d * r + d[::-1] * (-1, 1) * w for r, w in ((_ROOT + 0.005, 0), (0.245, 0.004), (0.225, -0.003))]
        for a, b in zip(pts[:-1], pts[1:]):
            draw_line(img, m, a, b, _BRASS_DARK, 0.006 * np.hypot(m[0, 0], m[1, 0]))


def _nut(img, centre, size):
    """A hexagonal nut (with its hole) lying at ``centre``."""
    m = pose_matrix(float(np.degrees(np.arctan2(*centre))) % 60, size, centre)
    fill_polygon(img, m, circle_points(0.05, 6), (120, 118, 115), outline=(50, 50, 50))
    fill_polygon(img, m, circle_points(0.022, 16), _BENCH, outline=(50, 50, 50))


def render_wheel(
    rng: np.random.Generator, size: int = 224, defect: str = "good", category: str = "wheel"
) -> tuple[np.ndarray, np.ndarray]:
    """A toothed wheel at any rotation; ``category="wheel_size"`` keeps its scale fixed and judges size."""
    check_defect(category, defect, size)
    angle = rng.uniform(0, 360)
    scale = rng.uniform(0.95, 1.05) if category == "wheel" else rng.uniform(0.995, 1.005)
    shift = rng.uniform(-0.05, 0.05, 2) * size
    look = np.random.default_rng(rng.integers(2**63))
    kw, factor = {}, 1.0
    if defect == "broken_tooth":
        kw["broken"] = int(rng.integers(_WHEEL_TEETH))
    elif defect == "burr":
        kw["burr"] = rng.uniform(0, 2 * np.pi)
    elif defect == "crack":
        kw["crack"] = (int(rng.integers(_WHEEL_TEETH)) + 0.02) * 2 * np.pi / _WHEEL_TEETH
    elif defect in ("oversize", "undersize"):
        factor = rng.uniform(1.1, 1.2) if defect == "oversize" else rng.uniform(0.8, 0.9)
    centre = np.array([size / 2, size / 2]) + shift
    good, img = (np.full((size, size, 3), _BENCH, np.uint8) for _ in range(2))
    _draw_wheel(good, pose_matrix(angle, scale * size, centre))
    _draw_wheel(img, pose_matrix(angle, scale * factor * size, centre), **kw)
    if defect == "stray_object":
        corner = rng.integers(2, size=2)
        _nut(img, np.where(corner, 0.9, 0.1) * size + rng.uniform(-0.02, 0.02, 2) * size, scale * size)
    mask = _changed(good, img, size)
    return finish_image(img, look, 2.5, drift=DRIFT), mask


def render_wheel_size(rng: np.random.Generator, size: int = 224, defect: str = "good"):
    """The wheel at a fixed scale: :func:`render_wheel` with ``category="wheel_size"``."""
    return render_wheel(rng, size, defect, category="wheel_size")


# ----------------------------------------------------------------------------- sets

_RENDER = {"weave": render_weave, "circuit": render_circuit, "comb": render_comb, "wheel": render_wheel,
           "wheel_size": render_wheel_size}


def make_set(
    category: str,
    *,
    n_train: int = 20,
    n_test_good: int = 10,
    n_test_defect: int = 5,
    size: int = 224,
    seed: int = 0,
) -> dict:
    """One category's images in memory: ``train`` (good), ``test`` images, their ``masks`` and ``defects``.

    One generator per group, so the training images do not depend on the test counts.
    """
    check_defect(category, "good", size)
    groups = [("good", n_train), ("good", n_test_good)] + [(d, n_test_defect) for d in DEFECTS[category]]
    out = {"train": [], "test": [], "masks": [], "defects": []}
    for k, (defect, n) in enumerate(groups):
        rng = np.random.default_rng([seed, CATEGORIES.index(category), k])
        for _ in range(n):
            im, mask = _RENDER[category](rng, size, defect=defect)
            if k == 0:
                out["train"].append(im)
            else:
                out["test"].append(im)
                out["masks"].append(mask > 0)
                out["defects"].append(defect)
    return out
