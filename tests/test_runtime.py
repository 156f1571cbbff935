"""The line runtime: streaming equals predict, predict is thread-safe, memory stays flat."""
import gc
import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from conftest import screws

from dinopatch.stream import stream


@pytest.fixture(scope="module")
def frames():
    return screws("good", 4, seed=2) + screws("missing_washer", 2, seed=3) + screws("extra_object", 2, seed=4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stream_equals_predict(screw_detector, frames, batch_size):
    det = screw_detector
    old, det.batch_size = det.batch_size, batch_size
    try:
        expected = det.predict(frames)
    finally:
        det.batch_size = old
    got = list(stream(det, iter(frames), batch_size=batch_size, depth=2))
    assert [f.index for f in got] == list(range(len(frames)))
    for e, f in zip(expected, got):
        assert f.result.score == e.score and f.result.is_anomaly == e.is_anomaly
        np.testing.assert_array_equal(f.result.anomaly_map, e.anomaly_map)
        assert f.latency > 0


def test_stream_reports_a_bad_frame_and_stops(screw_detector, frames, tmp_path):
    bad = iter([frames[0], tmp_path / "missing.png", frames[1]])
    out = stream(screw_detector, bad)
    with pytest.raises(FileNotFoundError):
        list(out)


def test_stream_consumer_may_stop_early(screw_detector, frames):
    before = {t.name for t in __import__("threading").enumerate()}
    for f in stream(screw_detector, iter(frames * 4), depth=1):
        break
    after = {t.name for t in __import__("threading").enumerate()}
    assert not {n for n in after - before if n.startswith("dinopatch-")}


def test_predict_from_four_threads_equals_serial(screw_detector, frames):
    serial = screw_detector.score_images(frames)
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda im: screw_detector.score_images([im])[0], frames * 2))
    # One image per call in the threads: compare with one image per call serially.
    single = [screw_detector.score_images([im])[0] for im in frames]
    np.testing.assert_array_equal(parallel, single * 2)
    np.testing.assert_allclose(single, serial, rtol=1e-4)


def test_soak_memory_and_handles(screw_detector, frames):
    """Short version of the soak (the note reports 2,000 predictions)."""
    proc = psutil.Process()
    n = int(os.environ.get("DINOPATCH_SOAK", "150"))
    for _ in range(20):  # warm-up: allocator pools, torch caches
        screw_detector.predict(frames[:1])
    gc.collect()
    rss0, fds0 = proc.memory_info().rss, proc.num_fds()
    for i in range(n):
        screw_detector.predict([frames[i % len(frames)]])
    gc.collect()
    rss1, fds1 = proc.memory_info().rss, proc.num_fds()
    growth = rss1 / rss0 - 1
    print(f"soak: {n} predictions; RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB ({growth:+.2%}); "
          f"open files {fds0} -> {fds1}")
    assert growth < 0.05, f"resident memory grew {growth:.1%} over {n} predictions"
    assert fds1 <= fds0


def test_stream_checks_arguments_when_called(screw_detector):
    from dinopatch import DinoPatch, NotFittedError

    with pytest.raises(NotFittedError):
        stream(DinoPatch(), [])
    with pytest.raises(ValueError, match="batch_size"):
        stream(screw_detector, [], batch_size=0)


def _stream_threads(before):
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("dinopatch-")]


class _Camera:
    """A frame source that hands out ``n`` frames, then blocks in ``next()`` until released."""

    def __init__(self, frames, n):
        self.frames, self.n, self.calls = frames, n, 0
        self.release = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.calls > self.n:
            self.release.wait()
        return self.frames[self.calls % len(self.frames)]


def test_close_while_the_source_blocks(screw_detector, frames):
    """close() gives up on a source blocked in its own next() after its grace of 0.2 s (main: 5 s and a
    thread left running); the thread it leaves ends when next() returns, and next() is not called again."""
    before = set(threading.enumerate())
    camera = _Camera(frames, 2)
    out = stream(screw_detector, camera)
    assert [next(out).index, next(out).index] == [0, 1]
    while not camera.calls > 2:  # the align thread is now waiting in the source
        time.sleep(0.01)
    t0 = time.monotonic()
    out.close()
    closing = time.monotonic() - t0
    assert closing < 2, f"close took {closing:.1f} s"
    left = _stream_threads(before)
    assert [t.name for t in left] == ["dinopatch-align"] and left[0].daemon
    camera.release.set()
    left[0].join(timeout=5)
    assert not left[0].is_alive() and camera.calls == 3


@pytest.mark.parametrize("how", ["close", "break", "raise"])
def test_no_thread_outlives_close_with_full_queues(screw_detector, frames, how):
    """A fast endless source and a consumer that stops after one frame: every queue is full."""
    before = set(threading.enumerate())
    out = stream(screw_detector, itertools.cycle(frames), depth=1)
    first = next(out)
    time.sleep(0.3)  # both stages fill their queues and block
    if how == "close":
        out.close()
    elif how == "break":
        for _ in out:
            break
        del out
    else:
        with pytest.raises(KeyError):
            for _ in out:
                raise KeyError("consumer failed")
        del out
    gc.collect()
    assert first.index == 0 and not _stream_threads(before)


@pytest.fixture(scope="module")
def frame_scores(screw_detector, frames):
    return screw_detector.score_images(frames)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("failure", ["bad frame", "source raises"])
def test_frames_before_an_error_are_scored(screw_detector, frames, frame_scores, tmp_path, batch_size, k,
                                           failure):
    """With batch_size=4 an error on frame k used to drop the frames of k's batch read before it."""
    def source():
        yield from frames[:k]
        if failure == "bad frame":
            yield tmp_path / "missing.png"
        raise OSError("camera unplugged")

    got = []
    with pytest.raises(FileNotFoundError if failure == "bad frame" else OSError):
        for f in stream(screw_detector, source(), batch_size=batch_size):
            got.append(f)
    assert [f.index for f in got] == list(range(k))
    np.testing.assert_allclose([f.result.score for f in got], frame_scores[:k], rtol=1e-4)
