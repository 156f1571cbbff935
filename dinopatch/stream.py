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

import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from .data import load_image
from .detector import DinoPatch, Result
from .drift import Monitor

_DONE = object()


@dataclass
class Frame:
    """One streamed result.

    Attributes:
        index: position of the frame in the input iterator.
        result: what :meth:`DinoPatch.predict` gives for it.
        latency: seconds from the frame being taken from the iterator to its
            result being ready.
        drift: with a drift monitor, its verdict after this frame (:meth:`.drift.Monitor.update`).
    """

    index: int
    result: Result
    latency: float
    drift: dict | None = None


class _Failure:
    """An exception raised in a stage thread, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def stream(det: DinoPatch, frames: Iterable, *, batch_size: int = 1, depth: int = 4,
           drift: Monitor | None = None) -> Iterator[Frame]:
    """Score frames as they come, overlapping alignment and post-processing with inference.

    Args:
        det: a fitted detector.
        frames: an iterable of images (arrays or paths), e.g. a camera generator.
        batch_size: frames per backbone call (1 gives the lowest latency).
        depth: capacity of each queue between stages, in batches.
        drift: a :class:`~dinopatch.drift.Monitor` (e.g. ``Monitor.for_model(det)``) that follows the frames;
            each :class:`Frame` then carries its ``drift`` field.

    Yields:
        :class:`Frame` per input frame, in input order. When a frame cannot be
        read or aligned, the frames before it are yielded first, then its
        error is raised.

    Closing the generator (``close()``, ``break`` out of a loop over it, an
    exception in the consumer) stops both stage threads and waits for them, so
    no thread of the stream runs on afterwards. It waits for the step each is
    in: the backbone call in flight (one batch) and the current frame's
    alignment. One wait is bounded instead: a frame source blocked inside its
    own ``next()`` (a camera waiting for a trigger) cannot be interrupted from
    Python, so after 0.2 s close returns and leaves that thread, a daemon, to
    end as soon as ``next()`` returns, dropping that frame and never calling
    ``next()`` again.
    """
    # Checked here, not at the first next(): a generator would report them late.
    det.model_
    if int(batch_size) < 1 or int(depth) < 1:
        raise ValueError(f"batch_size and depth must be >= 1, got {batch_size} and {depth}")
    return _pipeline(det, frames, int(batch_size), int(depth), drift)


_POLL = 0.05  # how often a stage blocked on a queue looks whether the consumer went away
_SOURCE_GRACE = 0.2  # how long close() waits for a frame source blocked in its own next()


def _pipeline(det: DinoPatch, frames: Iterable, batch_size: int, depth: int, drift: Monitor | None) -> Iterator[Frame]:
    """The generator behind :func:`stream`; see there for what closing it does."""
    aligned_q: queue.Queue = queue.Queue(depth)
    scored_q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    in_source = threading.Event()  # set while the align thread waits in the source's next()

    def put(q: queue.Queue, item) -> bool:
        # Give up when the consumer went away, so no thread blocks for ever.
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue
        return _DONE

    def next_frame(source: Iterator):
        in_source.set()
        try:
            return next(source, _DONE)
        finally:
            in_source.clear()

    def align_stage():
        # Frames are aligned one by one as they arrive, so that when frame k fails, the frames
        # before it in its batch are already aligned and go on to be scored before the error.
        batch, start = [], []
        try:
            source = iter(frames)
            for index in itertools.count():
                frame = next_frame(source)
                if frame is _DONE or stop.is_set():
                    break
                t0 = time.perf_counter()
                image = load_image(frame, index)  # errors name the frame's place
                batch += det.align_images([image])
                start.append((t0, image if drift is not None else None))
                if len(batch) == batch_size:
                    if not put(aligned_q, (start, batch)):
                        return
                    batch, start = [], []
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            if not batch or put(aligned_q, (start, batch)):
                put(aligned_q, _Failure(e))
            return
        if not batch or put(aligned_q, (start, batch)):
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

    align = threading.Thread(target=align_stage, name="dinopatch-align", daemon=True)
    infer = threading.Thread(target=infer_stage, name="dinopatch-infer", daemon=True)
    align.start()
    infer.start()
    index = 0
    try:
        while True:
            item = scored_q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            for (t0, image), raw in zip(*item):
                result = det.result_from(raw)
                field = None if drift is None else drift.observe(image, result, det.image_size)
                yield Frame(index, result, time.perf_counter() - t0, field)
                index += 1
    finally:
        stop.set()
        infer.join()
        waited_from = time.monotonic()
        while align.is_alive():
            align.join(_POLL / 5)
            if in_source.is_set() and time.monotonic() - waited_from > _SOURCE_GRACE:
                break
