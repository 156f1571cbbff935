"""The golden set: a few canonical frames every model file carries, with the fp32 reference's scores.

Any engine that claims to run a model must give the same verdicts as the
reference on these frames (:mod:`.engine_choice`).  They are made at fit from
the nominal frames alone:

* *good* frames: the mean of two neighbouring nominal frames, so that none is
  in the bank verbatim (a bank row's own frame scores 0 on every engine and
  would test nothing) and each lies between good parts;
* *defect* frames: those frames with one synthetic defect each
  (:func:`.autotune.paste_defect`, one kind after another).

The verdicts are whatever the reference says: on random weights at 112 px the
defects may all pass; what an engine is checked on is that it says the same.

Scores are the fitted model's image scores with the reference engine (torch
fp32, where torch is installed); verdicts are ``score > threshold.image``.
Arrays in the model file: ``golden_frames`` uint8 ``[G, S, S, 3]``,
``golden_valid`` uint8 ``[G, S, S]``, ``golden_defect`` bool ``[G]``,
``golden_scores`` float64 ``[G]``; the header's ``golden`` holds the reference
engine's name and the verdicts.  :func:`from_state` checks every one and that
the verdicts follow from the scores and the threshold.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from .autotune import KINDS, paste_defect

GOOD = 3
DEFECTS = 3
MAX_FRAMES = 16  # a file may hold at most this many golden frames (a bound on its size)


@dataclasses.dataclass(frozen=True)
class GoldenSet:
    """Canonical frames ``[G, S, S, 3]`` uint8, valid masks ``[G, S, S]``, which carry a pasted defect ``[G]``,
    the reference engine's image scores ``[G]`` and its verdicts ``[G]`` at the fitted threshold."""

    frames: np.ndarray
    valid: np.ndarray
    defect: np.ndarray
    scores: np.ndarray
    verdicts: np.ndarray
    reference: str

    def state(self, threshold: float) -> tuple[dict, dict]:
        """Header entry and arrays of the model file, the verdicts at the ``threshold`` saved with them."""
        return ({"reference": self.reference, "verdicts": [bool(v) for v in self.scores > threshold]},
                {"golden_frames": self.frames, "golden_valid": self.valid.astype(np.uint8),
                 "golden_defect": self.defect, "golden_scores": self.scores.astype(np.float64)})

    @classmethod
    def from_state(cls, record, arrays: dict, image_size: int, threshold: float) -> "GoldenSet":
        """:meth:`state` read back, every value checked (ValueError saying what is wrong)."""
        if not isinstance(record, dict) or set(record) != {"reference", "verdicts"} \
                or not isinstance(record["reference"], str) or not isinstance(record["verdicts"], list):
            raise ValueError(f"golden record malformed ({str(record)[:80]!r})")
        names = ("golden_frames", "golden_valid", "golden_defect", "golden_scores")
        if any(n not in arrays for n in names):
            raise ValueError(f"golden set incomplete: needs {names}")
        frames, valid, defect, scores = (arrays[n] for n in names)
        g = len(scores)
        expected = {"golden_frames": ("uint8", (g, image_size, image_size, 3)),
                    "golden_valid": ("uint8", (g, image_size, image_size)),
                    "golden_defect": ("bool", (g,)), "golden_scores": ("float64", (g,))}
        for name, (dtype, shape) in expected.items():
            a = arrays[name]
            if a.dtype.name != dtype or a.shape != shape:
                raise ValueError(f"{name} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
        if not 1 <= g <= MAX_FRAMES:
            raise ValueError(f"golden set of {g} frames; 1 to {MAX_FRAMES} expected")
        if not np.isfinite(scores).all() or (scores < 0).any():
            raise ValueError("golden scores must be finite and non-negative")
        if valid.max() > 1:
            raise ValueError("golden valid masks must be 0 or 1")
        verdicts = record["verdicts"]
        if len(verdicts) != g or not all(isinstance(v, bool) for v in verdicts):
            raise ValueError(f"golden verdicts must be {g} booleans")
        if list(scores > threshold) != verdicts:
            raise ValueError("golden verdicts disagree with their scores at the model's threshold: the file was edited")
        return cls(frames, valid.astype(bool), defect, scores, np.array(verdicts), record["reference"])


def make_frames(canon: list, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Golden frames from the nominal ``aligner.transform`` outputs: frames, valid masks and defect flags."""
    rng = np.random.default_rng(seed)
    n = len(canon)
    blends, masks = [], []
    for j in range(max(GOOD, DEFECTS)):
        (a, va), (b, vb) = canon[j % n][:2], canon[(j + 1) % n][:2]
        blends.append(((a.astype(np.uint16) + b + 1) // 2).astype(np.uint8))
        masks.append((va > 0.5) & (vb > 0.5))
    frames = blends[:GOOD] + [paste_defect(blends[j], masks[j], canon[(j + 2) % n][0], KINDS[j % len(KINDS)], rng)
                              for j in range(DEFECTS)]
    return np.stack(frames), np.stack(masks[:GOOD] + masks[:DEFECTS]), np.array([False] * GOOD + [True] * DEFECTS)


def score(det, model, engine, frames: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Image scores ``[G]`` of canonical ``frames`` by ``model`` with ``engine`` (any backbone object).

    The frames go through the detector's own stages after alignment
    (``distances_aligned`` and the model's post-processing), with ``engine`` in
    place of the detector's.
    """
    runner = copy.copy(det)
    runner._engines = _Fixed(engine)
    items = [(model, f, f, v.astype(np.float32), None) for f, v in zip(frames, valid)]
    raws = runner.distances_aligned(items)
    post = model.post
    return np.array([post.score_map(r.distances, r.valid)[1] for r in raws], np.float64)


def build(det, model, canon: list, reference_engine, reference: str) -> GoldenSet:
    """The golden set of a freshly fitted ``model``, scored with ``reference_engine`` (named ``reference``)."""
    frames, valid, defect = make_frames(canon, int(model.params["seed"]))
    scores = score(det, model, reference_engine, frames, valid)
    return GoldenSet(frames, valid, defect, scores, scores > model.threshold.image, reference)


class _Fixed:
    """An engine cache that always hands out one engine."""

    def __init__(self, engine):
        self.engine = engine

    def get(self, *args, **kwargs):
        return self.engine
