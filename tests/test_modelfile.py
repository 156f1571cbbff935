"""The model file is data: every malformed file raises ModelFileError and runs no code."""
import fcntl
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest

from dinopatch import modelfile
from dinopatch.modelfile import ModelFileError


class _Boom:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def good(tmp_path):
    arrays = {"bank": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "flag": np.array([True, False])}
    return modelfile.write(tmp_path / "m.npz", {"params": {"a": 1}}, arrays), arrays


def test_round_trip(good):
    path, arrays = good
    header, back = modelfile.read(path)
    assert header["params"] == {"a": 1} and header["version"] == modelfile.VERSION
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
        assert back[k].dtype == arrays[k].dtype


def test_pickle_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ModelFileError):
        modelfile.read(path)
    assert not marker.exists()


def test_object_array_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "obj.npz"
    np.savez(path, __header__=np.frombuffer(b"{}", np.uint8), bank=np.array([_Boom(str(marker))], dtype=object))
    with pytest.raises(ModelFileError):
        modelfile.read(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04garbage"])
def test_junk_bytes(tmp_path, content):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a readable"):
        modelfile.read(path)


def test_truncated(good, tmp_path):
    path, _ = good
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError):
        modelfile.read(cut)


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        modelfile.read(tmp_path / "nope.npz")


def _rewrite(path, edit):
    """Rewrite a model file with its header edited by ``edit`` (the checksum left as it was)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays.pop("__header__").tobytes())
    edit(header, arrays)
    np.savez(path, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)


def test_newer_version(good):
    path, _ = good
    _rewrite(path, lambda h, a: h.update(version=modelfile.VERSION + 1))
    with pytest.raises(ModelFileError, match="newer"):
        modelfile.read(path)


def test_older_version_asks_for_a_refit(good):
    path, _ = good
    _rewrite(path, lambda h, a: h.update(version=modelfile.VERSION - 1))
    with pytest.raises(ModelFileError, match="older DinoPatch.*refit the model"):
        modelfile.read(path)


def test_foreign_npz(tmp_path):
    path = tmp_path / "foreign.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(ModelFileError, match="no DinoPatch header"):
        modelfile.read(path)


def test_edited_array_fails_checksum(good):
    path, _ = good
    _rewrite(path, lambda h, a: a["bank"].__setitem__((0, 0, 0), 99.0))
    with pytest.raises(ModelFileError, match="checksum"):
        modelfile.read(path)


def test_shape_differs_from_header(good):
    path, _ = good
    _rewrite(path, lambda h, a: a.update(bank=a["bank"][:1]))
    with pytest.raises(ModelFileError, match="header says"):
        modelfile.read(path)


def test_is_a_zip_of_npy_only(good):
    path, _ = good
    assert all(n.endswith(".npy") for n in zipfile.ZipFile(path).namelist())


# ----------------------------------------------------------------------------- hostile containers

def _npy(a=None, *, descr="<f4", shape=(0,), data=b""):
    """A ``.npy`` member's bytes: array ``a``, or a header of ``descr`` and ``shape`` followed by ``data``."""
    f = io.BytesIO()
    if a is not None:
        np.save(f, a)
    else:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(data)
    return f.getvalue()


def _header_npy(header) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    return _npy(np.frombuffer(text.encode(), np.uint8))


def _zip(path, members):
    """Write a zip by hand, so its directory can say what a hostile writer wants.

    Args:
        members: ``(name, method, payload, crc, size)`` per member: ``payload``
            is written as is (already compressed), ``crc`` and ``size`` are
            what the directory claims for the uncompressed content.
    """
    with open(path, "wb") as f:
        central = b""
        for name, method, payload, crc, size in members:
            offset = f.tell()
            meta = struct.pack("<HHHHHIII", 20, 0, method, 0, 0x21, crc, len(payload), size)
            f.write(b"PK\x03\x04" + meta + struct.pack("<HH", len(name), 0) + name.encode() + payload)
            central += (b"PK\x01\x02" + struct.pack("<H", 20) + meta
                        + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, offset) + name.encode())
        start = f.tell()
        f.write(central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members),
                                                        len(central), start, 0))


def _stored(name, data):
    return name, zipfile.ZIP_STORED, data, zlib.crc32(data), len(data)


def _valid_header(arrays):
    return {"format": modelfile.FORMAT, "version": modelfile.VERSION, "sha256": "0" * 64,
            "arrays": {n: {"dtype": d, "shape": list(s)} for n, (d, s) in arrays.items()}}


_BOMB_CHUNK = 1 << 24
_BOMB_CHUNKS = 64  # 1 GiB of float32 zeros, about 1 MB deflated


def _deflated_zeros(prefix: bytes):
    """``prefix`` then 1 GiB of zeros as one raw deflate stream, built in a second from repeated blocks.

    After a full flush deflate starts afresh, so each later chunk of zeros
    compresses to the same bytes and the stream is one block repeated.
    """
    zeros = bytes(_BOMB_CHUNK)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(prefix + zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    for _ in range(_BOMB_CHUNKS):
        crc = zlib.crc32(zeros, crc)
    return first + block * (_BOMB_CHUNKS - 1) + c.flush(), crc, len(prefix) + _BOMB_CHUNK * _BOMB_CHUNKS


def _child_env():
    """The environment of a child Python that imports the dinopatch under test."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


@pytest.mark.parametrize("declared", ["agrees", "lies"])
def test_deflate_bomb_is_refused_before_inflating(tmp_path, measured_read, declared):
    """1 GiB of deflated zeros (1 MB on disk): refused for under 200 MB, whether the header agrees or not."""
    n = _BOMB_CHUNK * _BOMB_CHUNKS // 4
    payload, crc, size = _deflated_zeros(_npy(descr="<f4", shape=(n,)))
    header = _valid_header({"bank": ("float32", (n if declared == "agrees" else 4,))})
    path = tmp_path / "bomb.npz"
    _zip(path, [_stored("__header__.npy", _header_npy(header)),
                ("bank.npy", zipfile.ZIP_DEFLATED, payload, crc, size)])
    assert path.stat().st_size < 2 << 20
    said, peak_mb = measured_read("dinopatch.modelfile.read", path)
    assert "zip bomb" in said.get("VALUEERROR", ""), said
    assert peak_mb < 200, f"refusing the bomb cost {peak_mb:.0f} MB"


def _rezip(path, to, method):
    """``path``'s members zipped again into ``to`` with compression ``method``, as another tool would."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(to, "w", method) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    return to


def test_lzma_member_is_refused(good, tmp_path):
    """Only stored and deflate members are read: LZMA inflates 10000:1 and is not what DinoPatch writes."""
    with pytest.raises(ModelFileError, match="compression method 14"):
        modelfile.read(_rezip(good[0], tmp_path / "lzma.npz", zipfile.ZIP_LZMA))


def test_deflated_genuine_file_loads(good, tmp_path):
    """A model re-zipped with deflate by another tool is still a model."""
    path, arrays = good
    _, back = modelfile.read(_rezip(path, tmp_path / "deflated.npz", zipfile.ZIP_DEFLATED))
    np.testing.assert_array_equal(back["bank"], arrays["bank"])


def _rewrite_text(path, edit):
    """Rewrite a model file's header with ``edit(text) -> text``; the arrays stay as they were."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    text = np.load(io.BytesIO(members.pop("__header__.npy"))).tobytes().decode()
    _zip(path, [_stored("__header__.npy", _header_npy(edit(text)))]
         + [_stored(n, data) for n, data in members.items()])


def _edit_json(edit):
    def apply(text):
        header = json.loads(text)
        edit(header)
        return json.dumps(header)
    return apply


@pytest.mark.parametrize("edit", [
    lambda h: h.update(arrays=["bank", "flag"]),
    lambda h: h.update(arrays={"bank": "float32", "flag": "bool"}),
    lambda h: h["arrays"]["bank"].update(shape="2,3,4"),
    lambda h: h["arrays"]["bank"].update(shape=[2.0, 3, 4]),
    lambda h: h["arrays"]["bank"].update(shape=[True, 3, 4]),
    lambda h: h["arrays"]["bank"].update(shape=[-2, 3, 4]),
    lambda h: h["arrays"]["bank"].update(dtype=["float32"]),
    lambda h: h["arrays"]["bank"].update(dtype="object"),
    lambda h: h.update(version="1"),
    lambda h: h.update(version=True),
    lambda h: h.update(sha256=123),
    lambda h: h.update(signature="yes"),
    lambda h: h.update(format=["dinopatch-model"]),
], ids=["arrays-list", "spec-str", "shape-str", "shape-float", "shape-bool", "shape-negative", "dtype-list",
        "dtype-object", "version-str", "version-bool", "sha-int", "signature-str", "format-list"])
def test_header_entries_of_the_wrong_type(good, edit):
    path, _ = good
    _rewrite_text(path, _edit_json(edit))
    with pytest.raises(ModelFileError):
        modelfile.read(path)


@pytest.mark.parametrize("text", [
    '{"format": "dinopatch-model", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"format": "dinopatch-model", "x": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}",
    "[" * 100_000,
], ids=["arrays", "objects", "unclosed"])
def test_deep_json_header(good, text):
    path, _ = good
    _rewrite_text(path, lambda _: text)
    with pytest.raises(ModelFileError, match="nests|not valid JSON"):
        modelfile.read(path)


def test_brackets_inside_strings_are_not_nesting(tmp_path):
    """The depth count skips strings: a header value full of brackets is data."""
    note = "[[[{{" * 1000 + '\\"]'
    path = modelfile.write(tmp_path / "m.npz", {"note": note}, {"x": np.zeros(2, np.float32)})
    assert modelfile.read(path)[0]["note"].startswith("[[[{{")


def test_duplicate_json_keys(good):
    path, _ = good
    _rewrite_text(path, lambda text: text[:-1] + ', "version": 1}')
    with pytest.raises(ModelFileError, match="duplicate keys"):
        modelfile.read(path)


def test_member_without_npy_magic(good):
    path, _ = good
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["bank.npy"] = b"\x00" * len(members["bank.npy"])
    _zip(path, [_stored(n, data) for n, data in members.items()])
    with pytest.raises(ModelFileError, match="not a plain .npy"):
        modelfile.read(path)


@pytest.mark.parametrize("shape", [(10**12,), (10**6, 10**6), (2**62, 2**62)])
def test_absurd_declared_shape(tmp_path, shape):
    """A shape whose product is huge (or overflows int64) is refused before anything is allocated."""
    header = _valid_header({"bank": ("float32", shape)})
    path = tmp_path / "huge.npz"
    _zip(path, [_stored("__header__.npy", _header_npy(header)),
                _stored("bank.npy", _npy(descr="<f4", shape=shape, data=bytes(64)))])
    with pytest.raises(ModelFileError, match="needs"):
        modelfile.read(path)


def test_npy_header_disagrees_with_declared(tmp_path):
    header = _valid_header({"bank": ("float32", (4,))})
    path = tmp_path / "m.npz"
    _zip(path, [_stored("__header__.npy", _header_npy(header)),
                _stored("bank.npy", _npy(descr="<f4", shape=(2, 2), data=bytes(16)))])
    with pytest.raises(ModelFileError, match="header says"):
        modelfile.read(path)


@pytest.mark.parametrize("case", ["duplicate", "unexpected", "missing"])
def test_members_differ_from_header(good, case):
    path, _ = good
    with zipfile.ZipFile(path) as z:
        members = [_stored(n, z.read(n)) for n in z.namelist()]
    if case == "duplicate":
        members.append(members[-1])
    elif case == "unexpected":
        members.append(_stored("extra.npy", _npy(np.zeros(2))))
    else:
        members = [m for m in members if m[0] != "flag.npy"]
    _zip(path, members)
    with pytest.raises(ModelFileError, match="duplicate|differ"):
        modelfile.read(path)


def test_random_damage_never_escapes_as_another_error(good):
    """Flipped bytes: the file loads unchanged (a byte no one reads) or raises ModelFileError, no other."""
    path, arrays = good
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(300):
        damaged = bytearray(data)
        for i in rng.integers(0, len(data), size=rng.integers(1, 4)):
            damaged[i] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        try:
            _, back = modelfile.read(path)
        except ModelFileError:
            continue
        for k in arrays:
            np.testing.assert_array_equal(back[k], arrays[k])


# ----------------------------------------------------------------------------- signing

KEY = "line-7-secret"


def test_signed_round_trip(tmp_path):
    path = modelfile.write(tmp_path / "m.npz", {"a": 1}, {"x": np.arange(3.0)}, key=KEY)
    assert modelfile.read(path, key=KEY)[0]["a"] == 1
    assert "signature" not in modelfile.read(path, key=KEY)[0]


def test_signed_file_loads_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv(modelfile.KEY_ENV, raising=False)
    path = modelfile.write(tmp_path / "m.npz", {"a": 1}, {"x": np.arange(3.0)}, key=KEY)
    assert modelfile.read(path)[0]["a"] == 1


def test_key_from_environment(tmp_path, monkeypatch):
    plain = modelfile.write(tmp_path / "plain.npz", {}, {"x": np.arange(3.0)})
    monkeypatch.setenv(modelfile.KEY_ENV, KEY)
    signed = modelfile.write(tmp_path / "signed.npz", {}, {"x": np.arange(3.0)})
    modelfile.read(signed)
    modelfile.read(signed, key=KEY)
    with pytest.raises(ModelFileError, match="not signed"):
        modelfile.read(plain)
    with pytest.raises(ModelFileError, match="wrong signature"):
        modelfile.read(signed, key="another key")


def test_tampered_signed_file(tmp_path):
    """An edit with the checksum recomputed but no key: unsigned, or the old signature no longer fits."""
    path = modelfile.write(tmp_path / "m.npz", {"threshold": 1.0}, {"x": np.arange(3.0)}, key=KEY)
    header, arrays = modelfile.read(path, key=KEY)
    signature = json.loads(np.load(path)["__header__"].tobytes())["signature"]
    modelfile.write(path, dict(header, threshold=1e308), arrays)
    with pytest.raises(ModelFileError, match="not signed"):
        modelfile.read(path, key=KEY)
    _rewrite_text(path, _edit_json(lambda h: h.update(signature=signature)))
    with pytest.raises(ModelFileError, match="wrong signature"):
        modelfile.read(path, key=KEY)
    _rewrite_text(path, _edit_json(lambda h: h["signature"].update(mac="0" * 64)))
    with pytest.raises(ModelFileError, match="wrong signature"):
        modelfile.read(path, key=KEY)


def test_empty_key_fails_closed(tmp_path, monkeypatch):
    monkeypatch.setenv(modelfile.KEY_ENV, "")
    with pytest.raises(ValueError, match="empty"):
        modelfile.write(tmp_path / "m.npz", {}, {"x": np.arange(3.0)})
    with pytest.raises(ValueError, match="empty"):
        modelfile.read(tmp_path / "m.npz")


# ----------------------------------------------------------------------------- safe saves

_SAVER = """
import sys
import numpy as np
from dinopatch import modelfile
path, writer, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    bank = np.full((256, 1024), writer * 1000 + i, np.float32)
    modelfile.write(path, {"writer": writer, "i": i}, {"bank": bank})
"""


def test_concurrent_saves_never_expose_a_corrupt_file(tmp_path):
    path = tmp_path / "m.npz"
    modelfile.write(path, {"writer": -1, "i": 0}, {"bank": np.full((256, 1024), -1000, np.float32)})
    savers = [subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(w), "40"], env=_child_env(),
                               cwd=tmp_path, stderr=subprocess.PIPE) for w in (1, 2)]
    loads, corrupt = 0, []
    while any(p.poll() is None for p in savers) or loads < 20:
        try:
            header, arrays = modelfile.read(path)
        except ModelFileError as e:
            corrupt.append(str(e))
        else:
            assert (arrays["bank"] == header["writer"] * 1000 + header["i"]).all()
        loads += 1
    failed_saves = [p.stderr.read().decode() for p in savers if p.wait(timeout=60) != 0]
    assert not corrupt, f"{len(corrupt)} of {loads} loads saw a corrupt file: {corrupt[:3]}"
    assert not failed_saves, failed_saves
    assert os.listdir(tmp_path) == ["m.npz"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_failure_mid_save_cleans_up(good, monkeypatch, error):
    path, arrays = good
    before = path.read_bytes()
    real = np.lib.format.write_array

    def half_then_fail(fid, array, **kwargs):
        real(fid, array[: len(array) // 2], **kwargs)
        raise error("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", half_then_fail)
    with pytest.raises(error):
        modelfile.write(path, {"params": {"a": 2}}, arrays)
    assert os.listdir(path.parent) == [path.name]
    assert path.read_bytes() == before


_KILLED = """
import os, signal, sys
import numpy as np
from dinopatch import modelfile
def die(fid, array, **kwargs):
    fid.write(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
np.lib.format.write_array = die
modelfile.write(sys.argv[1], {}, {"bank": np.zeros(1000, np.float32)})
"""


def test_killed_save_leaves_a_named_temporary_that_the_next_save_sweeps(good):
    path, arrays = good
    before = path.read_bytes()
    out = subprocess.run([sys.executable, "-c", _KILLED, str(path)], check=False, timeout=60,
                         cwd=path.parent.parent, env=_child_env())
    assert out.returncode == -9
    assert path.read_bytes() == before
    left = [p for p in path.parent.iterdir() if p != path]
    assert len(left) == 1 and left[0].name.startswith(f".{path.name}.tmp-"), left
    modelfile.write(path, {}, arrays)
    assert left[0].exists(), "a fresh temporary may belong to a live save: kept"
    os.utime(left[0], (0, 0))
    modelfile.write(path, {}, arrays)
    assert list(path.parent.iterdir()) == [path]


def test_sweep_keeps_a_temporary_a_live_save_holds(good):
    path, arrays = good
    live = path.parent / f".{path.name}.tmp-live"
    with open(live, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        os.utime(live, (0, 0))
        modelfile.write(path, {}, arrays)
        assert live.exists()


def test_saved_file_gets_the_usual_permissions(tmp_path):
    """mkstemp makes 0600 files; a model must stay readable by the service that loads it."""
    umask = os.umask(0o022)
    try:
        path = modelfile.write(tmp_path / "m.npz", {}, {"x": np.arange(3.0)})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
