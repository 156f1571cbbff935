"""Alignment of parts to a canonical pose, and the judgement of what the pose normalises away.

The part's outline is found at a reduced resolution (:mod:`.outline`): its
moments give the centre, principal axis and size. The rotation (and, with
``mirror=True``, the face) is then found against a nominal template, the mean
image of the good parts in their common pose, built iteratively in
:meth:`Aligner.fit` (align to the template, rebuild it, repeat): all angles in
one polar cross-correlation for round parts, a window around the principal
axis (either way) for elongated ones, then refined below a pixel and a degree
(:mod:`.pose`). The full resolution image is warped once into the square
canonical frame, padded where the frame leaves the image (with a validity
mask): by reflection, or with the background level of the image's border.

What a line must still judge is kept: the part's size against the nominal
range, how clearly the best pose beat the next (peak ratio), how well the
aligned part matches the template (residual), and other objects anywhere in
the image. Each is checked against its range among the good parts; a part
outside one is not trusted (``aligned=False`` in the detector's Result), with
a reason. A template that looks the same turned by ``360/N`` degrees is
recognised at fit, and poses are compared modulo that angle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .data import as_image
from .outline import MIN_SIDE, Part, measure_part
from .pose import MAX_FOLD, SIDE, PolarTemplate, Refiner, Residual, crop, pose_matrix
from .pose_ranges import MAX_RATIO, PoseEvidence
from .register import FLAT, Registration, check_register, flat, flat_level, gray

__all__ = ["Aligner", "Alignment", "Placement"]

_STATE_VERSION = 4  # 4: image template, symmetry, and the good parts' pose evidence
PADDINGS = ("reflect", "background")
_TEMPLATE = 64           # side of the silhouettes that give elongated parts their first orientation
_ROUND = 0.85            # minor/major eigenvalue ratio above which the axis is undefined
_WINDOW = 20.0           # degrees either side of the principal axis searched on elongated parts
_CLEAR_AXIS = 0.5        # ... whose minor/major eigenvalue ratio is below this (else the axis is searched for)
_ROUNDS = 3              # template rebuilds at fit


@dataclass
class Alignment:
    """How one image was put into the canonical frame.

    Attributes:
        angle: direction of the canonical +x axis in the input, degrees in
            ``[0, 360)`` from the input's +x towards +y.
        scale: canonical pixels per input pixel.
        centre: ``(x, y)`` input point at the centre of the canonical frame.
        flipped: the canonical axis points against the principal axis taken
            towards the input's +x (elongated parts only).
        mirrored: the part was mirrored about its axis (``mirror=True`` only).
        trusted: False where the pose could not be measured reliably, or the
            part's size, pose, match or surroundings lie outside the nominal
            range; the warp is a centred resize of the whole image where no
            pose could be measured.
        reason: why the alignment is not trusted ("" when it is).
        matrix: float64 ``[2, 3]`` forward affine, input pixel -> canonical pixel.
        peak_ratio: best pose's score over the next best pose's (NaN where no pose was searched).
        residual: 1 - correlation of the aligned part with the nominal template (NaN likewise).
        size: the part's size over the nominal size (NaN likewise).
        outside: uint8 ``[h, w]`` mask of objects away from the part, at analysis
            resolution, or None; :meth:`outside_map` puts it in the input frame.
        outside_to_input: ``[2, 3]`` analysis pixel -> input pixel, with ``outside``.
    """

    angle: float
    scale: float
    centre: tuple[float, float]
    flipped: bool
    mirrored: bool
    trusted: bool
    reason: str
    matrix: np.ndarray = field(repr=False)
    peak_ratio: float = float("nan")
    residual: float = float("nan")
    size: float = float("nan")
    outside: np.ndarray | None = field(default=None, repr=False)
    outside_to_input: np.ndarray | None = field(default=None, repr=False)

    def outside_map(self, shape) -> np.ndarray | None:
        """float32 ``[H, W]`` 0/1: the objects away from the part in the input frame ``shape``; None if none."""
        if self.outside is None or not self.outside.any():
            return None
        h, w = (int(v) for v in tuple(shape)[:2])
        return cv2.warpAffine(self.outside.astype(np.float32) / 255, np.asarray(self.outside_to_input), (w, h),
                              flags=cv2.INTER_NEAREST)


@dataclass(frozen=True)
class Placement:
    """One image placed by :meth:`Aligner.place`: what :meth:`Aligner.transform` and :meth:`Aligner.silhouette`
    warp, so that an image both are wanted of is aligned once.

    Attributes:
        image: the input as :func:`dinopatch.data.as_image` coerced it.
        matrix: float64 ``[2, 3]`` forward affine, input pixel -> canonical pixel.
        alignment: the :class:`Alignment` that says it.
        part: the measured outline (None with alignment off).
    """

    image: np.ndarray = field(repr=False)
    matrix: np.ndarray = field(repr=False)
    alignment: Alignment
    part: Part | None = field(default=None, repr=False)


@dataclass
class _Located:
    """A part placed against the template: input -> template-frame matrix and the evidence of the pose."""

    matrix: np.ndarray
    peak_ratio: float
    residual: float
    mirrored: bool
    image: np.ndarray


class Aligner:
    """Warps images of a part into a canonical pose, and judges what that pose hides.

    Args:
        size: side of the canonical frame in pixels.
        enabled: False for fixtured parts and flat textures: images are only
            resized to ``size x size`` (and shifted onto the good parts' place where
            ``register`` says so).
        mirror: parts may lie on either face; resolve mirroring too.
        zoom: fraction of the frame the nominal part's length fills.
        scale_tolerance: a part whose size, relative to the image's longest
            side, differs from the nominal median by more than this factor
            (either way) cannot be placed (a centred resize, not trusted).
        analysis_size: longest side of the image the outline is measured on.
        padding: ``"reflect"``, or ``"background"``: the per-channel median of
            the image's border pixels.
        size_tolerance: smallest half-width of the nominal size range, relative
            (0.03: 0.97-1.03); the range is wider where the good parts' sizes
            vary more. Lines whose camera distance varies widen it.
        register: with ``enabled=False``: ``"auto"`` registers frames by a sub-pixel shift where that
            explains how the good frames differ, ``"on"`` always, ``"off"`` never (:mod:`.register`).

    Attributes (after :meth:`fit`):
        template_: float32 ``[SIDE, SIDE]`` mean gray image of the good parts in their common pose.
        fold_: the template looks the same turned by ``360 / fold_`` degrees (1: no symmetry).
        evidence_: the :class:`.PoseEvidence` of the good parts (size, peak ratio, residual, objects
            away from the part); :meth:`ranges` derives the nominal ranges from it, at fit and on load alike.
        registration_: with ``enabled=False`` and ``register`` not ``"off"``, the :class:`.Registration`.
        flat_level_: with ``enabled=False``, the gray spread below which a frame shows nothing
            (:func:`.register.flat_level` of the good frames).
        report_: the fit-time pose report (not kept in the model file): ``mean_part`` (the template),
            ``misalignment`` (float32 ``[SIDE, SIDE]``: mean absolute difference of the aligned good parts
            from it, each standardised; where parts land apart, in template standard deviations),
            ``symmetry`` (the sentence), ``fold``, ``ranges`` and ``doubtful`` ({index in fit's images:
            reason} for good images without a part or outside the ranges).
    """

    def __init__(self, *, size: int = 448, enabled: bool = True, mirror: bool = False, zoom: float = 0.75,
                 scale_tolerance: float = 1.5, analysis_size: int = 256, padding: str = "reflect",
                 size_tolerance: float = 0.03, register: str = "off"):
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
        if isinstance(size_tolerance, bool) or not 0.0 <= float(size_tolerance) < 1.0:
            raise ValueError(f"size_tolerance must be in [0, 1), got {size_tolerance!r}")
        self.padding = padding
        self.size, self.enabled, self.mirror = int(size), bool(enabled), bool(mirror)
        self.zoom, self.scale_tolerance, self.analysis_size = float(zoom), float(scale_tolerance), int(analysis_size)
        self.size_tolerance = float(size_tolerance)
        self.register = check_register(register, enabled)
        self.registration_: Registration | None = None
        self.flat_level_ = 0.0
        self.nominal_size_ = self.nominal_length_ = self.round_ = self.template_ = None
        self.fold_, self.evidence_, self.report_ = 1, None, None
        self._polar = self._refine = self._residual = None

    # -- fitting ---------------------------------------------------------------

    def fit(self, images) -> "Aligner":
        """Learn the nominal size, shape, template, symmetry and pose ranges from good parts.

        Args:
            images: ``[H, W]`` gray / ``[H, W, 3]`` BGR arrays, coerced by :func:`dinopatch.data.as_image`.

        Returns:
            self
        """
        images = [as_image(im) for im in images]
        if not images:
            raise ValueError("Aligner.fit needs at least one image, got none")
        if not self.enabled:
            frames = [gray(im) for im in images]
            self.flat_level_ = flat_level(frames)
            self.registration_ = None if self.register == "off" else Registration.fit(frames, self.register,
                                                                                     self.flat_level_)
            return self
        measured = [measure_part(im, self.analysis_size) for im in images]
        parts = [p for p in measured if not p.reason]
        if not parts:
            raise ValueError(f"no part outline found in any of the {len(images)} nominal images; "
                             "use align=False for fixtured parts and textures")
        self.nominal_size_ = float(np.median([p.sigma / p.frame for p in parts]))
        self.nominal_length_ = float(np.median([p.length for p in parts]))
        self.round_ = bool(np.median([p.elongation for p in parts]) > _ROUND)
        if self.round_:  # any one part's own pose starts the template
            first = [(0.0, False)] * len(parts)
            start = [parts[0]]
        else:
            first, start = self._first_orientations(parts), parts
        template = np.mean([crop(p.gray, _compose(pose_matrix(p.centre, a, self._scale(p, SIDE), m, SIDE),
                                                  p.to_input)) for p, (a, m) in zip(start, first)], axis=0)
        for _ in range(_ROUNDS):
            self._set_template(template, 1)
            template = np.mean([self._locate(p).image for p in parts], axis=0)
        self._set_template(template, PolarTemplate(template).symmetry())
        located = [self._locate(p) for p in parts]
        self.evidence_ = PoseEvidence({"size": [p.sigma / p.frame / self.nominal_size_ for p in parts],
                                       "peak_ratio": [min(loc.peak_ratio, MAX_RATIO) for loc in located],
                                       "residual": [loc.residual for loc in located],
                                       "stray": [p.stray_area for p in parts]}, self.size_tolerance)
        self.report_ = self._pose_report(measured, parts, located)
        return self

    def _pose_report(self, measured: list[Part], parts: list[Part], located: list[_Located]) -> dict:
        """What fit saw: the mean aligned part, how far the good parts stray from it per location,
        the symmetry and ranges found, and the good images whose pose is doubtful (by index in fit's list)."""
        doubtful, it = {}, iter(zip(parts, located))
        for i, m in enumerate(measured):
            if m.reason:
                doubtful[i] = m.reason
                continue
            part, loc = next(it)
            reason, _ = self._judge(part, loc, part.sigma / part.frame / self.nominal_size_)
            if reason:
                doubtful[i] = reason

        def z(a):  # gain and level of the light removed, as the residual does
            return (a - a.mean()) / max(float(a.std()), 1e-6)

        gap = np.mean([np.abs(z(loc.image) - z(self.template_)) for loc in located], axis=0)
        return {"mean_part": self.template_.copy(), "misalignment": gap.astype(np.float32),
                "symmetry": self.symmetry(), "fold": self.fold_, "ranges": self.ranges(), "doubtful": doubtful}

    def _set_template(self, template: np.ndarray, fold: int) -> None:
        # To a hundredth of a gray level, as the model file keeps it: a loaded model places parts identically.
        self.template_ = np.round(np.asarray(template, np.float64), 2).astype(np.float32)
        self.fold_ = int(fold)
        self._polar = PolarTemplate(self.template_, self.fold_)
        self._refine = Refiner(self.template_)
        self._residual = Residual(self.template_)

    def _first_orientations(self, parts: list[Part]) -> list[tuple[float, bool]]:
        """Angle and mirroring of elongated parts from their silhouettes alone: the sign of the
        mass skew, then each sample in the orientation that best matches the mean (k-means with one centre)."""
        sils = np.stack([self._silhouette(p) for p in parts])
        mean = np.mean([_orient(s, o) for s, o in zip(sils, map(self._skew_orientation, sils))], axis=0)
        options = [(f, m) for m in ((False, True) if self.mirror else (False,)) for f in (False, True)]
        for _ in range(3):
            best = [max(options, key=lambda o: float((_orient(s, o) * mean).sum())) for s in sils]
            mean = np.mean([_orient(s, o) for s, o in zip(sils, best)], axis=0)
        return [((_axis_angle(p) + 180.0 * f) % 360.0, m) for p, (f, m) in zip(parts, best)]

    def _skew_orientation(self, sil: np.ndarray) -> tuple[bool, bool]:
        x = np.arange(_TEMPLATE) - (_TEMPLATE - 1) / 2
        flip = float(sil.sum(0) @ x ** 3) < 0
        mirror = self.mirror and float(_orient(sil, (flip, False)).sum(1) @ x ** 3) < 0
        return flip, mirror

    def _silhouette(self, part: Part) -> np.ndarray:
        """The part's silhouette at the template side, at nominal scale, along its axis."""
        m = pose_matrix(part.centre, _axis_angle(part), self._scale(part, _TEMPLATE), False, _TEMPLATE)
        return cv2.warpAffine(part.silhouette, _compose(m, part.to_input), (_TEMPLATE, _TEMPLATE),
                              flags=cv2.INTER_LINEAR)

    def _locate(self, part: Part) -> _Located:
        """The part's pose against the template: rotation search, then refinement."""
        scale = self._scale(part, SIDE)
        upright = crop(part.gray, _compose(pose_matrix(part.centre, 0.0, scale, False, SIDE), part.to_input))
        axis = _axis_angle(part)
        clear = not self.round_ and part.elongation < _CLEAR_AXIS
        windows = [(axis, _WINDOW), (axis + 180.0, _WINDOW)] if clear else None
        pose = self._polar.search(upright, self.mirror, windows)
        m = pose_matrix(part.centre, pose.angle, scale, pose.mirrored, SIDE)
        m = _compose(self._refine(crop(part.gray, _compose(m, part.to_input))), m)
        image = crop(part.gray, _compose(m, part.to_input))
        return _Located(m, pose.peak_ratio, self._residual(image), pose.mirrored, image)

    # -- nominal ranges ----------------------------------------------------------

    def ranges(self) -> dict:
        """The nominal ranges the good parts' evidence gives (see :meth:`.PoseEvidence.ranges`)."""
        if self.evidence_ is None:
            raise RuntimeError("this Aligner is not fitted yet: call fit(images) first")
        return self.evidence_.ranges()

    def symmetry(self) -> str:
        """The symmetry found at fit, said once."""
        if self.fold_ <= 1:
            return "no rotational symmetry: poses compared over the full turn"
        return f"symmetric under {self.fold_}-fold rotation: poses compared modulo {360 / self.fold_:g} degrees"

    def describe(self, names=None) -> str:
        """Lines a person reads about fit's pose report: the symmetry, the nominal size range and the good
        images whose pose was doubtful, by ``names`` (fit's images in order; default ``#index``).  "" where
        there is no report (an aligner loaded from a file, or alignment and registration off)."""
        if self.registration_ is not None:
            return f"registration: {self.registration_.describe()}"
        if self.report_ is None:
            return ""
        lo, hi = self.report_["ranges"]["size"]
        doubtful = self.report_["doubtful"]
        lines = [f"pose: {self.report_['symmetry']}; size {lo:.2f}-{hi:.2f} of the good parts' median; "
                 f"{len(doubtful)} good image{'s' * (len(doubtful) != 1)} doubtful"]
        return "\n".join(lines + [f"  {names[i] if names else f'#{i}'}: {why}" for i, why in doubtful.items()])

    def padded(self, padding: str) -> "Aligner":
        """This fitted aligner padding frames with ``padding`` (one of :data:`PADDINGS`) instead; fit's report kept."""
        other = Aligner.from_state_dict(dict(self.state_dict(), padding=padding))
        other.report_ = self.report_
        return other

    # -- transform -------------------------------------------------------------

    def place(self, image: np.ndarray) -> Placement:
        """Measure one image's pose (the costly step of :meth:`transform`), warping nothing yet.

        Args:
            image: ``[H, W]`` gray or ``[H, W, 3]`` BGR, coerced by :func:`dinopatch.data.as_image`.
        """
        image = as_image(image)
        if not self.enabled:
            s, (h, w) = self.size, image.shape[:2]
            m = _resized(s / w, s / h)
            small = gray(image)
            reason = "nothing in the frame: it is flat" if flat(small, self.flat_level_) else ""
            if self._registered and not reason:  # resized to the template's side, registered, resized to the frame's
                pose, reason = self.registration_.locate(small)
                m = _compose(_resized(s / SIDE), _compose(pose, _resized(SIDE / w, SIDE / h)))
            inv = cv2.invertAffineTransform(m)
            centre = inv @ [(s - 1) / 2, (s - 1) / 2, 1.0]
            al = Alignment(float(np.degrees(np.arctan2(inv[1, 0], inv[0, 0])) % 360.0), float(s / np.sqrt(h * w)),
                           (float(centre[0]), float(centre[1])), False, False, not reason, reason, m)
            return Placement(image, m, al)
        part, m, al = self._place(image)
        return Placement(image, m, al, part)

    def transform(self, image) -> tuple[np.ndarray, np.ndarray, Alignment]:
        """Warp one image into the canonical frame.

        Args:
            image: ``[H, W]`` gray or ``[H, W, 3]`` BGR, coerced by :func:`dinopatch.data.as_image`; or
                its :class:`Placement` by this aligner (or one :meth:`padded` from it).

        Returns:
            canonical uint8 ``[size, size, 3]`` BGR, validity float32
            ``[size, size]`` (1 where the pixel came from inside the image, 0
            from padding), and the :class:`Alignment`.
        """
        placed = image if isinstance(image, Placement) else self.place(image)
        s = self.size
        if not self.enabled and not self._registered:
            h, w = placed.image.shape[:2]
            interp = cv2.INTER_AREA if s * s < h * w else cv2.INTER_CUBIC
            canon = cv2.resize(placed.image, (s, s), interpolation=interp)
            return _bgr(canon), np.ones((s, s), np.float32), placed.alignment
        canon, valid = _warp(placed.image, placed.matrix, s, self.padding)
        return _bgr(canon), valid, placed.alignment

    def silhouette(self, image) -> np.ndarray | None:
        """The part's filled outline, as :meth:`transform` places it, in the canonical frame.

        Args:
            image: ``[H, W]`` gray or ``[H, W, 3]`` BGR, coerced by :func:`dinopatch.data.as_image`; or
                its :class:`Placement` by this aligner (or one :meth:`padded` from it).

        Returns:
            float32 ``[size, size]`` in [0, 1]; None where the pose is not trusted
            (or alignment is off): there is no part to place.
        """
        placed = image if isinstance(image, Placement) else self.place(image)
        if placed.part is None or not placed.alignment.trusted:
            return None
        return cv2.warpAffine(placed.part.silhouette, _compose(placed.matrix, placed.part.to_input),
                              (self.size, self.size), flags=cv2.INTER_LINEAR)

    def _place(self, image: np.ndarray) -> tuple[Part, np.ndarray, Alignment]:
        """The measured part, its input -> canonical matrix and the :class:`Alignment` that says it."""
        if self.template_ is None:
            raise RuntimeError("this Aligner is not fitted yet: call fit(images) first")
        s = self.size
        part = measure_part(image, self.analysis_size)
        reason = part.reason or self._unplaceable(part)
        if reason:  # a centred resize of the whole image
            h, w = image.shape[:2]
            m = pose_matrix(((w - 1) / 2, (h - 1) / 2), 0.0, s / max(h, w), False, s)
            return part, m, Alignment(0.0, s / max(h, w), ((w - 1) / 2, (h - 1) / 2), False, False, False,
                                      reason, m)
        loc = self._locate(part)
        f = s / SIDE  # the template frame, pixel centres kept, resized to the canonical frame
        m = _compose(_resized(f), loc.matrix)
        inv = cv2.invertAffineTransform(m)
        angle = float(np.degrees(np.arctan2(inv[1, 0], inv[0, 0])) % 360.0)
        centre = inv @ [(s - 1) / 2, (s - 1) / 2, 1.0]
        flipped = not self.round_ and abs((angle - _axis_angle(part) + 180.0) % 360.0 - 180.0) > 90.0
        size = part.sigma / part.frame / self.nominal_size_
        reason, stray = self._judge(part, loc, size)
        al = Alignment(angle, float(np.sqrt(abs(np.linalg.det(m[:, :2])))), (float(centre[0]), float(centre[1])),
                       flipped, loc.mirrored, not reason, reason, m, float(loc.peak_ratio), float(loc.residual),
                       float(size), part.stray if stray else None, part.to_input)
        return part, m, al

    def _scale(self, part: Part, side: int) -> float:
        return self.zoom * side / (self.nominal_length_ * part.sigma)

    def _unplaceable(self, part: Part) -> str:
        # Relative to the frame, so that the same scene at another resolution is the same size.
        ratio = part.sigma / part.frame / self.nominal_size_
        if not 1 / self.scale_tolerance <= ratio <= self.scale_tolerance:
            return f"part size {ratio:.2f} x nominal, outside the tolerance {self.scale_tolerance:g}"
        if part.elongation > _ROUND and not self.round_:
            return f"near-round outline (axis ratio {part.elongation:.2f}): principal axis undefined"
        return ""

    def _judge(self, part: Part, loc: _Located, size: float) -> tuple[str, bool]:
        """Why a placed part is not trusted ("" if it is), and whether an object lies away from it."""
        stray, at = part.stray_area, None
        if stray > 0:
            ys, xs = np.nonzero(part.stray)
            at = part.to_input @ [xs.mean(), ys.mean(), 1.0]
        return self.evidence_.judge(size, loc.peak_ratio, loc.residual, stray, at)

    @property
    def _registered(self) -> bool:
        return self.registration_ is not None and self.registration_.used

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
        if not self.enabled and not self._registered:
            return cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
        return cv2.warpAffine(amap, np.asarray(alignment.matrix, np.float64), (w, h),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)

    # -- persistence -----------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything :meth:`fit` learned and the constructor arguments, JSON-serialisable."""
        fitted = self.template_ is not None
        return {"version": _STATE_VERSION, "size": self.size, "enabled": self.enabled, "mirror": self.mirror,
                "zoom": self.zoom, "scale_tolerance": self.scale_tolerance, "analysis_size": self.analysis_size,
                "padding": self.padding, "size_tolerance": self.size_tolerance, "register": self.register,
                "registration": None if self.registration_ is None else self.registration_.state_dict(),
                "flat_level": self.flat_level_,
                "nominal_size": self.nominal_size_, "nominal_length": self.nominal_length_, "round": self.round_,
                "fold": self.fold_,
                "template": np.round(self.template_.astype(np.float64), 2).tolist() if fitted else None,
                "evidence": self.evidence_.values if fitted else None}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Aligner":
        """The :class:`Aligner` that :meth:`state_dict` described; the symmetry is re-derived from the template."""
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        if version in (2, 3):
            raise ValueError(f"an Aligner state of version {version}: fitted by an older DinoPatch whose alignment "
                             f"kept no image template; fit the model again")
        if version != _STATE_VERSION:
            raise ValueError(f"not an Aligner state of version {_STATE_VERSION}: {version}")
        try:
            al = cls(size=state["size"], enabled=state["enabled"], mirror=state["mirror"], zoom=state["zoom"],
                     scale_tolerance=state["scale_tolerance"], analysis_size=state["analysis_size"],
                     padding=state["padding"], size_tolerance=state["size_tolerance"],
                     # States from before registration kept none.
                     register=state.get("register", "off"))
            registration = state.get("registration")
            if (registration is None) != (al.enabled or al.register == "off"):
                raise ValueError(f"a registration state {'where none belongs' if registration else 'missing'} "
                                 f"(alignment {'on' if al.enabled else 'off'}, register={al.register!r})")
            if registration is not None:
                al.registration_ = Registration.from_state_dict(registration)
                if al.registration_.mode != al.register:
                    raise ValueError(f"registration of mode {al.registration_.mode!r} in an aligner with "
                                     f"register={al.register!r}")
            # States from before the flat check hold no level: no frame is flat for them.
            level = state.get("flat_level", 0.0)
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level <= FLAT:
                raise ValueError(f"flat level {level!r} is not a number in [0, {FLAT}]")
            al.flat_level_ = float(level)
            if state["template"] is not None:
                template = np.asarray(state["template"], np.float64)
                if template.shape != (SIDE, SIDE) or not np.isfinite(template).all():
                    raise ValueError(f"template of shape {template.shape}, expected finite ({SIDE}, {SIDE})")
                al.nominal_size_ = float(state["nominal_size"])
                al.nominal_length_ = float(state["nominal_length"])
                al.round_ = bool(state["round"])
                # A zero or non-finite nominal size divides by zero, or trusts no part, at predict time.
                if not (0 < al.nominal_size_ <= 1 and 0 < al.nominal_length_ < 1e6):
                    raise ValueError(f"nominal size {al.nominal_size_!r} or length {al.nominal_length_!r} "
                                     "out of range")
                al.evidence_ = PoseEvidence(state["evidence"], al.size_tolerance)
                fold = state["fold"]
                if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= MAX_FOLD:
                    raise ValueError(f"fold {fold!r} is not an integer in [1, {MAX_FOLD}]")
                found = PolarTemplate(template.astype(np.float32)).symmetry()
                if found != fold:
                    raise ValueError(f"the template is {found}-fold symmetric, the state says {fold}")
                al._set_template(template, fold)
        except KeyError as e:
            raise ValueError(f"Aligner state lacks {e}") from None
        return al


def _axis_angle(part: Part) -> float:
    return float(np.degrees(np.arctan2(part.axis[1], part.axis[0])) % 360.0)


def _bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2x3 affine ``a`` after ``b``."""
    out = np.asarray(a, np.float64)[:, :2] @ np.asarray(b, np.float64)
    out[:, 2] += a[:, 2]
    return out


def _resized(sx: float, sy: float | None = None) -> np.ndarray:
    """The 2x3 affine of a resize by ``sx`` across and ``sy`` (default ``sx``) down, pixel centres kept."""
    sy = sx if sy is None else sy
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]])


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
        m, scale = _compose(m, _resized(2.0)), 2 * scale
    h, w = image.shape[:2]
    inv = cv2.invertAffineTransform(m)
    reach = _reach(inv, size)
    if padding == "reflect":
        canon = _warp_reflected(image, m, inv, size, reach)
    else:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).reshape(-1, *image.shape[2:])
        level = np.median(border, axis=0).reshape(-1).tolist()
        canon = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=level + level[-1:] * (4 - len(level)))
    if reach.min() >= 0 and reach[0].max() <= w - 1 and reach[1].max() <= h - 1:
        return canon, np.ones((size, size), np.float32)  # the frame lies within the image
    return canon, _validity(inv, h, w, size)


def _validity(inv: np.ndarray, h: int, w: int, size: int) -> np.ndarray:
    """float32 ``[size, size]``: 1 where the frame pixel's nearest input pixel lies within the ``h x w`` image
    (``inv``: the frame -> input affine), as a nearest-neighbour warp of an all-ones image gives it.

    The frame's rows cross the image in one span each, from two bounds per input axis: filling the spans
    costs a third of that warp."""
    lo, hi = np.zeros(size), np.full(size, float(size))
    rows = np.arange(size, dtype=np.float64)
    for (a, b, c), n in zip(inv, (w, h)):
        start = b * rows + c  # the input coordinate along row y is a x + start[y]; inside: [-0.5, n - 0.5)
        if a == 0:
            hi[(start < -0.5) | (start >= n - 0.5)] = 0
            continue
        first, last = (-0.5 - start) / a, (n - 0.5 - start) / a  # where the row enters and leaves the span
        if a > 0:  # x >= first and x < last
            lo, hi = np.maximum(lo, np.ceil(first)), np.minimum(hi, np.ceil(last))
        else:  # x <= first and x > last
            lo, hi = np.maximum(lo, np.floor(last) + 1), np.minimum(hi, np.floor(first) + 1)
    lo = np.minimum(lo, size)
    hi = np.maximum(hi, lo)
    runs = np.empty((size, 3), np.intp)  # each row: lo zeros, hi - lo ones, size - hi zeros
    runs[:, 0], runs[:, 1], runs[:, 2] = lo, hi - lo, size - hi
    values = np.zeros(3 * size, np.float32)
    values[1::3] = 1
    return np.repeat(values, runs.ravel()).reshape(size, size)


def _reach(inv: np.ndarray, size: int) -> np.ndarray:
    """float64 ``[2, 4]``: the input points that the corners of the ``size x size`` frame come from (``inv``: the
    frame -> input affine)."""
    corners = np.array([[0, size - 1, 0, size - 1], [0, 0, size - 1, size - 1], [1, 1, 1, 1]], np.float64)
    return inv @ corners


def _warp_reflected(image: np.ndarray, m: np.ndarray, inv: np.ndarray, size: int, reach: np.ndarray) -> np.ndarray:
    """``warpAffine`` to ``size x size`` with ``BORDER_REFLECT_101``, by way of the image padded by reflection
    as far as the frame reaches (:func:`_reach`; ``inv``: ``m`` inverted), then warped with a constant border:
    OpenCV's constant-border warp is about twice as fast as its reflecting one, and the two agree to a gray level
    (interpolation rounding)."""
    h, w = image.shape[:2]
    # Bilinear reads the pixel at floor(x) and the next one: a pixel more either side covers both.
    left, top = (max(0, 1 - int(np.floor(v))) for v in reach.min(axis=1))
    right = max(0, int(np.ceil(reach[0].max())) + 2 - w)
    bottom = max(0, int(np.ceil(reach[1].max())) + 2 - h)
    if (h + top + bottom) * (w + left + right) > 4 * (size * size + h * w):  # a sliver of an image, shrunk
        return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    # Colour goes through the warp as BGRA: OpenCV's 4-channel warp gives the 3-channel one's pixels, a few percent
    # faster than it even with the two conversions.
    colour = image.ndim == 3
    if colour:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    if left or top or right or bottom:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_REFLECT_101)
        inv = inv.copy()
        inv[:, 2] += (left, top)
    canon = cv2.warpAffine(image, inv, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT)
    return cv2.cvtColor(canon, cv2.COLOR_BGRA2BGR) if colour else canon

