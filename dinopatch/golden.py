"""The golden set: a few canonical frames every model file carries, with the fp32 reference's distances.

Any engine that claims to run a model must give the same verdicts as the
reference on these frames (:mod:`.engine_choice`).  They are made at fit from
the nominal frames alone:

* *good* frames: the mean of two neighbouring nominal frames, so that none is
  in the bank verbatim (the reference scores a bank row's own frame 0, so it
  tests an engine's error but never a verdict) and each lies between good parts;
* *defect* frames: those frames with one synthetic defect each
  (:func:`.autotune.paste_defect`, one kind after another);
* *nominal* frames: :data:`NOMINAL` nominal frames as they are, in the bank
  verbatim.  The reference scores them about 0, so what an engine scores on
  them is its own error on real frames.  Blends under-state that error: an
  int8 graph quantised on the blends (:mod:`.engine_choice`, which never
  quantises on these) deviated by 2% of the threshold on them and by 30% on
  a texture's real frames, flipping verdicts the blends could not show.

The verdicts are whatever the reference says: on random weights at 112 px the
defects may all pass; what an engine is checked on is that it says the same.

What is kept is the reference engine's patch distances (torch fp32, where
torch is installed), not its scores: the scores and verdicts follow from them
with the post-processing and threshold in force (:func:`scores`), so a model
whose post-processing or threshold was tuned later (``evaluate
--save-model``) checks engines against what it now judges by.  Arrays in the
model file: ``golden_frames`` uint8 ``[G, S, S, 3]``, ``golden_valid`` uint8
``[G, S, S]``, ``golden_defect`` and ``golden_nominal`` bool ``[G]``,
``golden_distances`` float32 ``[G, h, w]``; the header's ``golden`` holds the reference engine's name and
the verdicts at the saved threshold.  :meth:`GoldenSet.from_state` checks
every one and that the verdicts follow from the distances.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .autotune import KINDS, paste_defect

GOOD = 3
DEFECTS = 3
NOMINAL = 2
MAX_FRAMES = 16  # a file may hold at most this many golden frames (a bound on its size)


@dataclasses.dataclass(frozen=True)
class GoldenSet:
    """Canonical frames ``[G, S, S, 3]`` uint8, valid masks ``[G, S, S]`` bool, which carry a pasted defect
    ``[G]``, which are nominal frames as they are ``[G]``, and the reference engine's patch distances
    ``[G, h, w]`` float32."""

    frames: np.ndarray
    valid: np.ndarray
    defect: np.ndarray
    nominal: np.ndarray
    distances: np.ndarray
    reference: str

    @property
    def blends(self) -> np.ndarray:
        """The good frames between nominal ones ``[B, S, S, 3]``: what an engine may be quantised on."""
        return self.frames[~self.defect & ~self.nominal]

    def state(self, post, threshold: float) -> tuple[dict, dict]:
        """Header entry and arrays of the model file, the verdicts by ``post`` at the ``threshold`` saved."""
        verdicts = scores(post, self.distances, self.valid) > threshold
        return ({"reference": self.reference, "verdicts": [bool(v) for v in verdicts]},
                {"golden_frames": self.frames, "golden_valid": self.valid.astype(np.uint8),
                 "golden_defect": self.defect, "golden_nominal": self.nominal,
                 "golden_distances": self.distances.astype(np.float32)})

    @classmethod
    def from_state(cls, record, arrays: dict, image_size: int, side: int, post, threshold: float) -> "GoldenSet":
        """:meth:`state` read back, every value checked (ValueError saying what is wrong)."""
        if not isinstance(record, dict) or set(record) != {"reference", "verdicts"} \
                or not isinstance(record["reference"], str) or not isinstance(record["verdicts"], list):
            raise ValueError(f"golden record malformed ({str(record)[:80]!r})")
        names = ("golden_frames", "golden_valid", "golden_defect", "golden_nominal", "golden_distances")
        if any(n not in arrays for n in names):
            raise ValueError(f"golden set incomplete: needs {names}")
        frames, valid, defect, nominal, distances = (arrays[n] for n in names)
        g = len(defect)
        expected = {"golden_frames": ("uint8", (g, image_size, image_size, 3)),
                    "golden_valid": ("uint8", (g, image_size, image_size)),
                    "golden_defect": ("bool", (g,)), "golden_nominal": ("bool", (g,)),
                    "golden_distances": ("float32", (g, side, side))}
        for name, (dtype, shape) in expected.items():
            a = arrays[name]
            if a.dtype.name != dtype or a.shape != shape:
                raise ValueError(f"{name} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
        if not 1 <= g <= MAX_FRAMES:
            raise ValueError(f"golden set of {g} frames; 1 to {MAX_FRAMES} expected")
        if not np.isfinite(distances).all() or (distances < 0).any():
            raise ValueError("golden distances must be finite and non-negative")
        if valid.max() > 1:
            raise ValueError("golden valid masks must be 0 or 1")
        if (defect & nominal).any() or not (~defect & ~nominal).any():
            raise ValueError("golden frames must each be a blend, a defect or a nominal frame, with at least one "
                             "blend")
        gold = cls(frames, valid.astype(bool), defect, nominal, distances, record["reference"])
        verdicts = record["verdicts"]
        if len(verdicts) != g or not all(isinstance(v, bool) for v in verdicts):
            raise ValueError(f"golden verdicts must be {g} booleans")
        if list(scores(post, distances, gold.valid) > threshold) != verdicts:
            raise ValueError("golden verdicts disagree with their distances at the model's threshold: the file "
                             "was edited")
        return gold


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


def distances(det, model, engine, frames: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Patch distances ``[G, h, w]`` of canonical ``frames`` by ``model`` with ``engine`` (any backbone object),
    as the model scores every part (:meth:`.fitted.Fitted.distances`); ``valid`` is where the scores read them."""
    return np.asarray(model.distances(engine, frames, valid, det.kernel), np.float32)


def scores(post, dists: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Image scores ``[G]`` of patch distances ``[G, h, w]`` by post-processing ``post``."""
    return np.array([post.score_map(d, v.astype(np.float32))[1] for d, v in zip(dists, valid)], np.float64)


def build(det, model, canon: list, reference_engine, reference: str) -> GoldenSet:
    """The golden set of a freshly fitted ``model``, its distances by ``reference_engine`` (named ``reference``)."""
    frames, valid, defect = make_frames(canon, int(model.params["seed"]))
    # Nominal frames spread over the set, past its first frame (where the blends start).
    picks = np.linspace(0, len(canon) - 1, NOMINAL + 2).round().astype(int)[1:-1] if len(canon) > 1 else [0]
    frames = np.concatenate([frames, np.stack([canon[i][0] for i in picks])])
    valid = np.concatenate([valid, np.stack([np.asarray(canon[i][1]) > 0.5 for i in picks])])
    nominal = np.r_[np.zeros(len(defect), bool), np.ones(len(picks), bool)]
    defect = np.r_[defect, np.zeros(len(picks), bool)]
    return GoldenSet(frames, valid, defect, nominal, distances(det, model, reference_engine, frames, valid), reference)
