"""Frames from a folder: score image files as a camera drops them, once each, across crashes.

Camera software on a line writes each frame as a file into a folder.
:class:`FolderWatch` learns of new files from watchdog (and a rescan of the
folder every :data:`RESCAN` s, for events a file system does not deliver),
waits until a file is completely written (its size and modification time
unchanged for ``settle`` seconds, or at once when it was renamed into the
folder: write to a hidden or non-image name, then rename), and scores the files
one at a time in the order they became complete.  Each file's record, the same
as ``predict`` writes, is appended to ``predictions.jsonl`` in the output
folder and flushed to disk before the next file is taken.

That file is the journal: a record names its file and the file's size and
modification time, so a watcher started again after a crash or ``kill -9``
skips exactly the files that have a record and scores the rest, never one
twice (a torn last line, from a kill while writing, is cut off and its file
scored again).  A file that cannot be read gets an error record and the loop
goes on.  Only the folder itself is watched, not its subfolders; hidden files
and names without an image suffix are left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .data import IMAGE_SUFFIXES
from .drift import replay
from .predictions import score_batch
from .records import error_record, result_record

LOG = "predictions.jsonl"
# A file whose size and modification time stayed the same this long is taken as completely written.
SETTLE = 1.0
# How often the folder is listed again, for files whose events were missed.
RESCAN = 1.0
_POLL = 0.05


@dataclass
class WatchSummary:
    """What one run of the watcher did."""

    scored: int = 0
    anomalous: int = 0
    failed: int = 0
    resumed: int = 0  # records already in the journal when it started


@dataclass
class _Candidate:
    order: int  # when the watcher first saw it
    size: int = -1
    mtime_ns: int = -1
    changed: float = 0.0  # monotonic time of the last change seen
    renamed: bool = False


class _Arrivals:
    """Watchdog's handler: the files of the folder that appeared, changed or were renamed into it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = threading.Lock()
        self.events: list[tuple[Path, bool]] = []
        self.wake = threading.Event()

    def dispatch(self, event) -> None:
        if event.is_directory or event.event_type not in ("created", "modified", "closed", "moved"):
            return
        renamed = event.event_type == "moved"
        path = Path(os.fsdecode(event.dest_path if renamed else event.src_path))
        if path.parent == self.folder and is_frame(path):
            with self.lock:
                self.events.append((path, renamed))
            self.wake.set()

    def drain(self) -> list[tuple[Path, bool]]:
        with self.lock:
            events, self.events = self.events, []
        self.wake.clear()
        return events


def is_frame(path: Path) -> bool:
    """A file the watcher takes: not hidden, with an image suffix (a temporary name is neither)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _key(path: Path, st: os.stat_result) -> tuple[str, int, int]:
    return os.fspath(path), st.st_size, st.st_mtime_ns


class FolderWatch:
    """Scores the frames that land in ``folder`` into ``out/predictions.jsonl``.

    Args:
        det: a fitted :class:`~dinopatch.DinoPatch`.
        folder: the folder the camera writes into.
        out: the output folder (created); its ``predictions.jsonl`` is the journal a restart resumes from.
        settle: seconds a file's size and modification time must stay unchanged before it is read.
        move_done: a folder each scored file is moved into (None: leave them).
        engine: the engine name the records give.
        stamp: called as ``stamp(record, image, outcome)`` before a record is written
            (:class:`~dinopatch.stamp.Stamp`); its drift monitor is first fed the journal's records.
        on_record: called after each record is on disk (e.g. :meth:`~dinopatch.mqtt.Outbox.notify`).
    """

    def __init__(self, det, folder, out, *, settle: float = SETTLE, move_done=None, engine: str | None = None,
                 stamp=None, on_record=None):
        self.det, self.folder, self.out = det, Path(folder).absolute(), Path(out)
        if not self.folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        self.move_done = None if move_done is None else Path(move_done).absolute()
        if self.move_done == self.folder:
            raise ValueError("--move-done must name another folder than the one watched")
        if settle < 0:
            raise ValueError(f"settle must be >= 0 s, got {settle}")
        self.settle, self.engine, self.stamp, self.on_record = float(settle), engine, stamp, on_record
        self.out.mkdir(parents=True, exist_ok=True)
        if self.move_done is not None:
            self.move_done.mkdir(parents=True, exist_ok=True)
        self.log = self.out / LOG
        self.done: set[tuple[str, int, int]] = set()
        self.candidates: dict[Path, _Candidate] = {}
        self._order = 0

    # ------------------------------------------------------------------ journal

    def _resume(self) -> int:
        """Read the journal: cut a torn last line, remember which files have a record, feed the drift monitor."""
        if not self.log.exists():
            return 0
        data = self.log.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):  # killed while writing that record: its file has no record yet
            with open(self.log, "r+b") as f:
                f.truncate(cut)
        lines = data[:cut].decode("utf-8", "surrogateescape").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                source = record.get("file") or {}
                self.done.add((record["path"], source.get("size"), source.get("mtime_ns")))
            except (ValueError, TypeError, AttributeError, KeyError):
                raise ValueError(f"{self.log} line {number} is not a record: the journal a restart resumes from "
                                 "must hold only this watcher's records (give another -o)") from None
        if self.stamp is not None:
            replay(self.stamp.monitor, lines)
        return len(lines)

    def _write(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())  # the record is the journal entry: on disk before the next file is taken
        if self.on_record is not None:
            self.on_record()

    # ------------------------------------------------------------------ arrivals

    def _see(self, path: Path, renamed: bool) -> None:
        if path not in self.candidates:
            self.candidates[path] = _Candidate(self._order)
            self._order += 1
        self.candidates[path].renamed |= renamed

    def _scan(self) -> None:
        """The frames in the folder the watcher does not know yet, oldest first."""
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                path = self.folder / entry.name
                if path not in self.candidates and is_frame(path) and entry.is_file(follow_symlinks=False):
                    try:
                        found.append((entry.stat().st_mtime_ns, entry.name, path))
                    except FileNotFoundError:
                        continue
        for *_, path in sorted(found):
            self._see(path, False)

    def _next_ready(self) -> tuple[Path, os.stat_result] | None:
        """The first file, in order of arrival, that is completely written; forgets files gone or done."""
        now = time.monotonic()
        for path, c in sorted(self.candidates.items(), key=lambda item: item[1].order):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                del self.candidates[path]
                continue
            if _key(path, st) in self.done:  # scored before a restart (its move may not have happened)
                del self.candidates[path]
                self._move(path)
                continue
            if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
                c.size, c.mtime_ns, c.changed = st.st_size, st.st_mtime_ns, now
                if not c.renamed:
                    continue
            if c.renamed or now - c.changed >= self.settle:
                del self.candidates[path]
                return path, st
        return None

    def _move(self, path: Path) -> None:
        if self.move_done is not None:
            shutil.move(path, self.move_done / path.name)

    # ------------------------------------------------------------------ the loop

    def _score(self, path: Path, st: os.stat_result, summary: WatchSummary) -> None:
        try:
            [(_, image, outcome, latency_ms)] = score_batch(self.det, [path])
        except Exception as e:  # noqa: BLE001 (one frame that breaks the scorer must not stop the line)
            image, outcome, latency_ms = None, e, None
        if isinstance(outcome, BaseException):
            record = error_record(outcome, self.det, path=path, engine=self.engine)
            summary.failed += 1
        else:
            record = result_record(outcome, self.det, path=path, latency_ms=latency_ms, engine=self.engine)
            summary.scored += 1
            summary.anomalous += bool(outcome.is_anomaly)
        record["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if self.stamp is not None:
            self.stamp(record, image, outcome)
        self._write(record)
        self.done.add(_key(path, st))
        self._move(path)

    def run(self, *, stop: threading.Event | None = None, max_files: int | None = None,
            idle_exit: float | None = None) -> WatchSummary:
        """Watch until ``stop`` is set, ``max_files`` files were taken in this run, or nothing arrived and
        nothing was pending for ``idle_exit`` seconds."""
        from watchdog.observers import Observer  # the line extra; imported only where watch runs

        stop = stop or threading.Event()
        summary = WatchSummary(resumed=self._resume())
        arrivals = _Arrivals(self.folder)
        observer = Observer()
        observer.schedule(arrivals, os.fspath(self.folder), recursive=False)
        observer.start()
        try:
            self._scan()  # after the observer starts, so that no file falls between the two
            last_scan = last_activity = time.monotonic()
            while not stop.is_set():
                for path, renamed in arrivals.drain():
                    self._see(path, renamed)
                    last_activity = time.monotonic()
                if time.monotonic() - last_scan >= RESCAN:
                    self._scan()
                    last_scan = time.monotonic()
                ready = self._next_ready()
                if ready is not None:
                    self._score(*ready, summary)
                    last_activity = time.monotonic()
                    if max_files is not None and summary.scored + summary.failed >= max_files:
                        break
                    continue
                if idle_exit is not None and not self.candidates and time.monotonic() - last_activity >= idle_exit:
                    break
                arrivals.wake.wait(_POLL)
        finally:
            observer.stop()
            observer.join(5.0)
        return summary
