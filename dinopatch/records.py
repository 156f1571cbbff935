"""One machine-readable record per input: what ``predict`` writes, and what a service answers.

The CLI writes one record per line of ``predictions.jsonl`` and the flat part
of it as a row of ``scores.csv``; a service can answer with the same record, so
a line engineer reads the same fields wherever a verdict came from.  Records
hold only JSON values: a score that could not be measured is ``null``, never a
NaN literal.

Any file name is recorded, and all text is valid UTF-8: a name that is not
valid UTF-8 gives ``path`` as a display form (each undecodable byte spelled
``\\xNN``) and, right after it, ``path_base64``: the base64 of the
name's exact bytes (``os.fsencode``), from which
``os.fsdecode(base64.b64decode(...))`` gives the path back.  A CSV cell that
starts like a spreadsheet formula (``=``, ``+``, ``-``, ``@``, tab, CR) is
written with a leading ``'``.
"""
from __future__ import annotations

import base64
import math
import os

import cv2
import numpy as np

from .drift import part_statistics

# Every record has these keys, in this order.
FIELDS = ("path", "score", "p_value", "is_anomaly", "aligned", "reason", "threshold", "threshold_source",
          "model_id", "engine", "latency_ms", "defect_area_px", "defect_regions", "defect_boxes", "error")
# The keys that fit in a CSV cell (defect_boxes is a list).
CSV_FIELDS = tuple(f for f in FIELDS if f != "defect_boxes")
# A mask broken into thousands of specks is one verdict, not thousands of boxes:
# the largest are kept, and the record says how many there were.
MAX_BOXES = 32
# A text cell starting with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def result_record(result, det, *, path: str | os.PathLike | None = None, latency_ms: float | None = None,
                  engine: str | None = None) -> dict:
    """The record of one scored image.

    Args:
        result: a :class:`~dinopatch.result.Result`.
        det: the detector that made it (gives the model id).
        path: where the image came from (None for an image sent as bytes or an array).
        latency_ms: time from reading the image to its result.
        engine: the backbone engine that ran (default: the detector's setting).

    Returns:
        a dict with the keys of :data:`FIELDS`; ``p_value`` is the score's conformal p-value among the
        held-out good parts (:meth:`~dinopatch.calibration.Threshold.p_value`); ``defect_boxes`` lists
        ``[x, y, width, height]`` of the largest :data:`MAX_BOXES` connected
        defect regions in input pixels, largest first; ``defect_regions``
        says how many there were in all.
    """
    boxes, regions = defect_boxes(result.mask)
    return {
        **path_entries(path),
        "score": _finite_or_none(result.score),
        "p_value": result.p_value,
        "is_anomaly": bool(result.is_anomaly),
        "aligned": bool(result.aligned),
        "reason": result.alignment.reason,
        "threshold": _finite_or_none(result.threshold),
        "threshold_source": result.threshold_source,
        "model_id": det.model_id,
        "engine": os.fspath(det.engine) if engine is None else engine,
        "latency_ms": None if latency_ms is None else round(float(latency_ms), 3),
        "defect_area_px": int(np.count_nonzero(result.mask)),
        "defect_regions": regions,
        "defect_boxes": boxes,
        "error": None,
    }


def error_record(error: BaseException | str, det, *, path: str | os.PathLike | None = None,
                 engine: str | None = None) -> dict:
    """The record of an input that could not be scored: every verdict field ``null``, ``error`` says why."""
    record = {**path_entries(path), **dict.fromkeys(FIELDS[1:])}
    record.update(model_id=det.model_id,
                  engine=os.fspath(det.engine) if engine is None else engine,
                  error=text(error if isinstance(error, str) else f"{type(error).__name__}: {error}"))
    return record


def path_entries(path: str | os.PathLike | bytes | None) -> dict:
    """``{"path": text}``, with ``"path_base64"`` beside it where the name is not valid UTF-8."""
    if path is None:
        return {"path": None}
    raw = os.fsencode(path)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path": raw.decode("utf-8", "backslashreplace"), "path_base64": base64.b64encode(raw).decode("ascii")}


def text(s: str) -> str:
    """``s`` as valid UTF-8: the undecodable bytes of a file name in it (lone surrogates) spelled ``\\xNN``."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_row(record: dict) -> dict:
    """The record's values as CSV cells: booleans as 0/1, text that a spreadsheet would run as a formula
    quoted with a leading ``'``."""
    row = {}
    for k, v in record.items():
        if isinstance(v, bool):
            v = int(v)
        elif isinstance(v, str):
            v = text(v)
            v = "'" + v if v.startswith(FORMULA_STARTS) else v
        row[k] = v
    return row


def defect_boxes(mask: np.ndarray, limit: int = MAX_BOXES) -> tuple[list[list[int]], int]:
    """Bounding boxes ``[x, y, width, height]`` of the 8-connected regions of ``mask``, largest area first.

    Returns:
        at most ``limit`` boxes, and the number of regions in all.
    """
    n, _, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask, np.uint8), connectivity=8)
    stats = stats[1:]  # row 0 is the background
    order = np.argsort(-stats[:, cv2.CC_STAT_AREA], kind="stable")[:limit]
    return [[int(v) for v in stats[i, :4]] for i in order], int(n - 1)


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def score_images(det, images: list[np.ndarray], masks: bool = False, statistics: bool = False) -> list[dict]:
    """The :mod:`dinopatch.records` record of each image, scored together; one that fails gets its error record.

    Args:
        det: a fitted :class:`dinopatch.DinoPatch`.
        images: uint8 images, as :func:`dinopatch.data.load_image` returns them.
        masks: add ``mask_png``, the defect mask as a base64 PNG (0/255).
        statistics: add ``drift: {"statistics": ...}``, the part's :func:`dinopatch.drift.part_statistics`
            (None for a part the aligner could not place), for a drift monitor kept elsewhere.
    """
    try:
        results = det.predict(images)
    except Exception as e:  # noqa: BLE001  (one bad image must not sink the others: they go one by one)
        if len(images) == 1:
            return [error_record(e, det)]
        return [rec for im in images for rec in score_images(det, [im], masks, statistics)]
    return [_record(r, det, masks, im if statistics else None) for r, im in zip(results, images)]


def _record(result, det, masks: bool, image: np.ndarray | None = None) -> dict:
    rec = result_record(result, det)
    if image is not None:
        stats = part_statistics(image, result.alignment, det.image_size) if result.aligned else None
        rec["drift"] = {"statistics": stats}
    if masks:
        _, png = cv2.imencode(".png", result.mask.astype(np.uint8) * 255)
        rec["mask_png"] = base64.b64encode(png.tobytes()).decode("ascii")
    return rec
