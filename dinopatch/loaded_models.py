"""The models one scorer replica holds: loaded on first use, the least recently used dropped beyond a budget.

The budget is a number of models (``max_models``) and, optionally, memory:
the estimated resident sizes of the models held (:mod:`dinopatch.memory_budget`,
carried by each checked version) may not add up to more than ``memory``
bytes.  Before a model is loaded, the least recently used others are dropped
until it fits beside what stays; a model larger than the whole budget is
refused (:class:`~dinopatch.memory_budget.MemoryBudgetError`) before it is
loaded.  A swap holds both versions of a name for the time of the load: the
old one answers until the new one is ready.

Each loaded model has its own dynamic batch (images of one model are scored
together, never with another model's).  A request names the version of the
:mod:`dinopatch.catalog` it is for; a replica holding an older version of
that name loads the new one beside it (fetch, check, warm up the engine)
and only then puts it in the old one's place.  Requests already queued on
the old one are scored by it: their batch holds it until they are answered.
A request naming an older version than the one held is scored by the newer
(the catalog has moved on); every answer names the model id that judged it.

A version this replica cannot run as checked (its file's checks, its golden
set on this replica's engine, the memory budget: a ``ValueError`` or
:class:`~dinopatch.engine_choice.EngineMismatchError` from ``load``) is kept
out here too: the version held before it answers on, and the version is not
tried again on this replica; with no version held before, requests get
:class:`ModelUnavailableError`.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from .catalog import ModelVersion
from .engine_choice import EngineMismatchError
from .memory_budget import check_fits
from .records import score_images

log = logging.getLogger("dinopatch.serve")


class ModelUnavailableError(RuntimeError):
    """A version this replica refused to load, with no earlier version of its name to answer instead."""


class LoadedModel:
    """One version of one model, ready to score: the detector and its batch queue.

    Args:
        version: the catalog's version this detector was loaded from.
        det: the loaded :class:`dinopatch.DinoPatch`, engine warmed up.
        batch: a decorator turning ``async f(items) -> list`` into a batching ``async f(item)``
            (Ray Serve's ``serve.batch`` with the service's sizes).
    """

    def __init__(self, version: ModelVersion, det, batch: Callable):
        self.version, self.det = version, det
        self.predict = batch(self._predict_batch)

    async def _predict_batch(self, items: list[tuple[np.ndarray, bool]]) -> list[dict]:
        """Score the queued images of this model together; each record says how many there were."""
        images = [im for im, _ in items]
        # Off the event loop, so that requests keep queueing (and health checks answer) meanwhile.
        # With each part's drift statistics: the gateway keeps the model's drift monitor, but not the images.
        records = await asyncio.to_thread(score_images, self.det, images, any(m for _, m in items), True)
        out = []
        for (_, want_mask), rec in zip(items, records):
            if not want_mask:
                rec.pop("mask_png", None)
            out.append(dict(rec, batch=len(items), model_version=self.version.number))
        return out


class LoadedModels:
    """Name to :class:`LoadedModel`, within ``max_models`` and ``memory``, least recently used dropped first.

    Args:
        load: ``load(version) -> DinoPatch``, the detector of a version (fetches its bytes, checks them,
            warms up the engine); runs in a worker thread.
        batch: the batching decorator each model's queue gets.
        max_models: how many models this replica keeps loaded.
        memory: bytes the estimated resident sizes of the loaded models may add up to (None: no bound).
    """

    def __init__(self, load: Callable[[ModelVersion], Any], batch: Callable, max_models: int,
                 memory: int | None = None):
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        if memory is not None and memory < 1:
            raise ValueError(f"memory must be >= 1 byte, got {memory}")
        self._load, self._batch, self.max_models, self.memory = load, batch, max_models, memory
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._refused: dict[str, tuple[ModelVersion, str]] = {}
        self.loads = 0

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        """Loaded names, least recently used first."""
        return list(self._models)

    def resident_bytes(self) -> int:
        """The estimated memory of the models held."""
        return sum(m.version.resident_bytes for m in self._models.values())

    async def get(self, version: ModelVersion) -> LoadedModel:
        """The loaded model for ``version``'s name, at that version or a newer one; loaded if need be.

        Where this replica refused ``version`` (now or before), the version of its name held before it.

        Raises:
            ModelUnavailableError: ``version`` was refused here and no earlier version of its name is held.
        """
        held = self._fresh(version)
        if held is not None:
            return held
        # One load per name at a time: requests arriving meanwhile wait for it instead of loading again.
        lock = self._locks.setdefault(version.name, asyncio.Lock())
        async with lock:
            held = self._fresh(version)
            if held is not None:
                return held
            refused = self._refused.get(version.name)
            if refused is None or version.newer_than(refused[0]):
                try:
                    return await self._load_new(version)
                except (ValueError, EngineMismatchError) as e:
                    log.error("%s: version %d refused on this replica: %s", version.name, version.number, e)
                    self._refused[version.name] = (version, f"{type(e).__name__}: {e}")
            before = self._models.get(version.name)
            if before is None:
                raise ModelUnavailableError(f"{version.name}: version {version.number} cannot run on this replica: "
                                            f"{self._refused[version.name][1]}")
            return before

    async def _load_new(self, version: ModelVersion) -> LoadedModel:
        check_fits(version.name, version.resident_bytes, self.memory)
        self._make_room(version)
        det = await asyncio.to_thread(self._load, version)
        model = LoadedModel(version, det, self._batch)
        self.loads += 1
        self._models[version.name] = model
        self._models.move_to_end(version.name)
        self._make_room(None)
        self._refused.pop(version.name, None)
        return model

    def _make_room(self, coming: ModelVersion | None) -> None:
        """Drop the least recently used models until ``coming`` (None: nothing) fits beside those left.

        A model of ``coming``'s name stays: it answers until its new version is loaded.  Requests queued on a
        dropped model still finish: its batch holds it.
        """
        def over() -> bool:
            count = len(self._models) + (coming is not None and coming.name not in self._models)
            size = self.resident_bytes() + (coming.resident_bytes if coming is not None else 0)
            return count > self.max_models or (self.memory is not None and size > self.memory)

        for name in list(self._models):
            if not over():
                break
            if coming is None or name != coming.name:
                del self._models[name]

    def _fresh(self, version: ModelVersion) -> LoadedModel | None:
        held = self._models.get(version.name)
        if held is None or version.newer_than(held.version):
            return None
        self._models.move_to_end(version.name)
        return held
