"""What the line adds to each record: a unique id, and the drift monitor's verdict so far.

``predict``, ``watch`` and the MQTT outbox share these fields: ``id`` lets a
consumer of an at-least-once channel drop a record it already has, and
``drift`` (:meth:`.drift.Monitor.update`) says whether the good parts still
look like the ones the model was fitted on.
"""
from __future__ import annotations

import uuid

from .drift import Monitor


def record_id() -> str:
    """A new unique record id (32 hex digits)."""
    return uuid.uuid4().hex


class Stamp:
    """Adds ``id`` and ``drift`` to records, in the order the parts were scored.

    Args:
        det: the fitted detector that scores the parts (its canonical frame size is read).
        monitor: the drift monitor (default: one on the detector's reference distributions).
    """

    def __init__(self, det, monitor: Monitor | None = None):
        self.size = int(det.image_size)
        self.monitor = Monitor.for_model(det) if monitor is None else monitor

    def __call__(self, record: dict, image=None, outcome=None) -> dict:
        """Stamp ``record`` (in place, and returned); ``outcome`` is its Result, or None/an exception when the
        part could not be scored (it then leaves the charts as they are)."""
        record["id"] = record_id()
        if outcome is None or isinstance(outcome, BaseException) or image is None:
            m = self.monitor
            record["drift"] = {"flag": m.flag, "reason": m.reason, "statistics": None}
            return record
        record["drift"] = self.monitor.observe(image, outcome, self.size)
        return record
