"""The service's drift monitors: one per model in service, fresh at each version.

The scorer replicas measure each part's statistics (brightness, contrast,
scale: :func:`dinopatch.drift.part_statistics`) where they have the image and
its alignment, and return them with the answer.  The gateway, one per
service, keeps a :class:`dinopatch.drift.Monitor` per model and feeds it every
answered part in the order answers arrive; it replaces the statistics in the
answer by the monitor's ``drift`` field ``{"flag", "reason"}``.

A swap starts a fresh monitor: the new file carries its own reference
distributions.  An answer still judged by a version that was swapped out
does not move the new version's charts; its ``drift`` says so, flag ``None``.
"""
from __future__ import annotations

from .drift import Monitor, take


class ServiceDrift:
    """Model name -> (version number, :class:`Monitor`), for the models a service answers for."""

    def __init__(self):
        self._references: dict[str, tuple] = {}
        self._monitors: dict[str, tuple[int, Monitor]] = {}

    def know(self, det) -> str:
        """Keep the reference distributions of a checked detector; its model id (the catalog's check)."""
        model = det.model_
        self._references[det.model_id] = (model.drift, model.threshold.scores)
        return det.model_id

    def start(self, name: str, number: int, model_id: str) -> None:
        """A fresh monitor for ``name`` at version ``number`` (model ``model_id``), unless it has one already."""
        held = self._monitors.get(name)
        if held is None or number > held[0]:
            self._monitors[name] = (number, Monitor(*self._references[model_id]))

    def answer(self, name: str, body: dict) -> dict:
        """Feed one answered part (a 200 body) to ``name``'s monitor; ``body`` with its ``drift`` field set."""
        number = body.get("model_version")
        self.start(name, number, body["model_id"])
        held, monitor = self._monitors[name]
        if number < held:
            body["drift"] = {"flag": None, "reason": f"judged by version {number}, since replaced by version {held}: "
                             "its drift is no longer followed"}
            return body
        take(monitor, body)
        body["drift"] = {"flag": monitor.flag, "reason": monitor.reason}
        return body

    def state(self, name: str) -> dict | None:
        """What ``GET /models`` shows of ``name``'s drift (None before its monitor exists)."""
        held = self._monitors.get(name)
        if held is None:
            return None
        number, m = held
        summary = m.summary()
        return dict({k: summary[k] for k in ("flag", "reason", "first_flag_part", "parts", "good_parts", "cusum")},
                    version=number)

    def monitor(self, name: str) -> Monitor | None:
        held = self._monitors.get(name)
        return None if held is None else held[1]
