"""Manifests: part numbers named to model files, relative paths from the manifest's folder, every mistake said."""
import json

import pytest

from dinopatch.catalog import CatalogError, model_files, read_manifest
from dinopatch.serve import ServiceConfig, main


@pytest.fixture
def plant(tmp_path):
    """A plant folder: models in line3/ and elsewhere/, the manifest in config/."""
    for p in ("line3/bracket-a.npz", "line3/bolt.npz", "elsewhere/nut.npz"):
        (tmp_path / p).parent.mkdir(exist_ok=True)
        (tmp_path / p).write_bytes(b"")
    (tmp_path / "config").mkdir()
    return tmp_path


def _manifest(plant, doc, name="plant.json"):
    path = plant / "config" / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_part_numbers_name_files_relative_to_the_manifest(plant, monkeypatch):
    manifest = _manifest(plant, {"models": {"PN-1001": "../line3/bracket-a.npz", "PN-1002.b": "../line3/bolt.npz",
                                            "pn_7": str(plant / "elsewhere/nut.npz")}})
    monkeypatch.chdir(plant / "line3")  # relative paths are the manifest's, not the working folder's
    assert model_files([manifest]) == {"PN-1001": str(plant / "line3/bracket-a.npz"),
                                       "PN-1002.b": str(plant / "line3/bolt.npz"),
                                       "pn_7": str(plant / "elsewhere/nut.npz")}
    # Beside a folder: names of both kinds, in the order given.
    assert list(model_files([plant / "elsewhere", manifest])) == ["nut", "PN-1001", "PN-1002.b", "pn_7"]
    # Two part numbers may share one model file.
    shared = _manifest(plant, {"models": {"A": "../line3/bolt.npz", "B": "../line3/bolt.npz"}}, "shared.json")
    assert set(read_manifest(shared).values()) == {plant / "config/../line3/bolt.npz"}


@pytest.mark.parametrize("doc, error", [
    ({"models": {"PN-1": "../line3/bolt.npz"}, "version": 2}, r"no other key; got \['models', 'version'\]"),
    ({"model": {"PN-1": "../line3/bolt.npz"}}, r"no other key; got \['model'\]"),
    ({"models": {}}, "at least one model"),
    ([["PN-1", "../line3/bolt.npz"]], "got list"),
    ('{"models": {"PN-1": "../line3/bolt.npz", "PN-1": "../line3/bracket-a.npz"}}', "'PN-1' named twice"),
    ({"models": {"PN-1": "../line3/missing.npz"}}, "PN-1: no such model file .*missing.npz"),
    ({"models": {"PN-1": "../line3"}}, "PN-1: no such model file"),
    ({"models": {"PN-1": 7}}, "PN-1: the model file must be a path"),
    ({"models": {"PN-1": ""}}, "PN-1: the model file must be a path"),
    ({"models": {"PN 1": "../line3/bolt.npz"}}, "part number 'PN 1': 1 to 128 letters"),
    ({"models": {"../bolt": "../line3/bolt.npz"}}, "part number '../bolt'"),
    ({"models": {"-x": "../line3/bolt.npz"}}, "part number '-x'"),
    ({"models": {"x" * 129: "../line3/bolt.npz"}}, "part number 'xxx"),
    ('{"models": {"PN-1": "../line3/bolt.npz"}', "not a JSON manifest"),
])
def test_every_mistake_in_a_manifest_is_said(plant, doc, error):
    with pytest.raises(CatalogError, match=error):
        model_files([_manifest(plant, doc)])


def test_a_name_twice_across_manifest_and_files_is_refused(plant):
    manifest = _manifest(plant, {"models": {"bolt": "../line3/bracket-a.npz"}})
    with pytest.raises(CatalogError, match="two models are named 'bolt'"):
        model_files([plant / "line3/bolt.npz", manifest])


def test_serve_takes_a_manifest_and_says_what_is_wrong_with_one(plant, onnx_model, capsys):
    import ray

    model, onnx = onnx_model
    manifest = _manifest(plant, {"models": {"PN-1001": str(model)}})
    assert ServiceConfig(models=str(manifest), engine=str(onnx)).files == {"PN-1001": str(model)}
    with pytest.raises(SystemExit, match=r"dinopatch: .*plant.json: PN-2: no such model file"):
        main([str(_manifest(plant, {"models": {"PN-1001": str(model), "PN-2": "nope.npz"}})), "--engine", str(onnx)])
    assert not ray.is_initialized()
