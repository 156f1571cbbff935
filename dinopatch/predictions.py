"""Scoring image files into an output folder: one record per input, written as results come.

``predictions.jsonl`` holds one :func:`~dinopatch.records.result_record` per
input, in input order, and ``scores.csv`` the same records' flat fields.  A
file that cannot be read or scored gets a record with its ``error`` and the
run goes on.  With the detector's ``overlap``, the next batch is read and
aligned and the last one post-processed and written while the backbone runs
(:mod:`.overlap`); a few batches of images and maps are held at a time, so
the memory does not grow with the number of inputs.
"""
from __future__ import annotations

import csv
import json
import os
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from .data import read_image, write_png
from .inputs import relative_name
from .overlap import overlapped
from .records import CSV_FIELDS, csv_row, error_record, result_record
from .viz import overlay

# --save-maps: exact float32 arrays, or 16-bit PNGs any image viewer opens.
MAP_FORMATS = ("npy", "png")
# In a 16-bit map PNG, 65535 stands for twice the pixel threshold (the overlays'
# colour scale); larger values saturate.
PNG_FULL_SCALE_THRESHOLDS = 2.0


@dataclass
class Summary:
    """What a run did: counts, and the first failure (input path and error) for the message."""

    scored: int = 0
    anomalous: int = 0
    failed: int = 0
    first_error: tuple[str, str] | None = field(default=None)


def predict_files(det, files: list[Path], out: str | os.PathLike, *, root: Path, overlays: bool = True,
                  save_maps: str | None = None, progress: bool = True, engine: str | None = None,
                  stamp=None) -> Summary:
    """Score ``files`` with ``det`` and write the records, overlays and maps into ``out``.

    Args:
        det: a fitted :class:`~dinopatch.DinoPatch`; it runs ``det.batch_size`` images at a time, the stages
            overlapped where ``det.overlap`` says so.
        files: image files, scored and written in this order.
        out: output folder (created).
        root: folder the overlay and map names are relative to (see :func:`~dinopatch.inputs.relative_name`).
        overlays: write ``overlays/<name>.png`` per scored input.
        save_maps: ``"npy"`` or ``"png"`` (see :data:`MAP_FORMATS`) to write ``maps/<name>.<format>``.
        progress: show a progress bar.
        engine: the engine name the records give (default: ``det.engine``).
        stamp: called as ``stamp(record, image, Result or exception)`` before each record is written, in
            input order (the line's id and drift fields, :class:`~dinopatch.stamp.Stamp`).

    The first batch's ``latency_ms`` includes building the backbone engine
    unless it was built before (the CLI builds it first).
    """
    if save_maps is not None and save_maps not in MAP_FORMATS:
        raise ValueError(f"save_maps must be one of {MAP_FORMATS}, got {save_maps!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vmax = PNG_FULL_SCALE_THRESHOLDS * det.threshold_.pixel
    engine = os.fspath(det.engine) if engine is None else engine
    summary = Summary()
    bs = int(det.batch_size)
    model = det.model_  # every batch by the model in force now
    read = (_read(model, files[i:i + bs]) for i in range(0, len(files), bs))
    scored = overlapped(read, lambda batch: _score(det, batch),
                        threads=bool(det.overlap) and len(files) > bs)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as jsonl, \
            open(out / "scores.csv", "w", newline="", encoding="utf-8") as table, \
            tqdm(total=len(files), desc="predict", unit="image", disable=not progress) as bar, closing(scored):
        rows = csv.DictWriter(table, CSV_FIELDS, extrasaction="ignore")
        rows.writeheader()
        for batch in scored:
            for path, image, outcome, latency_ms in _judged(det, batch):
                if isinstance(outcome, BaseException):
                    record = error_record(outcome, det, path=path, engine=engine)
                    summary.failed += 1
                    summary.first_error = summary.first_error or (str(path), record["error"])
                else:
                    record = result_record(outcome, det, path=path, latency_ms=latency_ms, engine=engine)
                    summary.scored += 1
                    summary.anomalous += bool(outcome.is_anomaly)
                    if overlays:
                        name = relative_name(path, root, ".png")
                        _write_overlay(out / "overlays" / name, image, outcome, vmax)
                    if save_maps:
                        name = relative_name(path, root, f".{save_maps}")
                        _write_map(out / "maps" / name, outcome.anomaly_map, vmax)
                if stamp is not None:
                    stamp(record, image, outcome)
                jsonl.write(json.dumps(record, allow_nan=False) + "\n")
                rows.writerow(csv_row(record))
            # A reader tailing the files, or a run cut short, sees every finished batch.
            jsonl.flush()
            table.flush()
            bar.update(len(batch.paths))
    return summary


def score_batch(det, paths: list[Path]):
    """``(path, image, Result or the exception, latency in ms)`` per path, in order.

    Latency runs from the start of reading the batch to its results: with
    ``batch_size=1``, one image's own.
    """
    return _judged(det, _score(det, _read(det.model_, paths)))


@dataclass
class _Batch:
    """Files on their way through the stages of :func:`predict_files`.

    ``outcomes`` holds per path what its last stage made of it: the aligned item (:meth:`.Fitted.align`), then
    its :class:`~.result.PatchDistances`, then its :class:`~.result.Result`; or the exception that stopped it.
    """

    t0: float
    paths: list[Path]
    images: list  # the image read, or None
    outcomes: list


def _read(model, paths: list[Path]) -> _Batch:
    """First stage: read and align each file; one that fails fails alone."""
    batch = _Batch(time.perf_counter(), paths, [], [])
    for p in paths:
        try:
            image = read_image(p)
        except (ValueError, OSError) as e:
            batch.images.append(None)
            batch.outcomes.append(e)
            continue
        batch.images.append(image)
        try:
            batch.outcomes.append(model.align([image])[0])
        except (ValueError, cv2.error) as e:
            batch.outcomes.append(e)
    return batch


def _score(det, batch: _Batch) -> _Batch:
    """Second stage: the backbone and the bank on the batch's aligned images."""
    aligned = [i for i, o in enumerate(batch.outcomes) if not isinstance(o, BaseException)]
    for i, outcome in zip(aligned, _distances_each(det, [batch.outcomes[i] for i in aligned])):
        batch.outcomes[i] = outcome
    return batch


def _distances_each(det, items: list[tuple]) -> list:
    """Distances of the items as one batch; if the batch fails, of each alone, so one bad image fails alone."""
    if not items:
        return []
    try:
        return det.distances_aligned(items)
    except (ValueError, cv2.error) as e:
        if len(items) == 1:
            return [e]
    return [outcome for item in items for outcome in _distances_each(det, [item])]


def _judged(det, batch: _Batch) -> list[tuple]:
    """Last stage: each image's :class:`~.result.Result` (or its exception), with the batch's latency."""
    for i, outcome in enumerate(batch.outcomes):
        if not isinstance(outcome, BaseException):
            try:
                batch.outcomes[i] = det.result_from(outcome)
            except (ValueError, cv2.error) as e:
                batch.outcomes[i] = e
    latency_ms = (time.perf_counter() - batch.t0) * 1e3
    return [(p, im, o, latency_ms) for p, im, o in zip(batch.paths, batch.images, batch.outcomes)]


def _write_overlay(path: Path, image: np.ndarray, result, vmax: float) -> None:
    caption = f"{result.score:.3f}{' ANOMALY' if result.is_anomaly else ''}" \
              f"{'' if result.aligned else ' (unaligned: ' + result.alignment.reason + ')'}"
    write_png(path, overlay(image, result.anomaly_map, vmax=vmax, pred_mask=result.mask, text=caption))


def _write_map(path: Path, amap: np.ndarray, vmax: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, amap.astype(np.float32, copy=False), allow_pickle=False)
    else:
        write_png(path, np.rint(np.clip(amap / vmax, 0.0, 1.0) * 65535).astype(np.uint16))
