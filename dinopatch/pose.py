"""A part's rotation against a nominal template: polar cross-correlation for every angle, then refinement.

A *crop* is a square ``SIDE x SIDE`` gray image of the part: centred on it, at
the nominal scale, turned by a pose. The template is the mean crop of the
good parts in their common pose. The polar unwrapping (``ANGLES`` angles x
radii) of a crop's intensity and gradient magnitude, cross-correlated with the
template's along the angle axis by FFT, scores every rotation in one pass; the
mirrored part's unwrapping is the same array read backwards, so mirroring
costs one more FFT. The best pose is then refined against the template image
(rotation and translation, a bounded number of Gauss-Newton steps on their
normalised correlation: :class:`Refiner`).

Angles are degrees in ``[0, 360)`` from the input's +x towards +y: the
direction of the canonical +x axis in the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["SIDE", "Pose", "PolarTemplate", "Refiner", "pose_matrix", "crop", "Residual"]

SIDE = 128                 # side of crops and of the template
ANGLES = 360               # angle bins of the polar unwrapping
_RADII = 40
_SEPARATION = 10.0         # degrees: a second peak nearer than this is the same pose
_REFINE_ITERATIONS = 30
_REFINE_STOP = 1e-2        # crop pixels: a refinement step that moves the crop's rim and centre by less ends it
_REFINE_MAX_TURN = 4.0     # degrees: a refinement that turns further than this has run off
_REFINE_MAX_SHIFT = 0.06   # of SIDE, likewise
_INNER = (slice(1, SIDE - 1), slice(1, SIDE - 1))  # the pixels with a whole gradient
_STRUCTURE = 0.05          # of the template's strongest gradient: weaker is flat background to the refinement
_SYMMETRY = 0.93           # template self-correlation at 360/N degrees above which it is N-fold symmetric
MAX_FOLD = 36


@dataclass
class Pose:
    """One rotation search's answer.

    Attributes:
        angle: degrees in ``[0, 360)``.
        mirrored: the part lies on its other face.
        score: normalised correlation of the best pose, in [-1, 1].
        peak_ratio: best score over the best score of a pose that is not
            equivalent to it (further than a few degrees, modulo the symmetry).
    """

    angle: float
    mirrored: bool
    score: float
    peak_ratio: float


def pose_matrix(centre, angle: float, scale: float, mirrored: bool, side: int) -> np.ndarray:
    """Input -> frame ``[2, 3]``: direction ``angle`` to +x (mirrored about it), ``centre`` to the frame's centre."""
    t = np.radians(angle)
    c, s = np.cos(t), np.sin(t)
    k = -scale if mirrored else scale
    m = np.array([[scale * c, scale * s, 0.0], [-k * s, k * c, 0.0]])
    m[:, 2] = (side - 1) / 2 - m[:, :2] @ np.asarray(centre, np.float64)
    return m


def crop(gray: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """float32 ``[SIDE, SIDE]`` crop of ``gray`` by the input -> crop ``matrix`` (edges replicated)."""
    return cv2.warpAffine(gray, matrix, (SIDE, SIDE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE).astype(np.float32)


def _polar_grid():
    """Remap maps ``[radii, ANGLES]`` (a ring a row) and each ring's amplitude weight ``[radii, 1]``."""
    c = (SIDE - 1) / 2
    r = np.linspace(0.05, 0.49, _RADII) * SIDE
    t = np.arange(ANGLES) * (2 * np.pi / ANGLES)
    mx = (c + r[:, None] * np.cos(t)[None]).astype(np.float32)
    my = (c + r[:, None] * np.sin(t)[None]).astype(np.float32)
    return mx, my, np.sqrt(r / r.max()).astype(np.float32)[:, None]  # energy per ring ~ its length


_MX, _MY, _WEIGHT = _polar_grid()
_DEGREES = np.arange(ANGLES) * (360.0 / ANGLES)  # of each angle bin


def _features(image: np.ndarray) -> np.ndarray:
    """float32 ``[2 * radii, ANGLES]``: intensity and gradient magnitude unwrapped (a ring a row), each ring
    zero-mean (what is the same at every angle says nothing about the angle), each channel of unit energy."""
    smooth = cv2.GaussianBlur(image, (0, 0), 1.0)
    grad = cv2.magnitude(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))
    # Less the light's slow drift across the frame, which turns with the camera, not with the part.
    # (An 8x8 box average brought back up: a wide Gaussian's low pass at a fraction of its cost.)
    detail = smooth - cv2.resize(cv2.resize(smooth, (8, 8), interpolation=cv2.INTER_AREA), (SIDE, SIDE),
                                 interpolation=cv2.INTER_LINEAR)
    out = np.empty((2 * _RADII, ANGLES), np.float32)
    for i, channel in enumerate((detail, grad)):
        p = out[i * _RADII:(i + 1) * _RADII]
        cv2.remap(channel, _MX, _MY, cv2.INTER_LINEAR, dst=p)
        p *= _WEIGHT
        p -= cv2.reduce(p, 1, cv2.REDUCE_AVG)
        p *= np.float32(1 / (max(cv2.norm(p), 1e-6) * np.sqrt(2)))
    return out


def _spectrum(f: np.ndarray) -> np.ndarray:
    """Each ring's DFT, OpenCV's packed real form (``[2 * radii, ANGLES]`` float32), of features ``f``."""
    return cv2.dft(f, flags=cv2.DFT_ROWS)


def _correlate(f: np.ndarray, spectrum_t: np.ndarray) -> np.ndarray:
    """float64 ``out[k] = sum_rings sum_theta f[:, theta + k] . t[:, theta]`` for every shift ``k``
    (``spectrum_t``: :func:`_spectrum` of t).

    In float32 (OpenCV's DFT), a third cheaper than NumPy's float64 FFT: the scores, normalised correlations,
    agree with it to 1e-5 (about 2e-7 on the synthetic parts)."""
    prod = cv2.mulSpectrums(_spectrum(f), spectrum_t, cv2.DFT_ROWS, conjB=True)
    return cv2.idft(cv2.reduce(prod, 0, cv2.REDUCE_SUM), flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)[0].astype(
        np.float64)


def _peak(scores: np.ndarray, k: int) -> float:
    """Sub-bin position of the peak at bin ``k`` (parabola through it and its neighbours)."""
    a, b, c = scores[(k - 1) % ANGLES], scores[k], scores[(k + 1) % ANGLES]
    d = a - 2 * b + c
    return k + (0.5 * (a - c) / d if d < 0 else 0.0)


def _gap(a, b, period: float):
    """Circular distance between angles, modulo ``period`` degrees."""
    d = np.abs(np.asarray(a) - b) % period
    return np.minimum(d, period - d)


class PolarTemplate:
    """The template's unwrapping, ready to score every rotation of a crop.

    Args:
        image: float32 ``[SIDE, SIDE]`` template (the mean aligned crop).
        fold: the part looks the same turned by ``360 / fold`` degrees.
    """

    def __init__(self, image: np.ndarray, fold: int = 1):
        self.image, self.fold = image.astype(np.float32), int(fold)
        self._spectrum = _spectrum(_features(self.image))
        # [k, j]: angle bin j is a pose apart from bin k (further than the separation, modulo the symmetry).
        self._apart = _gap(_DEGREES[None], _DEGREES[:, None], 360.0 / self.fold) > _SEPARATION

    def search(self, upright: np.ndarray, mirror: bool, windows=None) -> Pose:
        """The best pose of the part in ``upright``, a crop taken at angle 0, unmirrored.

        Args:
            upright: float32 ``[SIDE, SIDE]``.
            mirror: also try the part mirrored.
            windows: ``[(centre, half_width)]`` in degrees where the pose may be; None: anywhere.
        """
        f = _features(upright)
        # Unmirrored, the template at angle k shows at shift k; mirrored, the crop's
        # unwrapping runs backwards and the template at angle k shows at shift -k.
        options = [(False, _correlate(f, self._spectrum))]
        if mirror:
            options.append((True, np.roll(_correlate(np.roll(f[:, ::-1], 1, axis=1), self._spectrum)[::-1], 1)))
        allowed = np.ones(ANGLES, bool) if windows is None else np.zeros(ANGLES, bool)
        for centre, half in windows or ():
            allowed |= _gap(_DEGREES, centre, 360.0) <= half
        best = None
        for mirrored, scores in options:
            s = np.where(allowed, scores, -np.inf)
            k = int(np.argmax(s))
            nxt = np.max(np.where(self._apart[k], s, -np.inf), initial=-np.inf)
            if best is None or s[k] > best[2]:
                angle = (_peak(scores, k) * 360.0 / ANGLES) % 360.0
                best = (angle, mirrored, float(s[k]), float(nxt))
        angle, mirrored, score, nxt = best
        ratio = score / max(nxt, 1e-3) if np.isfinite(nxt) else float("inf")
        return Pose(float(angle), bool(mirrored), score, float(max(ratio, 0.0)))

    def symmetry(self) -> int:
        """The largest N (<= MAX_FOLD) under whose turns by 360/N degrees the template looks the same; 1 if none."""
        auto = _correlate(_features(self.image), self._spectrum)
        for n in range(MAX_FOLD, 1, -1):
            shifts = [j * ANGLES / n for j in range(1, n)]
            if all(_interp(auto, s) >= _SYMMETRY * auto[0] for s in shifts):
                return n
        return 1


def _interp(values: np.ndarray, x: float) -> float:
    k = int(np.floor(x))
    t = x - k
    return float((1 - t) * values[k % ANGLES] + t * values[(k + 1) % ANGLES])


class Refiner:
    """Sub-pixel, sub-degree rotation and translation of crops onto one template.

    It maximises the normalised correlation of crop and template, as OpenCV's
    ECC does, by Gauss-Newton in its inverse compositional form: the
    template's gradients, and the Hessian they give, are computed once here, so
    that an iteration costs one warp and one projection, over the box of the
    template that has structure.  Neither image is blurred first, unlike ECC:
    a blur put the parts of ``benchmarks/pose_accuracy.py`` further off centre.

    Args:
        template: float32 ``[SIDE, SIDE]``.
    """

    def __init__(self, template: np.ndarray):
        t = np.asarray(template, np.float32)
        gx = cv2.Sobel(t, cv2.CV_32F, 1, 0, scale=1 / 8)
        gy = cv2.Sobel(t, cv2.CV_32F, 0, 1, scale=1 / 8)
        yy, xx = np.mgrid[0:SIDE, 0:SIDE] - (SIDE - 1) / 2
        box = _structure_box(np.abs(gx) + np.abs(gy))
        self._box = np.array([[1.0, 0, -box[1].start], [0, 1.0, -box[0].start], [0, 0, 1]])  # crop -> box
        # The image's change as the crop turns about its centre and moves: d/d(angle, tx, ty), zero-mean.
        g = np.stack([gy * xx - gx * yy, gx, gy])[(slice(None), *box)].reshape(3, -1)
        g -= g.mean(axis=1, keepdims=True)
        v = t[box].astype(np.float64)
        v -= v.mean()
        norm = max(float(np.sqrt((v * v).sum())), 1e-9)
        self._template = (v / norm).astype(np.float32)
        self._root_size = np.sqrt(v.size)
        # Least squares from the crop's difference to the template to the step: [3, *box shape]
        # (the pseudo-inverse: a flat template has no gradient, and then gives no step).
        self._solve = (np.linalg.pinv(g @ g.T) @ (g * norm)).astype(np.float32).reshape(3, *v.shape)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """float64 ``[2, 3]`` crop -> template matrix of the float32 ``[SIDE, SIDE]`` crop ``image``: the identity
        where the refinement runs further than a coarse pose can be off, or the crop is flat."""
        c = (SIDE - 1) / 2
        m = np.eye(3)
        for _ in range(_REFINE_ITERATIONS):
            warped = cv2.warpAffine(image, (self._box @ m)[:2], self._template.shape[::-1], flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE)
            mean, std = (float(v[0, 0]) for v in cv2.meanStdDev(warped))
            spread = std * self._root_size
            if not spread > 1e-6:  # nothing to correlate
                return np.eye(2, 3)
            warped -= np.float32(mean)  # now the difference of the standardised crop from the template
            warped *= np.float32(1 / spread)
            warped -= self._template
            # einsum's own loop, not BLAS: a product of this size wakes a thread pool that costs more than it does.
            turn, tx, ty = (float(v) for v in np.einsum("kij,ij->k", self._solve, warped))
            co, si = np.cos(turn), np.sin(turn)
            m = np.array([[co, -si, c - co * c + si * c + tx], [si, co, c - si * c - co * c + ty], [0, 0, 1]]) @ m
            if max(abs(turn) * c, abs(tx), abs(ty)) < _REFINE_STOP:
                break
        shift = np.abs(m[:2] @ [c, c, 1.0] - c).max()
        turned = abs(np.degrees(np.arctan2(m[1, 0], m[0, 0])))
        if not (turned <= _REFINE_MAX_TURN and shift <= _REFINE_MAX_SHIFT * SIDE):
            return np.eye(2, 3)
        return m[:2]


def _structure_box(magnitude: np.ndarray) -> tuple[slice, slice]:
    """The box of the template the refinement compares on: where its gradient ``magnitude`` ``[SIDE, SIDE]``
    shows structure, widened by the furthest a refinement may move (what lies beyond is flat either way),
    within the pixels that have a whole gradient."""
    inner = magnitude[_INNER]
    ys, xs = np.nonzero(inner > _STRUCTURE * max(float(inner.max()), 1e-9))
    if not len(ys):
        return _INNER
    margin = int(np.ceil(_REFINE_MAX_SHIFT * SIDE))
    return (slice(max(1, ys.min() + 1 - margin), min(SIDE - 1, ys.max() + 2 + margin)),
            slice(max(1, xs.min() + 1 - margin), min(SIDE - 1, xs.max() + 2 + margin)))


_YY, _XX = np.mgrid[0:SIDE, 0:SIDE] - (SIDE - 1) / 2
_DISC = (_XX ** 2 + _YY ** 2) <= (0.49 * SIDE) ** 2


class Residual:
    """1 - normalised correlation of aligned crops with one template, over the inscribed disc.

    Args:
        template: float32 ``[SIDE, SIDE]``.
    """

    def __init__(self, template: np.ndarray):
        a = np.asarray(template)[_DISC].astype(np.float64)
        self._template = a - a.mean()
        self._energy = (self._template * self._template).sum()

    def __call__(self, image: np.ndarray) -> float:
        """The residual of the float32 ``[SIDE, SIDE]`` crop ``image``."""
        # Elementwise sums, not BLAS: a dot product of this size wakes a thread pool that costs more than it does.
        b = image[_DISC].astype(np.float64)
        b -= b.mean()
        a = self._template
        return float(1.0 - (a * b).sum() / max(np.sqrt(self._energy * (b * b).sum()), 1e-9))
