"""The DinoPatch model file: data only, never code.

One ``.npz`` archive (a zip of ``.npy`` arrays) read with
``allow_pickle=False``.  Its ``__header__`` array holds UTF-8 JSON: the format
name and version, the detector's configuration, and for every other array its
dtype, shape and the SHA-256 of the whole content.  Anything that does not
match raises :class:`ModelFileError`.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

FORMAT = "dinopatch-model"
VERSION = 1
ALLOWED_DTYPES = {"float32", "float16", "float64", "int64", "int32", "uint8", "bool"}


class ModelFileError(ValueError):
    """A model file that is missing, damaged, foreign, unsafe or too new."""


def _digest(header: dict, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write(path: str | os.PathLike, header: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``header`` (JSON-able) and named arrays to ``path``."""
    path = Path(path)
    for name, a in arrays.items():
        if a.dtype.name not in ALLOWED_DTYPES:
            raise TypeError(f"array {name!r} has dtype {a.dtype}, not one a model file may hold")
    header = dict(header, format=FORMAT, version=VERSION,
                  arrays={n: {"dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()})
    header["sha256"] = _digest(header, arrays)
    blob = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a crash mid-save never leaves a truncated model behind.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, __header__=blob, **arrays)
    os.replace(tmp, path)
    return path


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and arrays of a model file, verified; raises :class:`ModelFileError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise ModelFileError(f"{path}: not a readable DinoPatch model file ({type(e).__name__}: {e})") from None
    blob = arrays.pop("__header__", None)
    if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
        raise ModelFileError(f"{path}: no DinoPatch header; is this a DinoPatch model file?")
    try:
        header = json.loads(blob.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a DinoPatch model file (format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ModelFileError(f"{path}: format version {version!r} is newer than this DinoPatch reads ({VERSION}); upgrade dinopatch")
    declared = header.get("arrays", {})
    if set(declared) != set(arrays):
        raise ModelFileError(f"{path}: arrays {sorted(arrays)} differ from the header's {sorted(declared)}")
    for name, a in arrays.items():
        want = declared[name]
        if a.dtype.name != want.get("dtype") or list(a.shape) != want.get("shape"):
            raise ModelFileError(f"{path}: array {name!r} is {a.dtype}{list(a.shape)}, header says "
                                 f"{want.get('dtype')}{want.get('shape')}")
    stored = header.pop("sha256", None)
    if stored != _digest(header, arrays):
        raise ModelFileError(f"{path}: checksum mismatch; the file is damaged or was edited")
    return header, arrays
