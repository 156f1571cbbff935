"""The models a service answers for: one name per model file, each at a checked version that can be swapped.

A service is given model files, or folders of them (every ``*.npz`` in the
folder).  A model's name is its file's stem (``line3/bracket-a.npz`` is
``bracket-a``); two files with one stem are refused.  The catalog keeps, for
every name, the version requests are sent to: the file's bytes as they were
when checked, its model id and a version number counting from 1.

A swap (:meth:`ModelCatalog.refresh`, run when the file changes or on
request) reads the file again and checks the new bytes the way ``predict``
loads a model file (format, signature, every stored value against its
evidence) before anything is sent to them; a file that fails, for instance
one half-written, leaves the version in service as it is, and the next
refresh tries again.  Requests already sent keep their version; replicas load
the new one beside the old (see :mod:`dinopatch.loaded_models`), so no
request waits on, or is judged by, a model that is half loaded.

The bytes of each version go where the replicas can fetch them (``put``:
Ray's object store in the service), so a replica on another node reads the
model from the cluster, never from its own disk, and an old version stays
readable while requests still name it.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

MODEL_SUFFIX = ".npz"


class CatalogError(ValueError):
    """A model file the catalog cannot take (missing, a name twice, or failing its checks)."""


@dataclass(frozen=True)
class ModelVersion:
    """One checked version of one named model.

    Attributes:
        name: the model file's stem; what ``/predict/{name}`` routes on.
        number: 1 for the version the service started with, +1 at each swap.
        model_id: the model file's content id (as ``predict`` records it).
        sha256: of the file's bytes.
        saved_at: the file's modification time (UTC, ISO 8601) when it was read.
        data: the file's bytes, or a handle that ``fetch`` turns into them (Ray: an ObjectRef).
        catalog: which catalog numbered it (a fresh id per catalog: numbers of two catalogs do not compare).
    """

    name: str
    number: int
    model_id: str
    sha256: str
    saved_at: str
    data: Any
    catalog: str = ""

    def newer_than(self, other: "ModelVersion") -> bool:
        """Whether this version replaces ``other`` (same name): a later number of the same catalog, or other bytes."""
        if self.catalog == other.catalog:
            return self.number > other.number
        return self.sha256 != other.sha256

    def describe(self) -> dict:
        """What ``/models`` lists: never a path, never the bytes."""
        return {"name": self.name, "model_id": self.model_id, "version": self.number, "sha256": self.sha256,
                "saved_at": self.saved_at}


def model_files(paths: list[str | os.PathLike]) -> dict[str, str]:
    """``{name: absolute path}`` of model files and folders of them, in the order given.

    Raises:
        CatalogError: a path that is neither a file nor a folder, a folder without model files, or two
            files of one name.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix == MODEL_SUFFIX and f.is_file())
            if not found:
                raise CatalogError(f"{p}: a folder without model files (*{MODEL_SUFFIX})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise CatalogError(f"{p}: no such model file or folder")
    out: dict[str, str] = {}
    for f in files:
        if f.stem in out:
            raise CatalogError(f"two model files are named {f.stem!r} ({out[f.stem]} and {f}): a name must say "
                               "which model answers")
        out[f.stem] = os.path.abspath(f)
    if not out:
        raise CatalogError("no model files given")
    return out


def load_bytes(data: bytes, **runtime):
    """A :class:`dinopatch.DinoPatch` from a model file's bytes, checked as :meth:`DinoPatch.load` checks a file."""
    from .detector import DinoPatch

    # The file's checks read a path: a private copy, gone once loaded.
    with tempfile.TemporaryDirectory(prefix="dinopatch-model-") as tmp:
        path = Path(tmp) / f"model{MODEL_SUFFIX}"
        path.write_bytes(data)
        return DinoPatch.load(path, progress=False, **runtime)


class ModelCatalog:
    """Name to checked version, for the files a service was given; thread-safe.

    Args:
        files: ``{name: path}``, as :func:`model_files` gives.
        check: ``check(data) -> model_id``; raises on a file that must not be served.
        put: where a version's bytes go (default: kept as they are).
    """

    def __init__(self, files: dict[str, str], check: Callable[[bytes], str],
                 put: Callable[[bytes], Any] = lambda data: data):
        self.files = dict(files)
        self._check, self._put = check, put
        self._current: dict[str, ModelVersion] = {}
        self._seen: dict[str, tuple[int, int]] = {}
        self._locks = {name: threading.Lock() for name in self.files}
        self.swaps = 0
        self.id = uuid.uuid4().hex
        for name in self.files:
            self.refresh(name, force=True)

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def current(self, name: str) -> ModelVersion:
        """The version requests for ``name`` go to (KeyError for a name the service does not have)."""
        return self._current[name]

    def listing(self) -> list[dict]:
        return [self._current[n].describe() for n in self.files]

    def changed(self) -> list[str]:
        """Names whose file's size or modification time differs from when it was last read."""
        return [n for n in self.files if self._stat(n) != self._seen.get(n)]

    def refresh(self, name: str, force: bool = False) -> ModelVersion:
        """Read ``name``'s file again; when its bytes changed and pass the checks, they become the current version.

        Args:
            force: read the file even if its size and time look unchanged.

        Returns:
            the version now current (the same one when the bytes are unchanged).

        Raises:
            CatalogError: the file is unreadable or fails its checks; the current version stays.
        """
        with self._locks[name]:
            stat = self._stat(name)
            old = self._current.get(name)
            if old is not None and not force and stat == self._seen.get(name):
                return old
            # The time of the bytes read: a writer still at work changes it again, and the next refresh reads again.
            self._seen[name] = stat
            try:
                data = Path(self.files[name]).read_bytes()
            except OSError as e:
                raise CatalogError(f"{name}: the model file cannot be read: {e}") from None
            sha = hashlib.sha256(data).hexdigest()
            if old is not None and sha == old.sha256:
                return old
            try:
                model_id = self._check(data)
            except Exception as e:  # noqa: BLE001  (whatever is wrong with the file, the old version keeps serving)
                raise CatalogError(f"{name}: the new model file fails its checks, version {old.number if old else 0} "
                                   f"stays in service: {e}") from None
            saved = datetime.datetime.fromtimestamp(stat[1] / 1e9, datetime.timezone.utc)
            new = ModelVersion(name, (old.number + 1) if old else 1, model_id, sha,
                               saved.isoformat(timespec="seconds"), self._put(data), self.id)
            self._current[name] = new
            self.swaps += old is not None
            return new

    def _stat(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.files[name])
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns
