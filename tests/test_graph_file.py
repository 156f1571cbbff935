"""Graphs by content: the sha256 of what an engine loads, and the checks made before any runtime opens a file."""
import hashlib
import os

import numpy as np
import pytest
from conftest import run_without

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from onnx import TensorProto, external_data_helper, helper, numpy_helper  # noqa: E402

from dinopatch.backbone import (  # noqa: E402
    OnnxBackbone,
    graph_file,  # noqa: E402
    make_backbone,
)
from dinopatch.backbone.onnx_export import export_onnx  # noqa: E402

NAME, SIZE = "dinov2_vits14", 112


@pytest.fixture(scope="module")
def export():
    path = export_onnx(NAME, "random", SIZE)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_session(monkeypatch):
    """Fails the test if a session is created: the file must be refused before."""
    def never(*a, **k):
        raise AssertionError("a session was created for a file that should have been refused")

    monkeypatch.setattr(ort, "InferenceSession", never)


def _save(tmp_path, nodes, inits=(), name="g.onnx", **save):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(inits)))
    path = tmp_path / name
    onnx.save(model, str(path), **save)
    return path


def test_sha256_is_the_files_hash(export):
    path, digest = export
    assert OnnxBackbone(path=path).sha256 == digest
    assert OnnxBackbone(path=path, sha256=digest).sha256 == digest
    with pytest.raises(ValueError, match="differs from the .* recorded with the model.*refused"):
        OnnxBackbone(path=path, sha256="0" * 64)
    pytest.importorskip("openvino")
    assert make_backbone("openvino:fp32", path=path, sha256=digest).sha256 == digest
    with pytest.raises(ValueError, match="recorded with the model"):
        make_backbone("openvino:fp32", path=path, sha256="0" * 64)


def _tamper(path):
    """Same metadata, other weights: the attack of issue 12 (a graph that passes every label check)."""
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(np.zeros(tuple(init.dims), np.float32), init.name))
    onnx.save(model, str(path))


def test_tampered_cache_is_exported_again_where_torch_is(export):
    path, digest = export
    fingerprint = OnnxBackbone(path=path).fingerprint
    _tamper(path)
    assert OnnxBackbone(path=path).sha256 != digest  # labels and metadata alone would not tell
    engine = make_backbone("onnx", fingerprint, sha256=digest, name=NAME, weights="random", image_size=SIZE)
    assert engine.path == path and engine.sha256 == digest
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_tampered_cache_is_refused_without_torch(export, tmp_path):
    path, digest = export
    fingerprint = OnnxBackbone(path=path).fingerprint
    _tamper(path)
    try:
        run_without(("torch", "timm", "onnx"), f"""
            from dinopatch.backbone import make_backbone
            try:
                make_backbone("onnx", {fingerprint!r}, sha256={digest!r}, name={NAME!r}, weights="gone.pth",
                              image_size={SIZE})
            except ValueError as e:
                assert "torch is not installed to export it again: refused" in str(e), e
            else:
                raise AssertionError("a tampered cached graph was used")
        """, tmp_path)
    finally:
        export_onnx(NAME, "random", SIZE, out=path)  # leave the cache as the other tests expect it


def test_huge_constant_is_refused_before_the_session(tmp_path, no_session):
    shape = numpy_helper.from_array(np.array([1 << 29], np.int64), "shape")  # 2 GiB of float32
    path = _save(tmp_path, [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                            helper.make_node("Add", ["x", "big"], ["y"])], [shape])
    with pytest.raises(ValueError, match=r"ConstantOfShape to the stored shape \[536870912\]"):
        OnnxBackbone(path=path)
    const = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([4096, 4096, 64]), "s"))
    path = _save(tmp_path, [const, helper.make_node("Expand", ["x", "s"], ["y"])], name="expand.onnx")
    with pytest.raises(ValueError, match="Expand to the stored shape"):
        OnnxBackbone(path=path)
    reps = numpy_helper.from_array(np.array([1 << 20], np.int64), "reps")
    with pytest.raises(ValueError, match="a Tile node"):
        OnnxBackbone(path=_save(tmp_path, [helper.make_node("Tile", ["x", "reps"], ["y"])], [reps], "tile.onnx"))


def test_declared_tensor_size_is_bounded(tmp_path, no_session):
    big = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 16, 1 << 15])  # declares 8 GiB, stores nothing
    with pytest.raises(ValueError, match="tensor 'w' of shape .* over the 1 GiB bound"):
        OnnxBackbone(path=_save(tmp_path, [helper.make_node("Add", ["x", "w"], ["y"])], [big]))


def _external(tmp_path, location: str):
    w = numpy_helper.from_array(np.ones(1, np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    external_data_helper.set_external_data(w, location=location, offset=0, length=4)
    w.ClearField("raw_data")
    return _save(tmp_path, [helper.make_node("Add", ["x", "w"], ["y"])], [w], name="ext.onnx")


def test_external_data_stays_in_the_folder(tmp_path, no_session):
    inner = tmp_path / "graph"
    inner.mkdir()
    (tmp_path / "outside.bin").write_bytes(np.ones(1, np.float32).tobytes())
    for location in ("../outside.bin", str(tmp_path / "outside.bin")):
        with pytest.raises(ValueError, match="outside the graph's folder"):
            OnnxBackbone(path=_external(inner, location))
    os.symlink(tmp_path / "outside.bin", inner / "link.bin")
    with pytest.raises(ValueError, match="outside the graph's folder|not a regular file"):
        OnnxBackbone(path=_external(inner, "link.bin"))
    os.mkdir(inner / "dir.bin")
    with pytest.raises(ValueError, match="not a regular file"):
        OnnxBackbone(path=_external(inner, "dir.bin"))


def test_external_data_is_hashed_and_bounded(tmp_path, monkeypatch):
    (tmp_path / "w.bin").write_bytes(np.ones(1, np.float32).tobytes())
    path = _external(tmp_path, "w.bin")
    files = graph_file.check_graph_file(path)
    assert files == [path, tmp_path / "w.bin"]
    digest = graph_file.graph_sha256(files)
    assert digest != hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "w.bin").write_bytes(np.full(1, 2, np.float32).tobytes())
    assert graph_file.graph_sha256(files) != digest, "the external data is not in the hash"
    monkeypatch.setattr(graph_file, "MAX_GRAPH_BYTES", path.stat().st_size + 2)
    with pytest.raises(ValueError, match="with its external data, over the"):
        graph_file.check_graph_file(path)


@pytest.mark.slow
def test_the_exporters_graphs_pass(export, tmp_path):
    """Every kind of export DinoPatch writes passes the checks (no false refusal)."""
    from dinopatch.backbone import TorchBackbone
    from dinopatch.backbone.onnx_export import export_backbone

    backbone = TorchBackbone(NAME, "random", SIZE)
    graph_file.check_graph_file(export[0])
    for precision, portable in (("int8", False), ("fp16", False), ("fp32", True)):
        graph_file.check_graph_file(export_backbone(backbone, tmp_path / f"{precision}{portable}.onnx", precision,
                                                    portable=portable))


def test_garbage_is_unreadable(tmp_path, no_session):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        OnnxBackbone(path=junk)
