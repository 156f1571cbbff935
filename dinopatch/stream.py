"""The inspection-line runtime: frames in, results out, stages overlapped.

A line delivers one frame at a time and cares about steady per-frame latency.
:func:`stream` runs the three stages of :meth:`DinoPatch.predict` in a
pipeline: reading and alignment (OpenCV) on one thread, the backbone and the
bank on a second, post-processing (OpenCV) in the caller's thread.  OpenCV,
torch, ONNX Runtime and the compiled kernels release the GIL, so the CPU stages
of one frame run while the backbone works on the next.  Queues are bounded: a slow consumer holds the
producer back instead of buffering frames without limit.

Results come out in input order and equal ``predict`` with the same
``batch_size``.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from .data import load_image
from .detector import DinoPatch, Result

_DONE = object()


@dataclass
class Frame:
    """One streamed result.

    Attributes:
        index: position of the frame in the input iterator.
        result: what :meth:`DinoPatch.predict` gives for it.
        latency: seconds from the frame being taken from the iterator to its
            result being ready.
    """

    index: int
    result: Result
    latency: float


class _Failure:
    """An exception raised in a stage thread, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def stream(det: DinoPatch, frames: Iterable, *, batch_size: int = 1, depth: int = 4) -> Iterator[Frame]:
    """Score frames as they come, overlapping alignment and post-processing with inference.

    Args:
        det: a fitted detector.
        frames: an iterable of images (arrays or paths), e.g. a camera generator.
        batch_size: frames per backbone call (1 gives the lowest latency).
        depth: capacity of each queue between stages, in batches.

    Yields:
        :class:`Frame` per input frame, in input order.
    """
    # Checked here, not at the first next(): a generator would report them late.
    det._fitted()
    if int(batch_size) < 1 or int(depth) < 1:
        raise ValueError(f"batch_size and depth must be >= 1, got {batch_size} and {depth}")
    return _pipeline(det, frames, int(batch_size), int(depth))


def _pipeline(det: DinoPatch, frames: Iterable, batch_size: int, depth: int) -> Iterator[Frame]:
    aligned_q: queue.Queue = queue.Queue(depth)
    scored_q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(q: queue.Queue, item) -> bool:
        # Give up when the consumer went away, so no thread blocks for ever.
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _DONE

    def align_stage():
        try:
            batch, start = [], []
            for index, frame in enumerate(frames):
                start.append(time.perf_counter())
                batch.append(load_image(frame, index))  # errors name the frame's place in the stream
                if len(batch) == batch_size:
                    if not put(aligned_q, (start, det.align_images(batch))):
                        return
                    batch, start = [], []
            if batch:
                put(aligned_q, (start, det.align_images(batch)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(aligned_q, _Failure(e))
            return
        put(aligned_q, _DONE)

    def infer_stage():
        while True:
            item = get(aligned_q)
            if item is _DONE or isinstance(item, _Failure):
                put(scored_q, item)
                return
            start, batch = item
            try:
                raw = det.distances_aligned(batch)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                put(scored_q, _Failure(e))
                return
            if not put(scored_q, (start, raw)):
                return

    threads = [threading.Thread(target=align_stage, name="dinopatch-align", daemon=True),
               threading.Thread(target=infer_stage, name="dinopatch-infer", daemon=True)]
    for t in threads:
        t.start()
    index = 0
    try:
        while True:
            item = scored_q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            for t0, raw in zip(*item):
                result = det.result_from(raw)
                yield Frame(index, result, time.perf_counter() - t0)
                index += 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
