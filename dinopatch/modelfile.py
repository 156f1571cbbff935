"""The DinoPatch model file: data only, never code, validated before it is inflated.

One zip archive of ``.npy`` members (what :func:`numpy.savez` writes): a
``__header__.npy`` member holding UTF-8 JSON (the format name and version, the
detector's configuration, the dtype and shape of every other member and the
SHA-256 of the whole content) and one member per declared array.

:func:`read` trusts nothing it has not checked, in this order:

1. the zip directory: exactly ``__header__.npy`` plus one ``<name>.npy`` per
   declared array, no duplicates, stored or deflate members only, not
   encrypted, and sizes that fit in the file;
2. the header member, read first with a size cap (:data:`MAX_HEADER_BYTES`),
   JSON nested at most :data:`MAX_JSON_DEPTH` deep with the right type for every
   entry this module owns;
3. each member's declared uncompressed size against what the header allows
   (its dtype and shape plus a bounded ``.npy`` header), and the members' total
   against :data:`MAX_DEFLATE_RATIO` times their compressed total, so a zip bomb
   is refused before anything is inflated;
4. the ``.npy`` magic and header against the declared dtype and shape;
5. the data, inflated in chunks of :data:`_CHUNK` bytes into an array of the
   declared size, then the SHA-256 checksum and, with a key, the signature.

Every malformed file raises :class:`ModelFileError`, and so does one of an
older format version: a DinoPatch of today does not guess what an older one
meant by a value it now checks against evidence the older file lacks.

Signing: with a key (the ``key`` argument or the environment variable
``DINOPATCH_MODEL_KEY``), :func:`write` adds an HMAC-SHA256 of the content
digest and :func:`read` refuses unsigned or wrongly signed files. Without a
key, :func:`read` cannot check a signature and does not try: a signed file
loads like an unsigned one, on its checksum alone, which proves integrity
against damage but not origin.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from . import atomic

FORMAT = "dinopatch-model"
VERSION = 6
"""2: thresholds carry their evidence and the model id is the content's checksum, not a stored value;
3: auto's tolerance search starts at the typical offset, so a record's steps replay in that order, and the
golden set holds nominal frames as they are;
4: a coreset bank carries the good parts' tokens it was chosen from, and a tuned mask threshold its sweep;
5: auto's search starts at sigma 2, so a record's steps replay from there, and fixtured frames may be registered;
6: the good set's report keeps each image's map percentile beside its score, and the outlier rule is
1.8x the median for a few raised patches, 3x for a raised map, and 3 robust spreads of the logarithms; the
background check's samples are means about the light's plane, NaN where a patch has padding."""
ALLOWED_DTYPES = {"float32", "float16", "float64", "int64", "int32", "uint8", "bool"}
KEY_ENV = "DINOPATCH_MODEL_KEY"

MAX_HEADER_BYTES = 16 << 20
"""The JSON header's size cap; a fitted detector's header is about 100 KB (the aligner's template)."""
MAX_JSON_DEPTH = 32
MAX_NDIM = 32
MAX_MEMBERS = 256
MAX_DEFLATE_RATIO = 100
"""The members may claim at most this many bytes per compressed byte (plus
:data:`_DEFLATE_SLACK`). :func:`write` stores members uncompressed; float
features deflate by less than 2:1, a zero-filled bomb by 1000:1."""
_DEFLATE_SLACK = 1 << 20
_NPY_HEADER_MAX = 4096  # numpy writes 128 bytes for the shapes a model holds
_CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_HEADER_MEMBER = "__header__.npy"


class ModelFileError(ValueError):
    """A model file that is missing, damaged, foreign, unsafe, unsigned or too new."""


def _digest(header: dict, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))  # a view: hashing a 1 GB bank must not copy it
    return h.hexdigest()


def _key(key: str | bytes | None) -> bytes | None:
    """The signing key: ``key``, else ``$DINOPATCH_MODEL_KEY``, else None."""
    if key is None:
        key = os.environ.get(KEY_ENV)
        if key is None:
            return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise TypeError(f"a model key must be str or bytes, got {type(key).__name__}")
    if not key:
        # An empty key is almost always an unset variable expanded in a script: fail closed.
        raise ValueError(f"the model key is empty (is {KEY_ENV} set to an unset variable?)")
    return key


def _mac(key: bytes, digest: str) -> str:
    return hmac.new(key, bytes.fromhex(digest), hashlib.sha256).hexdigest()


# ----------------------------------------------------------------------------- writing

def _framed(header: dict, arrays: dict[str, np.ndarray]) -> dict:
    """``header`` as :func:`write` stores it, less the checksum and signature: format, version and arrays set."""
    header = {k: v for k, v in header.items() if k not in ("sha256", "signature")}
    header.update(format=FORMAT, version=VERSION,
                  arrays={n: {"dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()})
    return header


def content_digest(header: dict, arrays: dict[str, np.ndarray]) -> str:
    """The SHA-256 :func:`write` records for ``header`` and ``arrays``, and :func:`read` returns once checked."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    return _digest(_framed(header, arrays), arrays)


def write(path: str | os.PathLike, header: dict, arrays: dict[str, np.ndarray], *,
          key: str | bytes | None = None) -> Path:
    """Write ``header`` (JSON-able) and named arrays to ``path``, atomically.

    A reader sees the old file or the new one, never a mix, also with several
    processes saving to one path (see :func:`dinopatch.atomic.write`).

    Args:
        path: the model file.
        header: JSON-able entries; ``format``, ``version``, ``arrays``,
            ``sha256`` and ``signature`` are set here.
        arrays: names (letters, digits, ``_``) to arrays of a dtype in
            :data:`ALLOWED_DTYPES`.
        key: signs the file with HMAC-SHA256; defaults to ``$DINOPATCH_MODEL_KEY``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    key = _key(key)
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    for name, a in arrays.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "__header__":
            raise ValueError(f"array name {name!r} must be 1-64 letters, digits or '_', not '__header__'")
        if a.dtype.name not in ALLOWED_DTYPES:
            raise TypeError(f"array {name!r} has dtype {a.dtype}, not one a model file may hold")
    header = _framed(header, arrays)
    header["sha256"] = _digest(header, arrays)
    if key is not None:
        header["signature"] = {"alg": "hmac-sha256", "mac": _mac(key, header["sha256"])}
    blob = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    if blob.size > MAX_HEADER_BYTES:
        raise ValueError(f"the header is {blob.size} bytes, over the {MAX_HEADER_BYTES} a model file holds")
    return atomic.write(path, lambda f: np.savez(f, __header__=blob, **arrays))


# ----------------------------------------------------------------------------- reading

def read(path: str | os.PathLike, *, key: str | bytes | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and arrays of a model file, validated before anything is inflated.

    Args:
        path: the model file.
        key: the signing key; defaults to ``$DINOPATCH_MODEL_KEY``. With a key,
            unsigned and wrongly signed files are refused; without one, a
            signature is not checked (see the module docstring).

    Returns:
        ``(header, arrays)``; the header without its ``signature``, its ``sha256`` the content's
        checksum, checked.

    Raises:
        ModelFileError: the file is missing, malformed, damaged, unsigned or
            wrongly signed (with a key), or written by a newer DinoPatch.
    """
    path = Path(path)
    key = _key(key)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with zipfile.ZipFile(path) as zf:
            members = _check_directory(zf, path.stat().st_size)
            header = _read_header(zf, members[_HEADER_MEMBER])
            declared = header["arrays"]
            if set(members) != {_HEADER_MEMBER} | {f"{n}.npy" for n in declared}:
                raise ModelFileError(f"members {sorted(members)} differ from the header's arrays "
                                     f"{sorted(declared)} (plus {_HEADER_MEMBER})")
            arrays = {name: _read_array(zf, members[f"{name}.npy"], spec) for name, spec in declared.items()}
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error,
            NotImplementedError, UnicodeDecodeError) as e:  # what zipfile raises on a damaged directory
        raise ModelFileError(f"{path}: not a readable DinoPatch model file "
                             f"({type(e).__name__}: {e})") from None
    stored = header.pop("sha256")
    signature = header.pop("signature", None)
    if not hmac.compare_digest(stored, _digest(header, arrays)):
        raise ModelFileError(f"{path}: checksum mismatch; the file is damaged or was edited")
    if key is not None:
        if signature is None:
            raise ModelFileError(f"{path}: the file is not signed, and a model key is set")
        if not hmac.compare_digest(signature["mac"], _mac(key, stored)):
            raise ModelFileError(f"{path}: wrong signature: signed with another key, or edited")
    header["sha256"] = stored
    return header, arrays


def _check_directory(zf: zipfile.ZipFile, file_size: int) -> dict[str, zipfile.ZipInfo]:
    """The zip directory by member name, refused if a member could not be read cheaply and safely."""
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise ModelFileError(f"duplicate members {sorted({n for n in names if names.count(n) > 1})}")
    if _HEADER_MEMBER not in names:
        raise ModelFileError("no DinoPatch header; is this a DinoPatch model file?")
    if len(infos) > MAX_MEMBERS:
        raise ModelFileError(f"{len(infos)} members, over the {MAX_MEMBERS} a model file may hold")
    packed, inflated = sum(i.compress_size for i in infos), sum(i.file_size for i in infos)
    if packed > file_size:
        raise ModelFileError("members claim more compressed bytes than the file holds")
    # Summed over members, so that many small bombs are one big one.
    if inflated > MAX_DEFLATE_RATIO * packed + _DEFLATE_SLACK:
        raise ModelFileError(
            f"members would inflate {packed} bytes to {inflated}, over the compression ratio a model file "
            f"may have ({MAX_DEFLATE_RATIO}:1); refused as a zip bomb")
    for i in infos:
        if i.flag_bits & 0x1:
            raise ModelFileError(f"member {i.filename!r} is encrypted")
        if i.compress_type == zipfile.ZIP_STORED:
            if i.file_size != i.compress_size:
                raise ModelFileError(f"stored member {i.filename!r} claims {i.file_size} bytes "
                                     f"in {i.compress_size}")
        elif i.compress_type != zipfile.ZIP_DEFLATED:
            raise ModelFileError(f"member {i.filename!r} uses compression method {i.compress_type}; "
                                 "only stored or deflate members are read")
    return dict(zip(names, infos))


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict:
    if info.file_size > MAX_HEADER_BYTES + _NPY_HEADER_MAX:
        raise ModelFileError(f"header member of {info.file_size} bytes, over the cap of {MAX_HEADER_BYTES}")
    with zf.open(info) as f:
        dtype, shape, _ = _npy_header(f, info.filename)
        if dtype != np.uint8 or len(shape) != 1:
            raise ModelFileError("no DinoPatch header; is this a DinoPatch model file?")
        if shape[0] != info.file_size - f.tell():
            raise ModelFileError(f"header member declares {shape[0]} bytes, "
                                 f"holds {info.file_size - f.tell()}")
        text = _read_exact(f, info, shape[0]).tobytes()
    try:
        text = text.decode()
    except UnicodeDecodeError as e:
        raise ModelFileError(f"header is not UTF-8 ({e})") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ModelFileError(f"header JSON nests {depth} deep, over the {MAX_JSON_DEPTH} a model file may")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:  # JSONDecodeError, a duplicate key, an integer of too many digits
        raise ModelFileError(f"header is not valid JSON ({e})") from None
    _check_header(header)
    return header


def _json_depth(text: str) -> int:
    """How deep ``text``'s arrays and objects nest, counted without parsing (so without recursion)."""
    outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text).encode()
    b = np.frombuffer(outside, np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _check_header(header) -> None:
    """The entries this module owns have the right types; the detector checks its own."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ModelFileError(f"not a DinoPatch model file (format {found!r})")
    version = header.get("version")
    if type(version) is not int or version < 1:
        raise ModelFileError(f"format version {version!r} is not a positive integer")
    if version > VERSION:
        raise ModelFileError(f"format version {version} is newer than this DinoPatch reads ({VERSION}); "
                             "upgrade dinopatch")
    if version < VERSION:
        raise ModelFileError(f"format version {version} was written by an older DinoPatch, whose values this one "
                             f"cannot check against their evidence the same way (it reads {VERSION}); refit the model")
    if not _is_hex_digest(header.get("sha256")):
        raise ModelFileError(f"checksum entry {header.get('sha256')!r} is not a SHA-256 hex digest")
    signature = header.get("signature")
    if signature is not None and not (isinstance(signature, dict) and set(signature) == {"alg", "mac"}
                                      and signature["alg"] == "hmac-sha256"
                                      and _is_hex_digest(signature["mac"])):
        raise ModelFileError(f"signature entry {signature!r} is not {{'alg': 'hmac-sha256', 'mac': <hex>}}")
    arrays = header.get("arrays")
    if not isinstance(arrays, dict):
        raise ModelFileError(f"'arrays' entry is {type(arrays).__name__}, not an object")
    for name, spec in arrays.items():
        if not _NAME.fullmatch(name) or name == "__header__":
            raise ModelFileError(f"array name {name!r} is not 1-64 letters, digits or '_'")
        if not (isinstance(spec, dict) and set(spec) == {"dtype", "shape"}):
            raise ModelFileError(f"array {name!r}: entry {spec!r} is not {{'dtype': ..., 'shape': [...]}}")
        if not (isinstance(spec["dtype"], str) and spec["dtype"] in ALLOWED_DTYPES):
            raise ModelFileError(f"array {name!r}: dtype {spec['dtype']!r} is not one a model file may hold")
        shape = spec["shape"]
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
                and all(type(s) is int and s >= 0 for s in shape)):
            raise ModelFileError(f"array {name!r}: shape {shape!r} is not a list of at most {MAX_NDIM} "
                                 "non-negative integers")


def _is_hex_digest(x) -> bool:
    return isinstance(x, str) and re.fullmatch(r"[0-9a-f]{64}", x) is not None


def _npy_header(f: io.BufferedIOBase, member: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """The dtype, shape and order a ``.npy`` stream declares, read with a size cap."""
    try:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f".npy version {version} is not read here")
        shape, fortran, dtype = readers[version](f, max_header_size=_NPY_HEADER_MAX)
    except (ValueError, SyntaxError, RecursionError, MemoryError) as e:  # literal_eval of a hostile header
        raise ModelFileError(f"member {member!r} is not a plain .npy array "
                             f"({type(e).__name__}: {e})") from None
    return dtype, shape, fortran


def _read_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo, spec: dict) -> np.ndarray:
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))  # Python ints: 10**12 * 10**12 does not wrap
    if not nbytes <= info.file_size <= nbytes + _NPY_HEADER_MAX:
        raise ModelFileError(f"member {info.filename!r} holds {info.file_size} bytes; its declared "
                             f"{spec['dtype']}{list(shape)} needs {nbytes} plus a .npy header")
    with zf.open(info) as f:
        found_dtype, found_shape, fortran = _npy_header(f, info.filename)
        if found_dtype != dtype or found_shape != shape:
            raise ModelFileError(f"array {info.filename[:-4]!r} is {found_dtype}{list(found_shape)}, "
                                 f"header says {spec['dtype']}{list(shape)}")
        if info.file_size != f.tell() + nbytes:
            raise ModelFileError(f"member {info.filename!r} holds {info.file_size - f.tell()} data bytes, "
                                 f"not {nbytes}")
        flat = _read_exact(f, info, nbytes)
    if fortran:
        return flat.view(dtype).reshape(shape[::-1]).T
    return flat.view(dtype).reshape(shape)


def _read_exact(f: io.BufferedIOBase, info: zipfile.ZipInfo, nbytes: int) -> np.ndarray:
    """``nbytes`` bytes of ``f`` into a new uint8 array, inflated ``_CHUNK`` at a time."""
    out = np.empty(nbytes, np.uint8)
    done = 0
    while done < nbytes:
        chunk = f.read(min(_CHUNK, nbytes - done))
        if not chunk:
            raise ModelFileError(f"member {info.filename!r} ends after {done} of {nbytes} data bytes")
        out[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
        done += len(chunk)
    if f.read(1):  # also where zipfile checks the CRC
        raise ModelFileError(f"member {info.filename!r} has data past its declared size")
    return out
