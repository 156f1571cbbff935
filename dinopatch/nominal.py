"""The nominal set: what fit knows about the good parts, and how each scores against the others.

:class:`NominalSet` holds the good parts in the canonical frame (frames, valid
masks, alignments), their token grids, the part's region (:mod:`.foreground`) and one seeded :class:`FoldPlan`.  Every
measurement fit makes on good parts alone (auto settings, the threshold, the
background unit, the good-set checks) asks it for held-out distance maps: each
image scored against a bank of the folds without it, as the fitted model would
score a new part.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from . import tolerance
from .align import Aligner
from .backbone import embed
from .bank import MemoryBank
from .foreground import Foreground, patch_stats, scatter
from .postprocess import PostProcess, scores_and_maxima

# Above this many nominal images, leave-one-out becomes this many folds: one bank per fold.
MAX_FOLDS = 10
# What the background unit is measured with: each patch against its own place only.
_NEAREST = {"tolerance": 0, "match": "local", "coreset_ratio": 1.0, "bank_dtype": "float32"}


@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """One seeded split of ``n`` nominal images into held-out folds.

    Attributes:
        order: int ``[n]``, a seeded permutation of the images.
        folds: ``min(n, MAX_FOLDS)`` index arrays, consecutive pieces of ``order``; one image each
            (leave-one-out) up to :data:`MAX_FOLDS` images.
    """

    order: np.ndarray
    folds: tuple

    @classmethod
    def seeded(cls, n: int, seed: int) -> "FoldPlan":
        order = np.random.default_rng(seed).permutation(n)
        return cls(order, tuple(np.array_split(order, min(n, MAX_FOLDS))))

    @property
    def method(self) -> str:
        """``"leave-one-out"`` or ``"k-fold"``."""
        return "leave-one-out" if len(self.folds) == len(self.order) else "k-fold"

    def fraction(self, share: float) -> list[np.ndarray] | None:
        """One held-out set of ``floor(share * n)`` images, first in ``order``; None when that is 0 or all."""
        k = int(np.floor(share * len(self.order)))
        return [self.order[:k]] if 1 <= k < len(self.order) else None

    def train(self, held: np.ndarray) -> np.ndarray:
        """The images a bank for ``held`` is built of."""
        return np.setdiff1d(self.order, held)


class Queries(NamedTuple):
    """Canonical images scored against the folds of the nominal images they derive from.

    Attributes:
        tokens: ``[B, h, w, D]``, zero outside the region like the nominal tokens.
        frames: uint8 ``[B, S, S, 3]``.
        origin: int ``[B]``, the nominal image each derives from (scored by that image's fold, with its valid
            mask).
    """

    tokens: np.ndarray
    frames: np.ndarray
    origin: np.ndarray


@dataclasses.dataclass(frozen=True)
class NominalSet:
    """Good parts in the canonical frame, embedded, with one fold plan.

    Attributes:
        aligner: the fitted aligner, padding as the region needs.
        frames: uint8 ``[N, S, S, 3]`` canonical images.
        valid: float32 ``[N, S, S]``, 0 where a frame is padding.
        alignments: the :class:`~.align.Alignment` of each.
        tokens: ``[N, h, w, D]`` grids, zero outside the region.
        positions: flat patch indices of the region, or None for every patch.
        foreground: the region's :class:`~.foreground.Foreground` (None without a region).
        plan: the fold plan every held-out measurement uses.
        engine, batch_size, kernel: how new canonical images are embedded and banks are scored.
        offsets: held-out patches at each offset per location (:func:`.tolerance.offset_counts` over the
            plan's folds), or None where the tolerance map is not wanted (:meth:`with_offsets`).
        tolerance_map: int8 ``[h * w]``, the tolerance per location derived from ``offsets``, or None.
    """

    aligner: Aligner
    frames: np.ndarray
    valid: np.ndarray
    alignments: tuple
    tokens: np.ndarray
    positions: np.ndarray | None
    foreground: Foreground | None
    plan: FoldPlan
    engine: object
    batch_size: int
    kernel: str | None
    offsets: np.ndarray | None = None
    tolerance_map: np.ndarray | None = None

    @classmethod
    def build(cls, canon: list[tuple], aligner: Aligner, engine, *, positions: np.ndarray | None = None,
              seed: int = 0, batch_size: int = 8, kernel: str | None = None, progress: bool = False) -> "NominalSet":
        """Embed nominal images placed in the canonical frame; on a region, measure its background check.

        Args:
            canon: ``aligner.transform`` outputs ``(frame, valid, alignment)`` of the nominal images.
            aligner: the fitted aligner that placed them; on a region it pads with the background level
                (mirrored pieces of the part pasted into the frame would read as foreground).
            positions: the region (:func:`.foreground.region`), or None for every patch.
            seed: seeds the fold plan.
        """
        frames = np.stack([c[0] for c in canon])
        tokens = embed(engine, frames, batch_size, progress, "fit: embedding", positions)
        grids = tokens if positions is None else scatter(tokens, positions, engine.grid)
        nominal = cls(aligner, frames, np.stack([c[1] for c in canon]), tuple(c[2] for c in canon), grids,
                      positions, None, FoldPlan.seeded(len(canon), seed), engine, int(batch_size), kernel)
        if positions is None:
            return nominal
        fg = Foreground.fit(positions, engine.grid, nominal.held_out(_NEAREST),
                            patch_stats(frames, nominal.valid, engine.grid), nominal.plan.folds)
        return dataclasses.replace(nominal, foreground=fg)

    def __len__(self) -> int:
        return len(self.frames)

    def subset(self, keep: np.ndarray, seed: int) -> "NominalSet":
        """The nominal set of images ``keep`` only (region and background unit kept), re-planned;
        offsets measured on the whole set are dropped with it."""
        keep = np.asarray(keep)
        return dataclasses.replace(
            self, frames=self.frames[keep], valid=self.valid[keep],
            alignments=tuple(self.alignments[i] for i in keep), tokens=self.tokens[keep],
            plan=FoldPlan.seeded(len(keep), seed), offsets=None, tolerance_map=None)

    def with_offsets(self, offsets: np.ndarray | None) -> "NominalSet":
        """This set with its measured offsets (:func:`.autotune.measure_offsets`) and the tolerance map they give."""
        side = self.tokens.shape[1]
        tmap = None if offsets is None else tolerance.tolerance_map(offsets, (side, side), side - 1)
        return dataclasses.replace(self, offsets=offsets, tolerance_map=tmap)

    def bank(self, settings: dict, train: np.ndarray | None = None) -> MemoryBank:
        """The bank of images ``train`` (default: all) with ``settings``' tolerance (grid steps, or ``"map"``:
        :attr:`tolerance_map`), match, coreset_ratio and dtype."""
        tokens = self.tokens if train is None else self.tokens[train]
        steps = settings["tolerance"]
        if isinstance(steps, str) and steps == "map":
            if self.tolerance_map is None:
                raise ValueError("tolerance 'map' before its offsets were measured (NominalSet.with_offsets)")
            steps = self.tolerance_map
        return MemoryBank.fit(tokens, coreset_ratio=settings["coreset_ratio"], tolerance=steps,
                              dtype=np.dtype(settings["bank_dtype"]), kernel=self.kernel, positions=self.positions,
                              match=settings["match"])

    def queries(self, frames: list[np.ndarray], origin) -> Queries:
        """New canonical images (pasted defects on nominal ones) embedded as the nominal ones are."""
        tokens = embed(self.engine, frames, self.batch_size, positions=self.positions)
        grids = tokens if self.positions is None else scatter(tokens, self.positions, self.engine.grid)
        return Queries(grids, np.stack(frames), np.asarray(origin))

    def held_out(self, settings: dict, folds=None, extra: Queries | None = None):
        """Distance maps of the images of ``folds`` (default: the plan's), each against a bank without its fold.

        Args:
            settings: bank settings (see :meth:`bank`).
            folds: held-out index sets; images in none of them get NaN maps.
            extra: queries scored by the fold of their ``origin``.

        Returns:
            float32 ``[N, h, w]`` in each canonical image's orientation, the background term filled in
            outside the region; with ``extra``, also ``[B, h, w]`` for them.
        """
        maps, more, _ = self._held_out(settings, self.plan.folds if folds is None else folds, extra)
        return maps if extra is None else (maps, more)

    def _held_out(self, settings: dict, folds, extra: Queries | None) -> tuple:
        """:meth:`held_out`'s maps, the extra queries' maps (or None) and, per fold, the images whose tokens its
        bank holds at each location, int ``[L, k]`` in the bank's row order."""
        maps = np.full(self.tokens.shape[:3], np.nan, np.float32)
        more = None if extra is None else np.full(extra.tokens.shape[:3], np.nan, np.float32)
        kept = []
        for held in folds:
            train = self.plan.train(held)
            bank = self.bank(settings, train)
            kept.append(np.broadcast_to(train, (bank.features.shape[0], len(train))) if bank.coreset is None
                        else train[bank.coreset])
            background = (None if self.foreground is None
                          else self.foreground.background_of(self.frames[train], self.valid[train]))
            maps[held] = finish(bank.distances(self.tokens[held], self.kernel), self.foreground, self.frames[held],
                                self.valid[held], background)
            here = np.array([], int) if extra is None else np.flatnonzero(np.isin(extra.origin, held))
            if here.size:
                more[here] = finish(bank.distances(extra.tokens[here], self.kernel), self.foreground,
                                    extra.frames[here], self.valid[extra.origin[here]], background)
        return maps, more, kept

    def held_out_scores(self, settings: dict, folds=None) -> tuple:
        """Image scores of held-out images with ``settings`` (bank and post-processing).

        Returns:
            ``(index, scores, maxima, distances, kept)``: the images of each fold in order (sorted within a
            fold), their image scores, the largest value of each one's map, their held-out distance
            maps, float32 ``[len(index), h, w]`` (the evidence of the per-location mask threshold,
            :attr:`.calibration.Threshold.pixel_grid`), and where ``settings`` ask for a coreset the images
            whose tokens each fold's bank holds, int ``[L, sum of k]`` fold after fold (None otherwise).
        """
        folds = self.plan.folds if folds is None else folds
        post = PostProcess(settings["sigma"], settings["score"], settings["topk"], settings["morph_kernel"])
        maps, _, kept = self._held_out(settings, folds, None)
        index = np.concatenate([np.sort(h) for h in folds])
        kept = np.concatenate(kept, axis=1) if settings["coreset_ratio"] < 1 else None
        # The valid masks as the model file keeps them (one bit a pixel): load scores them again alike.
        return (index, *scores_and_maxima(post, maps[index], self.valid[index] > 0.5), maps[index], kept)


def finish(distances: np.ndarray, fg: Foreground | None, frames: np.ndarray, valid: np.ndarray,
           background=None) -> np.ndarray:
    """Distance maps ``[B, h, w]`` of canonical ``frames`` (valid where ``valid``), with the background term
    outside the region ``fg``."""
    return distances if fg is None else fg.complete(distances, frames, valid, background)
