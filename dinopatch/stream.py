"""The inspection-line runtime: frames in, results out, stages overlapped.

A line delivers one frame at a time and cares about steady per-frame latency.
:func:`stream` runs the three stages of :meth:`DinoPatch.predict` in a
pipeline (:func:`~dinopatch.overlap.overlapped`): reading and alignment
(OpenCV) on one thread, the backbone and the bank on a second,
post-processing (OpenCV) in the caller's thread, so the CPU stages of one
frame run while the backbone works on the next.  With ``overlap=False`` (or
the detector's ``overlap`` off) the stages run in turn in the caller's thread.

Results come out in input order and equal ``predict`` with the same
``batch_size``.
"""
from __future__ import annotations

import itertools
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Iterable, Iterator

from .data import load_image
from .detector import DinoPatch, Result
from .drift import Monitor
from .overlap import overlapped

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


def stream(det: DinoPatch, frames: Iterable, *, batch_size: int = 1, depth: int = 4,
           drift: Monitor | None = None, overlap: bool | None = None) -> Iterator[Frame]:
    """Score frames as they come, overlapping alignment and post-processing with inference.

    Args:
        det: a fitted detector.
        frames: an iterable of images (arrays or paths), e.g. a camera generator.
        batch_size: frames per backbone call (1 gives the lowest latency).
        depth: capacity of each queue between stages, in batches.
        drift: a :class:`~dinopatch.drift.Monitor` (e.g. ``Monitor.for_model(det)``) that follows the frames;
            each :class:`Frame` then carries its ``drift`` field.
        overlap: run the stages in threads, overlapped; False runs them in turn, in the caller's thread, with
            the same results (default: the detector's ``overlap``).

    Yields:
        :class:`Frame` per input frame, in input order. When a frame cannot be
        read or aligned, the frames before it are yielded first, then its
        error is raised.

    Closing the generator (``close()``, ``break`` out of a loop over it, an
    exception in the consumer) stops both stage threads and waits for them, so
    no thread of the stream runs on afterwards. It waits for the step each is
    in: the backbone call in flight (one batch) and the current batch's
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
    return _pipeline(det, frames, int(batch_size), int(depth), drift, bool(det.overlap if overlap is None else overlap))


_SOURCE_GRACE = 0.2  # how long close() waits for a frame source blocked in its own next()


def _aligned(det: DinoPatch, frames: Iterable, batch_size: int, keep_images: bool) -> Iterator[tuple[list, list]]:
    """``(starts, items)`` per batch: ``(time taken, image or None)`` and the aligned item of each frame.

    Frames are aligned one by one as they arrive, so that when frame k fails, the frames before it in
    its batch are yielded, to be scored, before its error is raised.
    """
    batch, starts, failure = [], [], None
    source = iter(frames)
    for index in itertools.count():
        try:
            frame = next(source, _DONE)
            if frame is _DONE:
                break
            t0 = time.perf_counter()
            image = load_image(frame, index)  # errors name the frame's place
            batch += det.align_images([image])
        except Exception as e:  # noqa: BLE001 - raised after the frames before it
            failure = e
            break
        starts.append((t0, image if keep_images else None))
        if len(batch) == batch_size:
            yield starts, batch
            batch, starts = [], []
    if batch:
        yield starts, batch
    if failure is not None:
        raise failure


def _pipeline(det: DinoPatch, frames: Iterable, batch_size: int, depth: int, drift: Monitor | None,
              overlap: bool) -> Iterator[Frame]:
    """The generator behind :func:`stream`; see there for what closing it does."""
    batches = _aligned(det, frames, batch_size, drift is not None)
    scored = overlapped(batches, lambda batch: (batch[0], det.distances_aligned(batch[1])),
                        threads=overlap, depth=depth, grace=_SOURCE_GRACE)
    index = 0
    with closing(scored):
        for starts, raws in scored:
            for (t0, image), raw in zip(starts, raws):
                result = det.result_from(raw)
                field = None if drift is None else drift.observe(image, result, det.image_size)
                yield Frame(index, result, time.perf_counter() - t0, field)
                index += 1
