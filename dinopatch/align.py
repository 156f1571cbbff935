"""Alignment of parts to a canonical pose, from the silhouette's principal axis.

The part's outline is found at a reduced resolution (gray, blur, Canny,
external contours, filled); the moments of the filled outline give its centre,
principal axis and size (the standard deviation along the axis). The full
resolution image is then warped once into a square canonical frame: axis
horizontal, part centred, scaled to the nominal length learned in
:meth:`Aligner.fit`, padded where the frame leaves the image (with a validity
mask saying where): by reflection, or with the background level of the image's
border, which leaves no mirrored pieces of a part near the edge in the frame.
The 180-degree ambiguity of the axis (and, with
``mirror=True``, the side the part lies on) is resolved by matching a small
canonical silhouette against the mean nominal silhouette.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .data import as_image
from .outline import MIN_SIDE, Part, measure_part

__all__ = ["Aligner", "Alignment"]

_STATE_VERSION = 3  # 2: the nominal size is relative to the frame; 3: padding
PADDINGS = ("reflect", "background")
_TEMPLATE = 64           # side of the silhouettes that settle polarity and mirroring
_ROUND = 0.85            # minor/major eigenvalue ratio above which the axis is undefined


@dataclass
class Alignment:
    """How one image was put into the canonical frame.

    Attributes:
        angle: direction of the canonical +x axis in the input, degrees in
            ``[0, 360)`` from the input's +x towards +y.
        scale: canonical pixels per input pixel.
        centre: ``(x, y)`` input point at the centre of the canonical frame.
        flipped: the principal axis, taken pointing towards the input's +x,
            was turned by 180 degrees to match the nominal polarity.
        mirrored: the part was mirrored about its axis (``mirror=True`` only).
        trusted: False where the pose could not be measured reliably; the
            warp is then a centred resize of the whole image.
        reason: why the alignment is not trusted ("" when it is).
        matrix: float64 ``[2, 3]`` forward affine, input pixel -> canonical pixel.
    """

    angle: float
    scale: float
    centre: tuple[float, float]
    flipped: bool
    mirrored: bool
    trusted: bool
    reason: str
    matrix: np.ndarray = field(repr=False)


class Aligner:
    """Warps images of a part into a canonical pose.

    Args:
        size: side of the canonical frame in pixels.
        enabled: False for fixtured parts and flat textures: images are only
            resized to ``size x size``.
        mirror: parts may lie on either face; resolve mirroring too.
        zoom: fraction of the frame the nominal part's length fills.
        scale_tolerance: a part whose size, relative to the image's longest
            side, differs from the nominal median by more than this factor
            (either way) is not trusted.
        analysis_size: longest side of the image the outline is measured on.
        padding: ``"reflect"``, or ``"background"``: the per-channel median of
            the image's border pixels.
    """

    def __init__(self, *, size: int = 448, enabled: bool = True, mirror: bool = False, zoom: float = 0.75,
                 scale_tolerance: float = 1.5, analysis_size: int = 256, padding: str = "reflect"):
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0.0 < zoom <= 1.0:
            raise ValueError(f"zoom must be in (0, 1], got {zoom}")
        if scale_tolerance < 1.0:
            raise ValueError(f"scale_tolerance must be >= 1, got {scale_tolerance}")
        if int(analysis_size) < 2 * MIN_SIDE:
            raise ValueError(f"analysis_size must be >= {2 * MIN_SIDE}, got {analysis_size}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.padding = padding
        self.size, self.enabled, self.mirror = int(size), bool(enabled), bool(mirror)
        self.zoom, self.scale_tolerance, self.analysis_size = float(zoom), float(scale_tolerance), int(analysis_size)
        self.nominal_size_ = self.nominal_length_ = self.round_ = self.template_ = None

    # -- fitting ---------------------------------------------------------------

    def fit(self, images) -> "Aligner":
        """Learn the nominal size, shape and polarity from good parts.

        Args:
            images: ``[H, W]`` gray / ``[H, W, 3]`` BGR arrays, coerced by :func:`dinopatch.data.as_image`.

        Returns:
            self
        """
        images = [as_image(im) for im in images]
        if not images:
            raise ValueError("Aligner.fit needs at least one image, got none")
        if not self.enabled:
            return self
        parts = [p for p in (self._measure(im) for im in images) if not p.reason]
        if not parts:
            raise ValueError(f"no part outline found in any of the {len(images)} nominal images; "
                             "use align=False for fixtured parts and textures")
        self.nominal_size_ = float(np.median([p.sigma / p.frame for p in parts]))
        self.nominal_length_ = float(np.median([p.length for p in parts]))
        self.round_ = bool(np.median([p.elongation for p in parts]) > _ROUND)
        for p in parts if self.round_ else ():
            p.axis = np.array([1.0, 0.0])
        sils = np.stack([self._silhouette(p) for p in parts])
        # Start from the sign of the mass skew, then let each sample take the
        # orientation that best matches the mean (as k-means with one centre).
        oriented = [_orient(s, o) for s, o in zip(sils, map(self._skew_orientation, sils))]
        self.template_ = np.mean(oriented, axis=0)
        for _ in range(3):
            self.template_ = np.mean([_orient(s, self._best_orientation(s)) for s in sils], axis=0)
        return self

    def _skew_orientation(self, sil: np.ndarray) -> tuple[bool, bool]:
        x = np.arange(_TEMPLATE) - (_TEMPLATE - 1) / 2
        flip = float(sil.sum(0) @ x ** 3) < 0
        mirror = self.mirror and float(_orient(sil, (flip, False)).sum(1) @ x ** 3) < 0
        return flip, mirror

    def _best_orientation(self, sil: np.ndarray) -> tuple[bool, bool]:
        options = [(f, m) for m in ((False, True) if self.mirror else (False,)) for f in (False, True)]
        return max(options, key=lambda o: float((_orient(sil, o) * self.template_).sum()))

    # -- transform -------------------------------------------------------------

    def transform(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, Alignment]:
        """Warp one image into the canonical frame.

        Args:
            image: ``[H, W]`` gray or ``[H, W, 3]`` BGR, coerced by :func:`dinopatch.data.as_image`.

        Returns:
            canonical uint8 ``[size, size, 3]`` BGR, validity float32
            ``[size, size]`` (1 where the pixel came from inside the image, 0
            from padding), and the :class:`Alignment`.
        """
        image = as_image(image)
        s = self.size
        if not self.enabled:
            h, w = image.shape[:2]
            interp = cv2.INTER_AREA if s * s < h * w else cv2.INTER_CUBIC
            canon = cv2.resize(image, (s, s), interpolation=interp)
            m = np.array([[s / w, 0, 0.5 * s / w - 0.5], [0, s / h, 0.5 * s / h - 0.5]])
            al = Alignment(0.0, float(s / np.sqrt(h * w)), ((w - 1) / 2, (h - 1) / 2), False, False, True, "", m)
            return _bgr(canon), np.ones((s, s), np.float32), al
        _, m, (centre, scale, orient), reason = self._place(image)
        canon, valid = _warp(image, m, s, self.padding)
        x_dir = np.linalg.inv(m[:, :2])[:, 0]
        angle = float(np.degrees(np.arctan2(x_dir[1], x_dir[0])) % 360.0)
        al = Alignment(angle, float(scale), (float(centre[0]), float(centre[1])), orient[0], orient[1],
                       not reason, reason, m)
        return _bgr(canon), valid, al

    def silhouette(self, image: np.ndarray) -> np.ndarray | None:
        """The part's filled outline, as :meth:`transform` places it, in the canonical frame.

        Args:
            image: ``[H, W]`` gray or ``[H, W, 3]`` BGR, coerced by :func:`dinopatch.data.as_image`.

        Returns:
            float32 ``[size, size]`` in [0, 1]; None where the pose is not trusted
            (or alignment is off): there is no part to place.
        """
        image = as_image(image)
        if not self.enabled:
            return None
        part, m, _, reason = self._place(image)
        if reason:
            return None
        return cv2.warpAffine(part.silhouette, _compose(m, part.to_input), (self.size, self.size),
                              flags=cv2.INTER_LINEAR)

    def _place(self, image: np.ndarray) -> tuple[Part, np.ndarray, tuple, str]:
        """The measured part, its input -> canonical matrix, the pose ``(centre, scale, orientation)``
        it was made from, and why the pose is not trusted ("")."""
        if self.template_ is None:
            raise RuntimeError("this Aligner is not fitted yet: call fit(images) first")
        s = self.size
        part = self._measure(image)
        reason = part.reason or self._doubt(part)
        if reason:  # a centred resize of the whole image
            h, w = image.shape[:2]
            centre, axis, scale = np.array([(w - 1) / 2, (h - 1) / 2]), np.array([1.0, 0.0]), s / max(h, w)
            orient = (False, False)
        else:
            centre, axis, scale = part.centre, part.axis, self._scale(part)
            orient = self._best_orientation(self._silhouette(part))
        return part, _canonical_matrix(centre, axis, scale, orient, s), (centre, scale, orient), reason

    def _scale(self, part: Part) -> float:
        return self.zoom * self.size / (self.nominal_length_ * part.sigma)

    def _doubt(self, part: Part) -> str:
        # Relative to the frame, so that the same scene at another resolution is the same size.
        ratio = part.sigma / part.frame / self.nominal_size_
        if not 1 / self.scale_tolerance <= ratio <= self.scale_tolerance:
            return f"part size {ratio:.2f} x nominal, outside the tolerance {self.scale_tolerance:g}"
        if part.elongation > _ROUND and not self.round_:
            return f"near-round outline (axis ratio {part.elongation:.2f}): principal axis undefined"
        return ""

    def _silhouette(self, part: Part) -> np.ndarray:
        """The part's silhouette at the template side, at nominal canonical scale, unoriented."""
        m = _canonical_matrix(part.centre, part.axis, self._scale(part) * _TEMPLATE / self.size, (False, False),
                              _TEMPLATE)
        return cv2.warpAffine(part.silhouette, _compose(m, part.to_input), (_TEMPLATE, _TEMPLATE),
                              flags=cv2.INTER_LINEAR)

    def _measure(self, image: np.ndarray) -> Part:
        part = measure_part(image, self.analysis_size)
        if self.round_:  # the axis of a round part is noise: keep the image's own x axis
            part.axis = np.array([1.0, 0.0])
        return part

    # -- inverse ---------------------------------------------------------------

    def inverse_map(self, amap: np.ndarray, alignment: Alignment, shape) -> np.ndarray:
        """Bring a canonical-frame map back to the input frame.

        Args:
            amap: float ``[size, size]`` map in the canonical frame.
            alignment: the :class:`Alignment` its image was transformed with.
            shape: shape of the input image (``(H, W)`` or ``(H, W, C)``).

        Returns:
            float32 ``[H, W]``; zero where the input lies outside the canonical frame.
        """
        amap = np.asarray(amap, dtype=np.float32)
        if amap.shape != (self.size, self.size):
            raise ValueError(f"map of shape {amap.shape} is not the canonical [{self.size}, {self.size}]")
        h, w = (int(v) for v in tuple(shape)[:2])
        if h < 1 or w < 1:
            raise ValueError(f"target shape {tuple(shape)} is empty")
        if not self.enabled:
            return cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
        return cv2.warpAffine(amap, np.asarray(alignment.matrix, np.float64), (w, h),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)

    # -- persistence -----------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything :meth:`fit` learned and the constructor arguments, JSON-serialisable."""
        return {"version": _STATE_VERSION, "size": self.size, "enabled": self.enabled, "mirror": self.mirror,
                "zoom": self.zoom, "scale_tolerance": self.scale_tolerance, "analysis_size": self.analysis_size,
                "padding": self.padding,
                "nominal_size": self.nominal_size_, "nominal_length": self.nominal_length_, "round": self.round_,
                "template": None if self.template_ is None else self.template_.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Aligner":
        """The :class:`Aligner` that :meth:`state_dict` described."""
        if not isinstance(state, dict) or state.get("version") not in (2, _STATE_VERSION):
            raise ValueError(f"not an Aligner state of version 2 or {_STATE_VERSION}: "
                             f"{state.get('version') if isinstance(state, dict) else type(state).__name__}")
        try:
            al = cls(size=state["size"], enabled=state["enabled"], mirror=state["mirror"], zoom=state["zoom"],
                     scale_tolerance=state["scale_tolerance"], analysis_size=state["analysis_size"],
                     padding=state["padding"] if state["version"] >= 3 else "reflect")
            if state["template"] is not None:
                template = np.asarray(state["template"], np.float64)
                if template.shape != (_TEMPLATE, _TEMPLATE):
                    raise ValueError(f"template of shape {template.shape}, expected ({_TEMPLATE}, {_TEMPLATE})")
                al.template_ = template
                al.nominal_size_ = float(state["nominal_size"])
                al.nominal_length_ = float(state["nominal_length"])
                al.round_ = bool(state["round"])
                # A zero or non-finite nominal size divides by zero, or trusts no part, at predict time.
                if not (np.isfinite(template).all() and 0 < al.nominal_size_ <= 1 and 0 < al.nominal_length_ < 1e6):
                    raise ValueError(f"nominal size {al.nominal_size_!r} or length {al.nominal_length_!r} "
                                     "out of range, or a non-finite template")
        except KeyError as e:
            raise ValueError(f"Aligner state lacks {e}") from None
        return al


def _bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2x3 affine ``a`` after ``b``."""
    return (np.vstack([a, [0, 0, 1]]) @ np.vstack([b, [0, 0, 1]]))[:2]


def _canonical_matrix(centre, axis, scale, orient, size) -> np.ndarray:
    """Input -> canonical: ``axis`` to +x (turned/mirrored per ``orient``), ``centre`` to the frame's centre."""
    flip, mirror = orient
    f = np.diag([-1.0 if flip else 1.0, (-1.0 if flip else 1.0) * (-1.0 if mirror else 1.0)])
    ux, uy = axis
    a = scale * f @ np.array([[ux, uy], [-uy, ux]])
    return np.hstack([a, ((size - 1) / 2 - a @ np.asarray(centre))[:, None]])


def _orient(sil: np.ndarray, orient) -> np.ndarray:
    """A canonical silhouette turned by 180 degrees and/or mirrored about its axis."""
    flip, mirror = orient
    if flip:
        sil = sil[::-1, ::-1]
    return sil[::-1] if mirror else sil


def _warp(image: np.ndarray, m: np.ndarray, size: int, padding: str = "reflect") -> tuple[np.ndarray, np.ndarray]:
    """Warp to ``size x size``, padded as ``padding`` says; also the validity of each canonical pixel."""
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    # warpAffine does not low-pass: halve until the warp is about 1:1 (2x2 means,
    # INTER_AREA's fast path for even sides; the odd last row/column is dropped).
    while scale < 0.7 and min(image.shape[:2]) >= 2:
        h, w = image.shape[:2]
        image = cv2.resize(image[:h // 2 * 2, :w // 2 * 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        m, scale = _compose(m, np.array([[2.0, 0, 0.5], [0, 2.0, 0.5]])), 2 * scale
    if padding == "reflect":
        canon = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    else:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).reshape(-1, *image.shape[2:])
        level = np.median(border, axis=0).reshape(-1).tolist()
        canon = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=level + level[-1:] * (4 - len(level)))
    ones = np.ones(image.shape[:2], np.uint8)
    valid = cv2.warpAffine(ones, m, (size, size), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0)
    return canon, valid.astype(np.float32)
