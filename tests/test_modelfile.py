"""The model file is data: every malformed file raises ModelFileError and runs no code."""
import json
import os
import pickle
import zipfile

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
