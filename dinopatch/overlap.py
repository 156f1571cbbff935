"""Overlapped stages of a batch run: batch n+1 read and aligned, batch n-1 post-processed, while the backbone
works on batch n.

:func:`overlapped` runs a three-stage pipeline.  ``source`` is iterated in one thread (reading, decoding and
aligning: OpenCV), ``work`` is applied to its items in a second (the backbone and the bank: ONNX Runtime,
OpenVINO, torch, the compiled kernels), and the results come out in order in the caller's thread, which
post-processes each while the next is computed.  These libraries release the GIL, so the stages of
different batches run at once.  Queues are bounded (``depth`` items each): a slow caller holds the stages
back instead of buffering without limit.

With ``threads=False`` the same stages run in turn in the caller's thread: the same items in the same
batches, so the same results, only later.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
U = TypeVar("U")

STAGE_NAMES = ("dinopatch-align", "dinopatch-infer")
_POLL = 0.05  # how often a stage blocked on a queue looks whether the caller went away
_END = object()


class _Failure:
    """An exception raised in a stage thread, carried to the caller in its place."""

    def __init__(self, error: BaseException):
        self.error = error


def overlapped(source: Iterable[T], work: Callable[[T], U], *, threads: bool = True, depth: int = 1,
               grace: float | None = None) -> Iterator[U]:
    """``work(item)`` for each item of ``source``, in order, the two computed in threads of their own.

    Args:
        source: the first stage; iterated in a thread named ``dinopatch-align``.
        work: the second stage; called in a thread named ``dinopatch-infer``.
        threads: False runs both stages in turn in the caller's thread instead (nothing overlaps).
        depth: items each queue between the stages holds (>= 1).
        grace: seconds closing waits for the source thread while it is inside ``next()`` of ``source``
            (a camera waiting for a trigger cannot be interrupted from Python); None waits until it returns.

    Yields:
        ``work(item)`` per item.  An exception of ``source`` or ``work`` is raised here after the
        results of the items before it, and ends the run.

    Closing the generator (``close()``, ``break``, an exception or KeyboardInterrupt in the caller) stops
    both threads and waits for the step each is in: the ``work`` call in flight and the current item of
    ``source``.  After ``grace`` the source thread is left, a daemon, to end as soon as its ``next()``
    returns, without calling ``next()`` again.  Use it in a ``with contextlib.closing(...)`` block, so that
    the threads end when the caller stops, not when the generator is collected.
    """
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not threads:
        return (work(item) for item in source)
    return _threaded(iter(source), work, int(depth), grace)


def _threaded(items: Iterator, work: Callable, depth: int, grace: float | None) -> Iterator:
    """The generator behind :func:`overlapped` with threads; see there for what closing it does."""
    ready: queue.Queue = queue.Queue(depth)  # source -> work
    done: queue.Queue = queue.Queue(depth)  # work -> caller
    stop = threading.Event()
    in_source = threading.Event()  # set while the source thread is inside next()

    def put(q: queue.Queue, item) -> bool:
        # Gives up when the caller went away, so that no thread blocks for ever.
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
        return _END

    def produce():
        while not stop.is_set():
            in_source.set()
            try:
                item = next(items, _END)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller
                item = _Failure(e)
            finally:
                in_source.clear()
            if not put(ready, item) or item is _END or isinstance(item, _Failure):
                return

    def consume():
        while True:
            item = get(ready)
            if item is _END or isinstance(item, _Failure):
                put(done, item)
                return
            try:
                out = work(item)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller
                put(done, _Failure(e))
                return
            if not put(done, out):
                return

    source = threading.Thread(target=produce, name=STAGE_NAMES[0], daemon=True)
    worker = threading.Thread(target=consume, name=STAGE_NAMES[1], daemon=True)
    source.start()
    worker.start()
    try:
        while True:
            item = done.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()
        waited_from = time.monotonic()
        while source.is_alive():
            source.join(_POLL / 5)
            if grace is not None and in_source.is_set() and time.monotonic() - waited_from > grace:
                break
