"""Registration of fixtured frames: the sub-pixel shift and sub-degree turn that put a frame on the good parts'
mean image.

Without alignment (``align=False``) the frame is the part's pose, but a fixture
still lets a part move by a few pixels, and a per-location bank then compares a
thin trace with the board beside it: a good part scores like a defect, and the
threshold set by the worst good part passes real ones.

At fit, the good frames, gray at ``SIDE x SIDE``, are registered to their mean
image, a shift found by phase correlation then refined below a pixel and a
degree (:class:`.pose.Refiner`), and the mean rebuilt from the registered
frames, :data:`ROUNDS` times.  Registration is used (``register="auto"``) where it
explains how the good frames differ: each frame's residual against the mean of
the others (1 - normalised correlation, leave one out) falls, in median, below
its unregistered value and to at most :data:`RESIDUAL`.  A texture, whose
frames differ everywhere whatever the shift, stays unregistered.

At predict, a frame's pose against the mean image moves it onto the good
parts' place.  A frame shifted further than the good parts ever were (beyond
:data:`REACH` times their largest shift, at least :data:`MIN_REACH` pixels), or
one with nothing to correlate, is not trusted: the padding it would need hides
part of the part.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .pose import SIDE, Refiner

MODES = ("auto", "on", "off")
ROUNDS = 3
RESIDUAL = 0.1       # the registered good frames correlate at >= 0.9 with the mean of the others
REACH = 2.0          # a frame may move this many times further than the furthest good frame ...
MIN_REACH = 2.0      # ... and at least this many SIDE pixels (a fixture whose good parts never moved)
MIN_FRAMES = 3       # a mean of the others needs two frames
# Gray standard deviation (levels, at SIDE px) below which a frame shows nothing (a covered lens, no light),
# where the good frames show something: under FLAT_SHARE of their median spread (a plain panel's good
# frames are nearly flat themselves).
FLAT = 2.0
FLAT_SHARE = 0.25
_NOTHING = 1e-3  # below this spread there is nothing to correlate at all
_WINDOW = cv2.createHanningWindow((SIDE, SIDE), cv2.CV_32F)
_IDENTITY = np.eye(2, 3)


def check_register(mode, align: bool) -> str:
    """A valid ``register`` parameter; ``"on"`` needs ``align=False`` (aligned parts are placed by their outline)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"register must be one of {MODES}, got {mode!r}")
    if mode == "on" and align:
        raise ValueError("register='on' registers fixtured frames (align=False); align=True places each part by "
                         "its outline and refines that pose against the good parts already")
    return mode


def gray(image: np.ndarray) -> np.ndarray:
    """float32 ``[SIDE, SIDE]`` gray of a ``[H, W]`` or ``[H, W, 3]`` uint8 frame, stretched to the square as the
    fixtured frame is."""
    g = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return cv2.resize(g, (SIDE, SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def flat_level(frames) -> float:
    """The gray spread below which a frame shows nothing, for good ``frames`` (:func:`gray`) like these."""
    return min(FLAT, FLAT_SHARE * float(np.median([f.std() for f in frames])))


def flat(frame: np.ndarray, level: float) -> bool:
    """A gray ``frame`` (:func:`gray`) whose spread is below ``level`` (:func:`flat_level`)."""
    return float(frame.std()) < level


def shift_of(template: np.ndarray, frame: np.ndarray) -> np.ndarray | None:
    """float64 ``[2]`` ``(dx, dy)``: where ``frame`` shows ``template``'s content moved to (``SIDE`` pixels); None
    where a frame has nothing to correlate."""
    if flat(frame, _NOTHING) or flat(template, _NOTHING):
        return None
    (dx, dy), _ = cv2.phaseCorrelate(template, frame, _WINDOW)
    return np.array([dx, dy]) if math.isfinite(dx) and math.isfinite(dy) else None


def warped(frame: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``frame`` ``[SIDE, SIDE]`` warped by the frame -> template ``matrix``, edges reflected."""
    return cv2.warpAffine(frame, matrix, (SIDE, SIDE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def pose_of(template: np.ndarray, refiner: Refiner, frame: np.ndarray) -> np.ndarray | None:
    """float64 ``[2, 3]`` frame -> template matrix (``SIDE`` pixels) of a gray ``frame``: phase correlation's
    shift, refined against ``template`` by its ``refiner``; None where the frame has nothing to correlate."""
    shift = shift_of(template, frame)
    if shift is None:
        return None
    coarse = np.array([[1.0, 0, -shift[0]], [0, 1.0, -shift[1]], [0, 0, 1]])
    return (np.vstack([refiner(warped(frame, coarse[:2])), [0, 0, 1]]) @ coarse)[:2]


def displacement(matrix: np.ndarray) -> np.ndarray:
    """float64 ``[2]``: where the frame -> template ``matrix`` finds the template's centre in the frame, from it."""
    c = (SIDE - 1) / 2
    return cv2.invertAffineTransform(matrix) @ [c, c, 1.0] - c


def leave_one_out_residual(frames: np.ndarray) -> float:
    """Median over ``frames`` ``[n, SIDE, SIDE]`` of 1 - the normalised correlation of each with the others' mean."""
    total = frames.sum(axis=0, dtype=np.float64)
    out = []
    for f in frames.astype(np.float64):
        a, b = (total - f) / (len(frames) - 1), f
        a, b = a - a.mean(), b - b.mean()
        out.append(1.0 - float((a * b).sum()) / max(math.sqrt(float((a * a).sum() * (b * b).sum())), 1e-12))
    return float(np.median(out))


def registers(before: float, after: float) -> bool:
    """``register="auto"``'s rule: registration explains the good frames' differences (see the module's text)."""
    return after < before and after <= RESIDUAL


class Registration:
    """What fit learned of the good frames' place, and the shift of each new frame.

    Attributes:
        template: float32 ``[SIDE, SIDE]`` mean gray of the registered good frames; None where not used.
        shifts: float64 ``[n, 2]`` each good frame's displacement from the template (``SIDE`` pixels).
        residual_before, residual_after: :func:`leave_one_out_residual` of the good frames as they came and
            registered: the evidence of :func:`registers`.
        used: frames are registered (``mode="on"``, or ``"auto"`` where :func:`registers` says so).
    """

    def __init__(self, mode: str, template, shifts, residual_before: float, residual_after: float):
        self.mode = check_register(mode, False)
        # Rounded as the model file keeps them, so that a loaded model registers as the fitted one did.
        self.shifts = np.round(np.asarray(shifts, np.float64).reshape(-1, 2), 4)
        self.residual_before, self.residual_after = round(float(residual_before), 6), round(float(residual_after), 6)
        self.used = mode == "on" or (mode == "auto" and registers(self.residual_before, self.residual_after))
        self.template = None if template is None else np.round(np.asarray(template, np.float64), 2).astype(np.float32)
        if not (np.isfinite(self.shifts).all() and np.abs(self.shifts).max(initial=0) <= SIDE):
            raise ValueError(f"registration shifts must be finite and within the {SIDE} px frame")
        for name, v in (("before", self.residual_before), ("after", self.residual_after)):
            if not 0.0 <= v <= 2.0:
                raise ValueError(f"registration residual {name} {v!r} is not in [0, 2]")
        if (self.template is None) == self.used:
            raise ValueError(f"a registration that is {'' if self.used else 'not '}used must "
                             f"{'' if self.used else 'not '}hold its template")
        if self.template is not None and (self.template.shape != (SIDE, SIDE)
                                          or not np.isfinite(self.template).all()):
            raise ValueError(f"registration template of shape {self.template.shape}, expected finite "
                             f"({SIDE}, {SIDE})")
        # Built once, read-only after: predict's threads share it.
        self._refiner = None if self.template is None else Refiner(self.template)

    @classmethod
    def fit(cls, frames: list[np.ndarray], mode: str, level: float = _NOTHING) -> "Registration":
        """Register the good ``frames`` (:func:`gray`) to their mean (see the module's text); frames flat at
        ``level`` (:func:`flat_level`) are no evidence and left out."""
        count = len(frames)
        frames = [g for g in frames if not flat(g, level)]
        if not frames and mode == "on":
            raise ValueError(f"register='on' needs good frames that show something; all {count} are flat")
        if len(frames) < MIN_FRAMES and mode == "auto":
            return cls(mode, None, np.zeros((len(frames), 2)), 0.0, 0.0)
        frames = np.stack(frames)
        template, moved = frames.mean(axis=0), frames
        for _ in range(ROUNDS):
            refiner = Refiner(template)
            poses = np.stack([_IDENTITY if m is None else m for m in (pose_of(template, refiner, f) for f in frames)])
            poses[:, :, 2] -= np.median(poses[:, :, 2], axis=0)  # the template stays where the good parts sit
            moved = np.stack([warped(f, m) for f, m in zip(frames, poses)])
            template = moved.mean(axis=0)
        shifts = np.stack([displacement(m) for m in poses])
        if len(frames) < MIN_FRAMES:  # "on" with too few frames to measure: registered, evidence empty
            return cls(mode, template, shifts, 0.0, 0.0)
        before, after = leave_one_out_residual(frames), leave_one_out_residual(moved)
        return cls(mode, template if mode == "on" or registers(before, after) else None, shifts, before, after)

    @property
    def reach(self) -> float:
        """The largest shift (``SIDE`` pixels) a trusted frame may have."""
        furthest = float(np.hypot(*self.shifts.T).max(initial=0.0))
        return max(REACH * furthest, MIN_REACH)

    def locate(self, frame: np.ndarray) -> tuple[np.ndarray, str]:
        """The float64 ``[2, 3]`` frame -> template matrix (``SIDE`` pixels) of a gray ``frame`` (:func:`gray`)
        and why it is not trusted ("" if it is; the identity then)."""
        matrix = pose_of(self.template, self._refiner, frame)
        if matrix is None:
            return _IDENTITY, "nothing to register: the frame is flat"
        far = float(np.hypot(*displacement(matrix)))
        if far > self.reach:
            return _IDENTITY, (f"frame shifted {far:.1f} of {SIDE} px from the good parts' place; they lie "
                               f"within {self.reach / REACH:.1f}, registration reaches {self.reach:.1f}")
        return matrix, ""

    def state_dict(self) -> dict:
        """JSON-serialisable; :meth:`from_state_dict` checks it and derives ``used`` again."""
        return {"mode": self.mode, "shifts": self.shifts.tolist(), "residual_before": self.residual_before,
                "residual_after": self.residual_after,
                "template": None if self.template is None
                else np.round(self.template.astype(np.float64), 2).tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Registration":
        if not isinstance(state, dict):
            raise ValueError(f"registration state must be a mapping, got {type(state).__name__}")
        try:
            return cls(state["mode"], state["template"], state["shifts"], state["residual_before"],
                       state["residual_after"])
        except KeyError as e:
            raise ValueError(f"registration state lacks {e}") from None
        except TypeError as e:
            raise ValueError(f"registration state malformed: {e}") from None

    def describe(self) -> str:
        """One line for fit's output."""
        what = f"good frames' residual {self.residual_before:.3f} -> {self.residual_after:.3f} registered"
        if not self.used:
            return f"frames not registered ({what}; registration explains little)"
        return (f"frames registered by shift (good parts moved up to {self.reach / REACH:.1f} of {SIDE} px; "
                f"{what})")
