import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest
from conftest import FAST, screws
from mqtt_broker import Broker, Subscriber

from dinopatch import DinoPatch

TIMEOUT = 120  # seconds any one watcher run may take before the test gives up


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("watch-model") / "model.npz"
    DinoPatch(**FAST).fit(screws("good", 8, seed=1)).save(path)
    return path


def _watch(folder, model, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "dinopatch", "watch", str(folder), "-m", str(model), "-o", str(out),
                             "--settle", "0.5", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=Path(__file__).parents[1])


def _records(out) -> list[dict]:
    log = out / "predictions.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class _Camera:
    """Drops frames into a folder in bursts: most written at once, some slowly, some renamed in, some broken."""

    def __init__(self, folder: Path, n: int):
        parts = [cv2.imencode(".png", im)[1].tobytes() for im in screws("good", 6, seed=9)]
        self.plan = []
        for i in range(n):
            data = parts[i % len(parts)]
            how = ("truncated" if i % 12 == 5 else "slow" if i % 5 == 1 else "renamed" if i % 5 == 2 else "once")
            self.plan.append((folder / f"frame{i:03d}.png", data[: len(data) // 3] if how == "truncated" else data,
                              how))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        for i, (path, data, how) in enumerate(self.plan):
            if how == "slow":  # three pieces, pauses shorter than the settle time
                with open(path, "wb") as f:
                    for k in range(3):
                        f.write(data[k * len(data) // 3:(k + 1) * len(data) // 3])
                        f.flush()
                        time.sleep(0.15)
            elif how == "renamed":
                tmp = path.with_name("." + path.name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            else:
                path.write_bytes(data)
            if i % 10 == 9:
                time.sleep(1.0)  # between bursts


def test_bursts_kill_and_restart_every_file_has_exactly_one_record(model, tmp_path):
    kill_and_restart(model, tmp_path, files=60, outage=3.0)


def kill_and_restart(model, tmp_path, files: int, outage: float) -> None:
    """``files`` frames dropped in bursts; the watcher killed with SIGKILL after a quarter, started again; the broker
    away for ``outage`` seconds in the second run; then every file must have one record, on disk and on the broker."""
    folder, out, done = tmp_path / "camera", tmp_path / "out", tmp_path / "done"
    folder.mkdir()
    broker = Broker(tmp_path).start()
    sub = Subscriber(broker, "line/verdicts")
    camera = _Camera(folder, files)
    extra = ("--move-done", str(done), "--mqtt", broker.url("line/verdicts"), "--mqtt-wait", "30")
    first = _watch(folder, model, out, *extra)
    try:
        camera.thread.start()
        _wait(lambda: len(_records(out)) >= files // 4, TIMEOUT, "the first run's records")
        first.send_signal(signal.SIGKILL)  # no clean-up of any kind
        first.wait(10)
        assert len(_records(out)) < files, "killed while frames were still arriving"
        second = _watch(folder, model, out, *extra)
        _wait(lambda: len(_records(out)) >= files // 2, TIMEOUT, "the second run's records")
        broker.stop()  # the broker goes away mid-run; the records wait in the outbox
        time.sleep(outage)
        broker.start()
        camera.thread.join(TIMEOUT)
        _wait(lambda: len(_records(out)) >= files, TIMEOUT, "every file's record")
        second.send_signal(signal.SIGTERM)  # a clean stop: the outbox delivers what waits, the summary is written
        said, _ = second.communicate(timeout=TIMEOUT)
        assert second.returncode == 3, said  # the truncated frames failed, each with its record
        got = {json.loads(m)["id"] for m in sub.wait_for(files, 30)}
    finally:
        for p in (first, locals().get("second")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        sub.close()
        broker.stop()
    records = _records(out)
    paths = [Path(r["path"]).name for r in records]
    assert sorted(paths) == sorted(p.name for p, _, _ in camera.plan), "every file exactly once"
    broken = {r["path"] for r in records if r["error"]}
    assert broken == {str(p) for p, _, how in camera.plan if how == "truncated"}
    assert all(r["score"] is not None and "drift" in r for r in records if not r["error"])
    assert not list(folder.glob("*.png")) and len(list(done.glob("*.png"))) == files, "every scored file moved"
    assert "resumed" in said and json.loads((out / "drift.json").read_text())["parts"] > 0
    assert got == {r["id"] for r in records}, "every record on the broker, none lost"


def test_a_torn_journal_line_is_cut_and_its_file_scored_again(model, tmp_path):
    from dinopatch.stamp import Stamp
    from dinopatch.watch import FolderWatch

    det = DinoPatch.load(model)
    folder, out = tmp_path / "camera", tmp_path / "out"
    folder.mkdir()
    for i, im in enumerate(screws("good", 2, seed=4)):
        cv2.imwrite(str(folder / f"p{i}.png"), im)
    (folder / ".hidden.png").write_bytes(b"not taken")
    (folder / "notes.txt").write_text("not an image")

    def run():
        stamp = Stamp(det)
        summary = FolderWatch(det, folder, out, settle=0.2, stamp=stamp).run(idle_exit=0.5)
        return summary, stamp, _records(out)

    summary, _, first = run()
    assert (summary.scored, summary.resumed) == (2, 0)
    assert sorted(Path(r["path"]).name for r in first) == ["p0.png", "p1.png"]
    log = out / "predictions.jsonl"
    text = log.read_text()
    log.write_text(text.splitlines(keepends=True)[0] + text.splitlines()[1][:40])  # killed while writing
    summary, stamp, again = run()
    assert (summary.scored, summary.resumed) == (1, 1) and stamp.monitor.parts == 2  # the journal fed drift
    assert [Path(r["path"]).name for r in again] == [Path(r["path"]).name for r in first] and again[0] == first[0]
    summary, _, _ = run()
    assert (summary.scored, summary.resumed) == (0, 2)
    log.write_text(text + "not json\n")
    with pytest.raises(ValueError, match="line 3 is not a record"):
        run()


def test_a_frame_that_breaks_the_scorer_is_an_error_record_and_the_loop_goes_on(model, tmp_path, monkeypatch):
    import dinopatch.watch as watch

    det = DinoPatch.load(model)
    folder = tmp_path / "camera"
    folder.mkdir()
    for i, im in enumerate(screws("good", 3, seed=4)):
        cv2.imwrite(str(folder / f"p{i}.png"), im)
    real = watch.score_batch

    def flaky(det, paths):
        if paths[0].name == "p1.png":
            raise RuntimeError("the engine fell over")
        return real(det, paths)

    monkeypatch.setattr(watch, "score_batch", flaky)
    summary = watch.FolderWatch(det, folder, tmp_path / "out", settle=0.1).run(max_files=3)
    records = _records(tmp_path / "out")
    assert (summary.scored, summary.failed) == (2, 1)
    assert [r["error"] for r in records if r["path"].endswith("p1.png")] == ["RuntimeError: the engine fell over"]
