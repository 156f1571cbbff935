"""Overlapped stages: the same results as the stages in turn, in order, errors in place, no thread left behind."""
import _thread
import json
import threading
import time
from contextlib import closing

import cv2
import numpy as np
import pytest
from conftest import screws

from dinopatch import data
from dinopatch.overlap import STAGE_NAMES, overlapped
from dinopatch.predictions import predict_files
from dinopatch.stream import stream


def _stage_threads(before):
    return [t for t in threading.enumerate() if t not in before and t.name in STAGE_NAMES]


def _slow_square(x):
    time.sleep(0.001 * (x % 3))  # uneven stage times: a stage overtaking another would reorder
    return x * x


@pytest.mark.parametrize("threads", [True, False])
@pytest.mark.parametrize("depth", [1, 3])
def test_results_in_order_and_the_work_runs_beside_the_source(threads, depth):
    seen = []

    def source():
        for i in range(20):
            seen.append(("source", i, threading.current_thread().name))
            yield i

    assert list(overlapped(source(), _slow_square, threads=threads, depth=depth)) == [i * i for i in range(20)]
    names = {name for _, _, name in seen}
    assert names == ({STAGE_NAMES[0]} if threads else {threading.current_thread().name})


def test_stages_overlap_in_time():
    """Three stages of 50 ms over 4 items: about 6 steps with threads, 12 in turn."""
    def source():
        for i in range(4):
            time.sleep(0.05)
            yield i

    def work(i):
        time.sleep(0.05)
        return i

    def run(threads):
        t0 = time.perf_counter()
        for _ in overlapped(source(), work, threads=threads):
            time.sleep(0.05)
        return time.perf_counter() - t0

    in_turn, threaded = run(False), run(True)
    assert threaded < 0.8 * in_turn, f"threaded {threaded:.2f} s, in turn {in_turn:.2f} s"


@pytest.mark.parametrize("threads", [True, False])
@pytest.mark.parametrize("where", ["source", "work"])
def test_an_error_comes_after_the_results_before_it(threads, where):
    def source():
        for i in range(6):
            if where == "source" and i == 3:
                raise OSError("camera unplugged")
            yield i

    def work(i):
        if where == "work" and i == 3:
            raise ValueError("cannot score this one")
        return i

    before = set(threading.enumerate())
    got = []
    with pytest.raises(OSError if where == "source" else ValueError):
        for r in overlapped(source(), work, threads=threads):
            got.append(r)
    assert got == [0, 1, 2] and not _stage_threads(before)


@pytest.mark.parametrize("where", ["caller", "work", "source"])
def test_keyboard_interrupt_leaves_no_thread(where):
    before = set(threading.enumerate())

    def source():
        for i in range(1000):
            if where == "source" and i == 5:
                raise KeyboardInterrupt
            yield i

    def work(i):
        if where == "work" and i == 5:
            raise KeyboardInterrupt
        return i

    with pytest.raises(KeyboardInterrupt):
        with closing(overlapped(source(), work, depth=1)) as results:
            for r in results:
                if where == "caller" and r == 5:
                    raise KeyboardInterrupt
    assert not _stage_threads(before)


def test_ctrl_c_while_the_caller_waits_leaves_no_thread():
    """The signal's KeyboardInterrupt arrives in the main thread while it waits for a slow backbone."""
    before = set(threading.enumerate())

    def work(i):
        time.sleep(0.2)
        return i

    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        with closing(overlapped(iter(range(100)), work)) as results:
            for _ in results:
                pass
    timer.join()
    assert not _stage_threads(before)


def test_depth_is_checked():
    with pytest.raises(ValueError, match="depth"):
        overlapped([], lambda x: x, depth=0)


# ----------------------------------------------------------------------------- the detector's runs


@pytest.fixture(scope="module")
def frames():
    return screws("good", 3, seed=2) + screws("missing_washer", 2, seed=3) + screws("extra_object", 2, seed=4)


@pytest.fixture
def det(screw_detector, monkeypatch):
    monkeypatch.setattr(screw_detector, "batch_size", 2)  # 7 frames: 4 batches, the last one short
    monkeypatch.setattr(screw_detector, "overlap", True)
    return screw_detector


def _same(a, b):
    assert [r.score for r in a] == [r.score for r in b]
    assert [r.is_anomaly for r in a] == [r.is_anomaly for r in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.anomaly_map, y.anomaly_map)


def test_predict_overlapped_equals_in_turn(det, frames, monkeypatch, tmp_path):
    paths = []
    for i, im in enumerate(frames):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), im)
    monkeypatch.setattr(det, "overlap", False)
    serial, serial_files = det.predict(frames), det.predict(paths)
    monkeypatch.setattr(det, "overlap", True)
    _same(det.predict(frames), serial)
    _same(det.predict(paths), serial_files)
    _same(serial_files, serial)  # lossless files: reading them is part of the stages


def test_predict_files_and_stream_overlapped_equal_in_turn(det, frames, monkeypatch, tmp_path):
    paths = []
    for i, im in enumerate(frames):
        paths.append(tmp_path / "in" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(paths[-1]), im)
    paths.insert(3, tmp_path / "in" / "missing.png")
    records, streamed = {}, {}
    for overlap in (False, True):
        monkeypatch.setattr(det, "overlap", overlap)
        out = tmp_path / f"out-{overlap}"
        predict_files(det, paths, out, root=tmp_path / "in", progress=False)
        records[overlap] = [{k: v for k, v in json.loads(line).items() if k != "latency_ms"}
                            for line in (out / "predictions.jsonl").read_text().splitlines()]
        streamed[overlap] = [f.result for f in stream(det, iter(frames), batch_size=2, overlap=overlap)]
    assert records[True] == records[False]
    assert [r["error"] is not None for r in records[True]] == [i == 3 for i in range(len(paths))]
    _same(streamed[True], streamed[False])


@pytest.mark.parametrize("where", ["post", "backbone", "read"])
def test_predict_interrupted_leaves_no_thread(det, frames, monkeypatch, where):
    before = set(threading.enumerate())
    calls = []

    def interrupted(real):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return call

    if where == "post":
        monkeypatch.setattr(det, "result_from", interrupted(det.result_from))
    elif where == "backbone":
        monkeypatch.setattr(det, "distances_aligned", interrupted(det.distances_aligned))
    else:
        monkeypatch.setattr("dinopatch.detector.load_image", interrupted(data.load_image))
    with pytest.raises(KeyboardInterrupt) as info:
        det.predict(frames)
    # While the traceback is alive (it holds predict's frames): the threads ended with predict, not on collection.
    assert info.traceback and not _stage_threads(before)


def test_one_batch_runs_in_the_callers_thread(det, frames, monkeypatch):
    """Nothing to overlap in one batch (a service's single image): no thread is started for it."""
    started = []
    real = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), real(self))[1])
    det.predict(frames[:2])
    assert not [n for n in started if n in STAGE_NAMES]
    det.predict(frames[:3])
    assert sorted(n for n in started if n in STAGE_NAMES) == sorted(STAGE_NAMES)


def test_predict_files_interrupted_while_writing_leaves_no_thread(det, frames, tmp_path):
    paths = []
    for i, im in enumerate(frames):
        paths.append(tmp_path / "in" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(paths[-1]), im)
    before = set(threading.enumerate())

    def stamp(record, image, outcome):
        if record["path"].endswith("2.png"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        predict_files(det, paths, tmp_path / "out", root=tmp_path / "in", overlays=False, progress=False,
                      stamp=stamp)
    assert info.traceback and not _stage_threads(before)
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 2  # the first batch's


@pytest.mark.parametrize("overlap", [True, False])
def test_stream_follows_the_detectors_overlap_unless_told(det, frames, monkeypatch, overlap):
    started = []
    real = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), real(self))[1])
    monkeypatch.setattr(det, "overlap", overlap)
    assert len(list(stream(det, iter(frames[:3])))) == 3
    assert bool([n for n in started if n in STAGE_NAMES]) == overlap
    started.clear()
    assert len(list(stream(det, iter(frames[:3]), overlap=not overlap))) == 3
    assert bool([n for n in started if n in STAGE_NAMES]) == (not overlap)
