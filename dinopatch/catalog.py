"""The models a service answers for: one name per model file, each at a checked version that can be swapped.

A service is given model files, folders of them (every ``*.npz`` in the
folder), or manifests.  A model's name is its file's stem (``line3/bracket-a.npz``
is ``bracket-a``), or the part number a manifest gives it; one name twice is
refused.  A manifest is a JSON file naming part numbers and their model files,
relative paths read from the manifest's folder::

    {"models": {"PN-1001": "line3/bracket-a.npz", "PN-1002": "/srv/models/bolt.npz"}}

A part number is 1 to 128 letters, digits, ``.``, ``_`` or ``-``, starting with
a letter or digit (it is a URL path segment); no other key is allowed, and
each file must exist.  The catalog keeps, for
every name, the version requests are sent to: the file's bytes as they were
when checked, its model id and a version number counting from 1.

A swap (:meth:`ModelCatalog.refresh`, run when the file changes or on
request) reads the file again and checks the new bytes before anything is
sent to them (:func:`check_version`): the way ``predict`` loads a model file
(format, signature, every stored value against its evidence), then its golden
set run again with the engine the replicas use (zero verdict flips against
the reference's), and its estimated size against the replicas' memory
budget.  A file that fails, for instance one half-written or one whose
engine flips a golden verdict, leaves the version in service as it is; the
refusal is kept, with its reason, for ``/models`` to show, and the next
change of the file is tried again.  Requests already sent keep their version; replicas load
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
import json
import os
import re
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import memory_budget
from .engine_choice import EngineMismatchError

MODEL_SUFFIX = ".npz"
MANIFEST_SUFFIX = ".json"
MAX_MANIFEST_BYTES = 1 << 20
PART_NUMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
        checks: what its checks found (:func:`check_version`): ``golden`` (frames, flips, the engine that ran
            them) and ``resident_bytes`` (the estimate the replicas' memory budget counts).
    """

    name: str
    number: int
    model_id: str
    sha256: str
    saved_at: str
    data: Any
    catalog: str = ""
    checks: dict = field(default_factory=dict)

    @property
    def resident_bytes(self) -> int:
        """The estimated memory of this version once loaded (0: not estimated)."""
        return int(self.checks.get("resident_bytes", 0))

    def newer_than(self, other: "ModelVersion") -> bool:
        """Whether this version replaces ``other`` (same name): a later number of the same catalog, or other bytes."""
        if self.catalog == other.catalog:
            return self.number > other.number
        return self.sha256 != other.sha256

    def describe(self) -> dict:
        """What ``/models`` lists: never a path, never the bytes."""
        return {"name": self.name, "model_id": self.model_id, "version": self.number, "sha256": self.sha256,
                "saved_at": self.saved_at, "checks": self.checks}


def model_files(paths: list[str | os.PathLike]) -> dict[str, str]:
    """``{name: absolute path}`` of model files, folders of them and manifests (``*.json``), in the order given.

    Raises:
        CatalogError: a path that is neither a file nor a folder, a folder without model files, a manifest
            that is not valid, or one name twice.
    """
    named: list[tuple[str, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix == MODEL_SUFFIX and f.is_file())
            if not found:
                raise CatalogError(f"{p}: a folder without model files (*{MODEL_SUFFIX})")
            named += [(f.stem, f) for f in found]
        elif p.is_file() and p.suffix == MANIFEST_SUFFIX:
            named += read_manifest(p).items()
        elif p.is_file():
            named.append((p.stem, p))
        else:
            raise CatalogError(f"{p}: no such model file or folder")
    out: dict[str, str] = {}
    for name, f in named:
        if name in out:
            raise CatalogError(f"two models are named {name!r} ({out[name]} and {f}): a name must say which model "
                               "answers")
        out[name] = os.path.abspath(f)
    if not out:
        raise CatalogError("no model files given")
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Path]:
    """``{part number: model file}`` of a manifest (see the module's docstring), every entry checked.

    Raises:
        CatalogError: saying what is wrong: not JSON, too large, a key other than ``models``, a part number
            twice or not of the allowed characters, a path that is not a string, a model file that does not exist.
    """
    path = Path(path)

    def unique(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise CatalogError(f"{path}: {', '.join(map(repr, twice))} named twice")
        return dict(pairs)

    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CatalogError(f"{path}: a manifest of more than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(path.read_bytes(), object_pairs_hook=unique)
    except CatalogError:
        raise
    except ValueError as e:  # not UTF-8 or not JSON
        raise CatalogError(f"{path}: not a JSON manifest ({e})") from None
    if not isinstance(doc, dict) or set(doc) != {"models"} or not isinstance(doc["models"], dict) \
            or not doc["models"]:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise CatalogError(f"{path}: a manifest is {{\"models\": {{\"PART-NUMBER\": \"model.npz\", ...}}}} with at "
                           f"least one model and no other key; got {keys}")
    out = {}
    for name, file in doc["models"].items():
        if not PART_NUMBER.fullmatch(name):
            raise CatalogError(f"{path}: part number {name!r}: 1 to 128 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit")
        if not isinstance(file, str) or not file:
            raise CatalogError(f"{path}: {name}: the model file must be a path (a string), got {file!r}")
        target = path.parent / file  # an absolute path stays as it is
        if not target.is_file():
            raise CatalogError(f"{path}: {name}: no such model file {target}")
        out[name] = target
    return out


def load_bytes(data: bytes, strict: bool = False, **runtime):
    """A :class:`dinopatch.DinoPatch` from a model file's bytes, checked as :meth:`DinoPatch.load` checks a file
    (``strict``: an engine that flips a golden verdict is an error, not a warning)."""
    from .detector import DinoPatch

    # The file's checks read a path: a private copy, gone once loaded.
    with tempfile.TemporaryDirectory(prefix="dinopatch-model-") as tmp:
        path = Path(tmp) / f"model{MODEL_SUFFIX}"
        path.write_bytes(data)
        try:
            return DinoPatch.load(path, progress=False, strict=strict, **runtime)
        except (ValueError, EngineMismatchError) as e:
            # Said to callers of the service: neither the private copy's path nor the engine's folder.
            message = str(e).replace(str(path), "the model file")
            engine = os.fspath(runtime.get("engine", ""))
            if os.path.isabs(engine):
                message = message.replace(engine, Path(engine).name)
            raise type(e)(message) from None


def check_version(name: str, data: bytes, runtime: dict, memory: int | None = None):
    """Everything a new version must pass before requests go to it; ``(detector, checks)``.

    The model file's checks (:meth:`DinoPatch.load`), its golden set scored by the engine of ``runtime``, the
    one the replicas run, with zero verdict flips against the reference's (strict; a file without a golden set
    passes on its file checks alone), and its estimated resident size within ``memory`` (bytes; None: no
    budget).  ``checks``: ``{"golden": {"frames", "flips", "engine"} or None, "resident_bytes"}``.

    Raises:
        ModelFileError, EngineMismatchError, MemoryBudgetError: the check that failed, saying why.
    """
    det = load_bytes(data, strict=True, **runtime)
    gold = det.model_.golden
    size = memory_budget.resident_bytes(det, data, runtime.get("batch_size", 1))
    memory_budget.check_fits(name, size, memory)
    # Passing the strict check is zero flips on every golden frame.
    golden = None if gold is None else {"frames": len(gold.frames), "flips": 0,
                                        "engine": Path(os.fspath(det.engine)).name}
    return det, {"golden": golden, "resident_bytes": size}


class ModelCatalog:
    """Name to checked version, for the files a service was given; thread-safe.

    Args:
        files: ``{name: path}``, as :func:`model_files` gives.
        check: ``check(name, data) -> (model_id, checks)``; raises on a file that must not be served.
        put: where a version's bytes go (default: kept as they are).
    """

    def __init__(self, files: dict[str, str], check: Callable[[str, bytes], tuple[str, dict]],
                 put: Callable[[bytes], Any] = lambda data: data):
        self.files = dict(files)
        self._check, self._put = check, put
        self._current: dict[str, ModelVersion] = {}
        self._seen: dict[str, tuple[int, int]] = {}
        self._refused: dict[str, dict] = {}
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
        """Each model's version in service, with ``refused``: the last file that failed its checks since
        (``{"sha256", "error", "at"}``), or None."""
        return [dict(self._current[n].describe(), refused=self.refused(n)) for n in self.files]

    def refused(self, name: str) -> dict | None:
        """The last new file of ``name`` that failed its checks and was kept out, or None since a swap."""
        return self._refused.get(name)

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
            CatalogError: the file is unreadable or fails its checks; the current version stays, and
                :meth:`refused` says why.
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
                raise self._refuse(name, None, f"{name}: the model file cannot be read: {e.strerror}") from None
            sha = hashlib.sha256(data).hexdigest()
            if old is not None and sha == old.sha256:
                self._refused.pop(name, None)  # the file is back to the version in service
                return old
            try:
                model_id, checks = self._check(name, data)
            except Exception as e:  # noqa: BLE001  (whatever is wrong with the file, the old version keeps serving)
                raise self._refuse(name, sha, f"{name}: the new model file fails its checks, version "
                                   f"{old.number if old else 0} stays in service: {type(e).__name__}: {e}") from None
            saved = datetime.datetime.fromtimestamp(stat[1] / 1e9, datetime.timezone.utc)
            new = ModelVersion(name, (old.number + 1) if old else 1, model_id, sha,
                               saved.isoformat(timespec="seconds"), self._put(data), self.id, checks)
            self._current[name] = new
            self._refused.pop(name, None)
            self.swaps += old is not None
            return new

    def _refuse(self, name: str, sha256: str | None, error: str) -> CatalogError:
        now = datetime.datetime.now(datetime.timezone.utc)
        self._refused[name] = {"sha256": sha256, "error": error, "at": now.isoformat(timespec="seconds")}
        return CatalogError(error)

    def _stat(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.files[name])
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns
