"""The DinoPatch detector: fit on good parts, score new ones; it orchestrates, the stages live elsewhere.

What fit learns is one immutable :class:`~.fitted.Fitted`, swapped in whole: a prediction running while
another thread refits uses either the old model or the new one, never parts of both.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from contextlib import closing
from pathlib import Path
from typing import Iterator

import numpy as np

from . import autotune, engine_choice, fitted, goodset
from .backbone import EngineCache
from .calibration import Threshold, threshold_for
from .data import image_list, load_image
from .fitted import Fitted, backbone_config, check_params
from .overlap import overlapped
from .presets import preset
from .result import PatchDistances, Result
from .sklearn_api import EstimatorMixin
from .update import union, with_lineage


class DinoPatch(EstimatorMixin):
    """Anomaly detector from a per-location memory of DINOv2 patch features.

    Parameters are only stored here; :meth:`fit` checks them.  Each is declared
    once, with its type, range and default, in :data:`dinopatch.params.PARAMS`
    (``python -m dinopatch fit -h`` lists them too).

    In short: the ``backbone`` and its ``weights`` at ``image_size``; whether to ``align`` parts (and
    ``mirror``, ``size_tolerance``), or ``register`` fixtured frames; the ``engine``, ``kernel``, ``device``,
    ``batch_size`` and ``overlap`` it runs with; the memory (``layers``, ``coreset_ratio``, ``tolerance``, ``match``,
    ``bank_dtype``, ``foreground``); the post-processing (``sigma``, ``score``, ``topk``, ``morph_kernel``); the
    threshold (``calibration``, ``false_alarm_rate``, or a given ``threshold``); the good set's check
    (``outliers``) and ``keep_parts`` for :meth:`update`.  Every ``"auto"`` is chosen at fit from the good
    images alone (:attr:`auto_`).
    """

    def __init__(self, *, backbone="dinov2_vits14", weights="pretrained", image_size=448, align=True,
                 engine="auto", kernel="auto", seed=0, layers=1, coreset_ratio=1.0, tolerance="auto",
                 match="local", bank_dtype="float32", sigma="auto", score="auto", topk=0.01, morph_kernel=5,
                 calibration="cv", false_alarm_rate=0.0, threshold=None, mirror=False, foreground="auto",
                 batch_size=8, overlap=True, progress=True, device="auto", outliers="drop", register="auto",
                 size_tolerance=0.03, keep_parts=True):
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
        self.overlap = overlap
        self.progress = progress
        self.device = device
        self.outliers = outliers
        self.register = register
        self.size_tolerance = size_tolerance
        self.keep_parts = keep_parts
        self._engines = EngineCache()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DinoPatch":
        """A detector in a named configuration of :data:`.presets.PRESETS`, with ``overrides``."""
        return cls(**preset(name, **overrides))

    def fit(self, images) -> "DinoPatch":
        """Learn what good parts look like from ``images`` (uint8 ``[H, W]`` / ``[H, W, 3]`` BGR arrays or
        paths), and the threshold that separates them; returns self."""
        images, names = goodset.load_named(images)
        self._model = self._learn(images, names)
        return self

    def update(self, images, *, force: bool = False) -> "DinoPatch":
        """Operator-confirmed good parts (arrays or paths) join the model (:mod:`.update`): fitted again on the
        parts it keeps and these, with lineage; a part the current model scores as a clear defect is refused
        (ValueError with the reason) unless ``force``.  Returns self."""
        parent = self.model_
        images, names, added, forced = union(self, images, force)
        self._model = with_lineage(parent, self._learn(images, names), added, forced)
        return self

    def _learn(self, images: list[np.ndarray], names: list[str]) -> Fitted:
        params = check_params(self.get_params())
        engine = self._engine(params)
        report, nominal = goodset.checked(images, names, engine, params, params["kernel"])
        nominal = nominal.with_offsets(autotune.measure_offsets(params, nominal))  # for tolerance "auto" or "map"
        # Auto first, then calibration: the threshold must be measured with the settings the model
        # will score with, and the choice does not use a threshold (it ranks by AUROC).
        auto = autotune.resolve(params, nominal)
        threshold = threshold_for(nominal, autotune.resolved(params, auto), params)
        model = fitted.learned(params, nominal, auto, threshold, engine, self.engine, report, images, names)
        model.check_threshold()  # a given threshold beyond the bank's reach is refused here, not at deployment
        return engine_choice.after_fit(self, model, list(zip(nominal.frames, nominal.valid)))

    def use_engine(self, engine) -> "DinoPatch":
        """Run ``engine``, a backbone built elsewhere, instead of building one; it must have the model's weights."""
        self._engines.pin(engine)
        return self

    def _engine(self, params: dict, fingerprint: str | None = None, sha256: str | None = None, engine=None):
        return self._engines.get(engine or self.engine, fingerprint, device=self.device, sha256=sha256,
                                 **backbone_config(params))

    def backbone_for(self, model: Fitted | None = None):
        """The backbone engine of a fitted model (default: the one in force), built now if not yet."""
        model = model or self.model_
        name, sha256 = engine_choice.in_force(self.engine, model)  # the measured choice where engine is "auto"
        return self._engine(model.params, model.fingerprint, sha256, name)

    def predict(self, images) -> list[Result]:
        """One :class:`Result` per image (uint8 ``[H, W]`` / ``[H, W, 3]`` BGR arrays or paths), in order.

        With ``overlap``, batch n-1 is post-processed while the backbone runs batch n (see :meth:`batches`)."""
        with closing(self.batches(images)) as batches:
            return [self.result_from(raw) for raws in batches for raw in raws]

    def patch_distances(self, images) -> list[PatchDistances]:
        """The per-patch distances of each image, before post-processing (evaluation sweeps its settings
        over them without running the backbone again; see :meth:`result_from`)."""
        with closing(self.batches(images)) as batches:
            return [raw for raws in batches for raw in raws]

    def batches(self, images) -> Iterator[list[PatchDistances]]:
        """The patch distances of ``images``, ``batch_size`` at a time, in order: with ``overlap`` and more
        than one batch, batch n+1 is read and aligned while the backbone runs batch n (:mod:`.overlap`).
        Close it (``contextlib.closing``) to stop its threads when the caller stops early."""
        model, items, bs = self.model_, image_list(images), int(self.batch_size)
        aligned = (model.align([load_image(item, i) for i, item in enumerate(items[s:s + bs], s)])
                   for s in range(0, len(items), bs))
        return overlapped(aligned, self.distances_aligned, threads=bool(self.overlap) and len(items) > bs)

    def align_images(self, images: list[np.ndarray]) -> list[tuple]:
        """First stage of :meth:`patch_distances`, public so :mod:`dinopatch.stream` can overlap the stages:
        opaque items for :meth:`distances_aligned`, bound to the model in force now (see :meth:`.Fitted.align`)."""
        return self.model_.align(images)

    def distances_aligned(self, items: list[tuple]) -> list[PatchDistances]:
        """Second stage: backbone and bank on items of :meth:`align_images`, each by its own model."""
        return [raw for model, run in fitted.by_model(items)
                for raw in model.patch_distances(run, self.backbone_for(model), self.kernel)]

    def result_from(self, raw: PatchDistances, *, threshold: float | None = None,
                    pixel_threshold: float | None = None, **post) -> Result:
        """The :class:`Result` of one image's patch distances (from :meth:`patch_distances`); ``threshold``,
        ``pixel_threshold`` (one value for the defect mask; default: the model's, per location) and ``**post``
        (``sigma``, ``score``, ``topk``, ``morph_kernel``) override the model's (:meth:`.Fitted.judge`)."""
        return (raw.model or self.model_).judge(raw, threshold, pixel_threshold, **post)

    def tuned(self, threshold: Threshold, **post) -> "DinoPatch":
        """A copy that judges with a threshold and post-processing measured elsewhere (by evaluation)."""
        model = self.model_.tuned(threshold, **post)
        det = copy.copy(self).set_params(**dataclasses.asdict(model.post))  # shares the engines: the same weights
        det._model = model
        return det

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted detector to one model file (data only; see :mod:`dinopatch.fitted`)."""
        model = self.model_
        saved, path = fitted.save_detector(path, model, {k: getattr(self, k) for k in fitted.RUNTIME_PARAMS})
        if self._model is model:  # not if a refit swapped in another model meanwhile
            self._model = saved
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, threshold: float | None = None,
             false_alarm_rate: float | None = None, strict: bool = False, **runtime) -> "DinoPatch":
        """A detector from a model file written by :meth:`save`, checked before use; ``threshold`` replaces
        the file's, ``false_alarm_rate`` re-reads its calibration scores, ``**runtime`` says how to run
        (``engine``, ``kernel``, ``batch_size``, ``overlap``, ``progress``, ``device``).  ``strict``: an engine
        named by hand that flips a verdict of the golden set is an error
        (:class:`~.engine_choice.EngineMismatchError`), not a warning."""
        model, params = fitted.load_detector(path, runtime, threshold, false_alarm_rate)
        det = cls(**params)
        det._model = engine_choice.on_load(det, model, strict)
        return det

