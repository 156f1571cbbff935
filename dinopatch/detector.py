"""The DinoPatch detector: fit on good parts, score new ones; it orchestrates, the stages live elsewhere.

Everything :meth:`DinoPatch.fit` learns is one immutable :class:`~.fitted.Fitted`,
swapped in whole: a prediction running while another thread refits uses either
the old model or the new one, never parts of both.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import numpy as np

from . import autotune, engine_choice, fitted, foreground, kernels, tolerance
from .align import Aligner
from .backbone import EngineCache
from .backbone import embed as embed_frames
from .bank import MemoryBank
from .calibration import Threshold, calibrate
from .data import load_images
from .fitted import Fitted, backbone_key, check_params, graph_record
from .polarity import Polarity, unflip
from .postprocess import PostProcess, image_score
from .presets import PRESETS
from .result import PatchDistances, Result
from .sklearn_api import EstimatorMixin


class NotFittedError(ValueError, AttributeError):
    """``predict`` or ``save`` was called before ``fit`` (scikit-learn's bases)."""


class DinoPatch(EstimatorMixin):
    """Anomaly detector from a per-location memory of DINOv2 patch features.

    Parameters are only stored here; :meth:`fit` checks them.  Each is declared
    once, with its type, range and default, in :data:`dinopatch.params.PARAMS`
    (``python -m dinopatch fit -h`` lists them too).

    Args:
        backbone: a key of :data:`dinopatch.backbone.BACKBONES`.
        weights: ``"pretrained"``, ``"random"`` (seeded), ``"random-blocks"`` (seeded, every block
            matters) or a checkpoint path.
        image_size: backbone input side in pixels (multiple of 14); also the canonical frame's side.
        align: align parts to a canonical pose; False for fixtured parts and flat textures.
        engine: a name of :data:`dinopatch.backbone.ENGINES` or a path to an ``.onnx`` export.
        kernel: distance kernel backend, one of :data:`dinopatch.kernels.BACKENDS` or ``"auto"``.
        seed: seeds random weights and the calibration split.
        layers: average the patch tokens of the last ``layers`` blocks.
        coreset_ratio: fraction of nominal rows kept per location.
        tolerance: spatial tolerance of the bank, in grid steps; ``"map"``: a radius per location measured
            on the nominal images (:mod:`.tolerance`); or ``"auto"`` (the default), which chooses among them.
        match: ``"local"`` (each patch against its own location's bank), ``"global"`` (against the whole
            bank), ``"local+global"`` (their mean; :mod:`.bank`) or ``"auto"``.
        bank_dtype: ``"float32"`` or ``"float16"`` bank storage.
        sigma, score, topk, morph_kernel: post-processing (:class:`~.postprocess.PostProcess`); ``sigma``
            and ``score`` default to ``"auto"``.  Every ``"auto"`` is chosen at fit from the nominal images
            alone (:mod:`.autotune`) and read back from :attr:`auto_`.
        calibration: ``"cv"``: each nominal image scored against a bank without it
            (leave-one-out, :mod:`.calibration`); or a fraction of them held out.
        false_alarm_rate: the rate of good parts flagged that the threshold promises: the conformal
            quantile of those scores (:mod:`.calibration`; 0: their maximum, which promises ``1 / (n + 1)``).
        threshold: a threshold to use instead of calibrating one.
        mirror: parts can lie on either face (alignment resolves mirroring).
        foreground: run the backbone only on the part's region (:mod:`.foreground`): True,
            False, or ``"auto"``: where aligned parts leave most of the frame to the background.
        batch_size: images per backbone call.
        progress: show progress bars.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for the backbone (and the bank's kernel);
            a GPU named that is not there fails at :meth:`fit` (or :meth:`load`), before any work.
    """

    def __init__(self, *, backbone="dinov2_vits14", weights="pretrained", image_size=448, align=True,
                 engine="auto", kernel="auto", seed=0, layers=1, coreset_ratio=1.0, tolerance="auto",
                 match="local", bank_dtype="float32", sigma="auto", score="auto", topk=0.01, morph_kernel=5,
                 calibration="cv", false_alarm_rate=0.0, threshold=None, mirror=False, foreground="auto",
                 batch_size=8, progress=True, device="auto"):
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.align = align
        self.engine = engine
        self.kernel = kernel
        self.seed = seed
        self.layers = layers
        self.coreset_ratio = coreset_ratio
        self.tolerance = tolerance
        self.match = match
        self.bank_dtype = bank_dtype
        self.sigma = sigma
        self.score = score
        self.topk = topk
        self.morph_kernel = morph_kernel
        self.calibration = calibration
        self.false_alarm_rate = false_alarm_rate
        self.threshold = threshold
        self.mirror = mirror
        self.foreground = foreground
        self.batch_size = batch_size
        self.progress = progress
        self.device = device
        self._engines = EngineCache()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DinoPatch":
        """A detector in a named configuration of :data:`PRESETS`, with ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**dict(PRESETS[name], **overrides))

    def fit(self, images) -> "DinoPatch":
        """Learn what good parts look like, and the threshold that separates them.

        Args:
            images: nominal images: uint8 ``[H, W]`` / ``[H, W, 3]`` BGR arrays or paths.

        Returns:
            self
        """
        params = check_params(self.get_params())
        images = load_images(images)
        if len(images) == 0:
            raise ValueError("fit needs at least one nominal image, got none")
        aligner = Aligner(size=self.image_size, enabled=self.align, mirror=self.mirror).fit(images)
        engine = self._engine(backbone_key(params), None, None)
        bs = int(self.batch_size)
        canon, tokens, fg = foreground.embed_nominal(self.foreground, aligner, images, engine, bs, self.progress)
        frames, positions = np.stack([c[0] for c in canon]), fg and fg.positions
        polarity = Polarity.fit(tokens) if self.align else None
        tokens, flips = _orient(polarity, tokens)

        def embed(canonical: list[np.ndarray]):
            grids = embed_frames(engine, canonical, bs, positions=positions)
            return _orient(polarity, grids if fg is None else fg.scatter(grids))

        offsets = autotune.measure_offsets(params, tokens, positions, self._kernel())
        side = tokens.shape[1]
        tmap = None if offsets is None else tolerance.tolerance_map(offsets, (side, side), side - 1)

        def held_out(settings, train, queries, q_flips, q_frames):
            bank = self._make_bank(tokens[train], positions, dict(params, **settings), tmap)
            return _finish(bank.distances(queries, backend=self._kernel()), q_flips, fg, q_frames,
                           fg and fg.background_of(frames[train]))

        # Auto first, then calibration: the threshold must be measured with the settings the model
        # will score with, and the choice does not use a threshold (it ranks by AUROC).
        auto = autotune.resolve(params, tokens, canon, embed, held_out, positions, self._kernel(), offsets)
        chosen = autotune.resolved(params, auto)
        post = PostProcess(chosen["sigma"], chosen["score"], chosen["topk"], chosen["morph_kernel"])

        def score_held_out(train, held):
            dists = held_out(chosen, train, tokens[held], flips[held], frames[held])
            maps = [post.score_map(d, canon[i][1]) for i, d in zip(held, dists)]
            return (np.array([s for _, s in maps]),
                    np.array([image_score(m, canon[i][1], "max") for i, (m, _) in zip(held, maps)]), dists)

        threshold = (Threshold.given(self.threshold) if self.threshold is not None else
                     calibrate(len(images), score_held_out, calibration=self.calibration,
                               false_alarm_rate=self.false_alarm_rate, seed=self.seed))
        model = Fitted(params, aligner, polarity, self._make_bank(tokens, positions, chosen, tmap), threshold,
                       engine.fingerprint, "unsaved", fg, graph_record(self.engine, engine), auto, offsets)
        self._model = engine_choice.after_fit(self, model, canon)
        return self

    def _make_bank(self, tokens: np.ndarray, positions, params: dict, tmap=None) -> MemoryBank:
        radius = tmap if isinstance(params["tolerance"], str) and params["tolerance"] == "map" else params["tolerance"]
        return MemoryBank.fit(tokens, ratio=params["coreset_ratio"], radius=radius,
                              dtype=np.dtype(params["bank_dtype"]), backend=self._kernel(), positions=positions,
                              match=params["match"])

    def _kernel(self):
        return None if self.kernel == "auto" else self.kernel

    def _engine(self, key: tuple, fingerprint: str | None, sha256: str | None, engine=None):
        name, weights, image_size, layers, seed = key
        return self._engines.get(engine or self.engine, fingerprint, device=self.device, sha256=sha256, name=name,
                                 weights=weights, image_size=image_size, layers=layers, seed=seed)

    def _get_backbone(self, model: Fitted | None = None):
        """The engine of a fitted model (default: the one in force), built now if not yet."""
        model = model or self._fitted()
        name, sha256 = engine_choice.in_force(self.engine, model)
        return self._engine(backbone_key(model.params), model.fingerprint, sha256, name)

    def _fitted(self) -> Fitted:
        if (model := getattr(self, "_model", None)) is None:
            raise NotFittedError("this DinoPatch is not fitted yet: call fit(images) or DinoPatch.load(path)")
        return model

    @property
    def threshold_(self) -> Threshold:
        """The decision threshold in force, with its source (see :class:`~.calibration.Threshold`)."""
        return self._fitted().threshold

    @property
    def auto_(self) -> dict | None:
        """What fit chose for the parameters set to ``"auto"``, and why; None when none was.

        ``{"chosen": {name: value}, "fallback": bool, "evidence": {...}}`` (see :mod:`.autotune`):
        ``fallback`` is True where too few nominal images left nothing to measure and the
        documented defaults (:data:`.autotune.DEFAULTS`) stand.  :meth:`get_params` keeps saying
        ``"auto"``; this is the one place the fitted values are read from.
        """
        return self._fitted().auto

    @property
    def model_id(self) -> str:
        """Short content id of the model file this detector was saved to or loaded from."""
        return self._fitted().model_id

    def predict(self, images) -> list[Result]:
        """Score images; one :class:`Result` per image, in order.

        Args:
            images: uint8 ``[H, W]`` / ``[H, W, 3]`` BGR arrays or paths, any size.
        """
        return [self.result_from(raw) for raw in self.patch_distances(images)]

    def patch_distances(self, images) -> list[PatchDistances]:
        """The per-patch distances of each image, before any post-processing.

        Evaluation sweeps post-processing settings over these without running
        the backbone again (see :meth:`result_from`).
        """
        model, images, bs = self._fitted(), load_images(images), int(self.batch_size)
        return [raw for i in range(0, len(images), bs)
                for raw in self.distances_aligned(self._align(model, images[i:i + bs]))]

    def align_images(self, images: list[np.ndarray]) -> list[tuple]:
        """First stage of :meth:`patch_distances`, public so :mod:`dinopatch.stream` can overlap the stages.

        Returns one opaque item per image for :meth:`distances_aligned`, bound to the model in force now;
        items of several calls can be batched together.
        """
        return self._align(self._fitted(), images)

    @staticmethod
    def _align(model: Fitted, images: list[np.ndarray]) -> list[tuple]:
        return [(model, im, *model.aligner.transform(im)) for im in images]

    def distances_aligned(self, items: list[tuple]) -> list[PatchDistances]:
        """Second stage of :meth:`patch_distances`: backbone and bank on items from :meth:`align_images`."""
        if len({id(model) for model, *_ in items}) > 1:  # aligned across a refit: each part by its own model
            split = next(i for i, item in enumerate(items) if item[0] is not items[0][0])
            return self.distances_aligned(items[:split]) + self.distances_aligned(items[split:])
        model = items[0][0]
        engine = self._get_backbone(model)
        frames, fg = np.stack([canonical for _, _, canonical, _, _ in items]), model.foreground
        if fg is None and self._tokens_stay_on_gpu(engine):
            tokens = engine(frames, on_device=True)
        else:
            tokens = engine(frames) if fg is None else fg.scatter(engine(frames, fg.positions))
        tokens, flips = _orient(model.polarity, tokens)
        dists = _finish(model.bank.distances(tokens, backend=self._kernel()), flips, fg, frames)
        return [PatchDistances(d, valid, al, im.shape[:2], model) for (_, im, _, valid, al), d in zip(items, dists)]

    def _tokens_stay_on_gpu(self, engine) -> bool:
        """Torch on a GPU and the cuda kernel: the kernel reads the tokens there, not through the host."""
        return (getattr(engine, "engine", None) == "torch" and str(engine.device).startswith("cuda")
                and kernels.resolve(self._kernel()) == "cuda")

    def result_from(self, raw: PatchDistances, *, threshold: float | None = None,
                    pixel_threshold: float | None = None, **post) -> Result:
        """Post-process one image's patch distances into a :class:`Result`.

        Args:
            raw: from :meth:`patch_distances`.
            threshold: image-score threshold (default: the model's).
            pixel_threshold: one map threshold for the defect mask (default: the model's, per location).
            **post: overrides of ``sigma``, ``score``, ``topk``, ``morph_kernel``.
        """
        model = raw.model or self._fitted()
        t = model.threshold if threshold is None else Threshold.given(threshold)
        pixel = None if pixel_threshold is None else float(pixel_threshold)
        return dataclasses.replace(model.post, **post).judge(raw, model.aligner, t, pixel)

    def tuned(self, threshold: Threshold, **post) -> "DinoPatch":
        """A copy that judges with a threshold and post-processing measured elsewhere (by evaluation)."""
        model = self._fitted()
        settings = dataclasses.asdict(dataclasses.replace(model.post, **post))
        det = copy.copy(self).set_params(**settings)  # shares the engines: the weights are the same
        det._model = dataclasses.replace(model, params=dict(model.params, **settings), threshold=threshold,
                                         model_id="unsaved", auto=autotune.without(model.auto, settings))
        return det

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted detector to one model file (data only; see :mod:`dinopatch.fitted`)."""
        model = self._fitted()
        runtime = {k: getattr(self, k) for k in fitted.RUNTIME_PARAMS}
        saved, path = fitted.save_detector(path, model, runtime)
        if self._model is model:  # not if a refit swapped in another model meanwhile
            self._model = saved
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, threshold: float | None = None,
             false_alarm_rate: float | None = None, **runtime) -> "DinoPatch":
        """A detector from a model file written by :meth:`save`, checked before use.

        Args:
            threshold: use this threshold instead of the file's (its source becomes "user").
            false_alarm_rate: re-read the file's calibration scores at this rate.
            **runtime: ``engine``, ``kernel``, ``batch_size``, ``progress``, ``device``: how to run.
        """
        model, params = fitted.load_detector(path, runtime, threshold, false_alarm_rate)
        det = cls(**params)
        det._model = engine_choice.on_load(det, model)
        return det


def _orient(polarity: Polarity | None, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens turned to the fitted polarity (unchanged without alignment), and which were turned."""
    return (tokens, np.zeros(len(tokens), bool)) if polarity is None else polarity.orient(tokens)


def _finish(distances: np.ndarray, flips: np.ndarray, fg, frames: np.ndarray, background=None) -> np.ndarray:
    """Grids scored turned go back to their canonical images' orientation; then the background term."""
    out = np.stack([unflip(d, f) for d, f in zip(distances, flips)])
    return out if fg is None else fg.complete(out, frames, background)
