"""ONNX export and the onnx engine against the torch reference.

The weights are random but every block matters: LayerScale gammas at 1
(``conftest.BLOCKS_MATTER``; ``test_fixture.py`` shows the difference).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCKS_MATTER, SEED_SETTINGS, assert_refuses_foreign_graphs, run_without, textures

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")


from dinopatch import modelfile  # noqa: E402
from dinopatch.backbone import (  # noqa: E402
    DeviceUnavailableError,
    OnnxBackbone,
    TorchBackbone,
    find_or_export_onnx,
    get_spec,
    make_backbone,
    onnx_cache_path,
)
from dinopatch.backbone.onnx_export import export_backbone, export_onnx, token_cosine, token_error  # noqa: E402

NAME, SIZE = "dinov2_vits14", 224
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DINOPATCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def weights() -> Path:
    """The session's random ViT-S/14 checkpoint with every LayerScale gamma at 1 (conftest)."""
    return Path(BLOCKS_MATTER)


@pytest.fixture(scope="module")
def reference(weights) -> TorchBackbone:
    return TorchBackbone(NAME, weights, SIZE, layers=1)


@pytest.fixture(scope="module")
def fp32_file(weights) -> Path:
    """The layers=1 fp32 export, made through the cache as engine='onnx' makes it."""
    return export_onnx(NAME, weights, SIZE, layers=1)


@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_tokens_match_torch(fp32_file, reference, batch):
    engine = OnnxBackbone(path=fp32_file)
    x = textures(batch)
    got, ref = engine(x), reference(x)
    assert got.shape == ref.shape == (batch, 16, 16, 384) and got.dtype == np.float32
    err = token_error(got, ref)
    assert err <= 1e-4, f"max |onnx - torch| = {err:.2e} of max |torch|"


def test_mean_of_last_blocks_matches_torch(reference, tmp_path):
    four = TorchBackbone(NAME, image_size=SIZE, layers=4, model=reference.model)
    path = export_backbone(four, tmp_path / "l4.onnx")
    x = textures(3)
    ref = four(x)
    err = token_error(OnnxBackbone(path=path, layers=4)(x), ref)
    assert err <= 1e-4, f"layers=4: max |onnx - torch| = {err:.2e} of max |torch|"
    assert token_cosine(ref, reference(x)) < 0.99  # the mean is not just the last block


@pytest.mark.slow
def test_fp32_tokens_match_torch_at_448(weights, tmp_path):
    big = TorchBackbone(NAME, weights, 448)
    x = textures(1, side=448)
    err = token_error(OnnxBackbone(path=export_backbone(big, tmp_path / "448.onnx"))(x), big(x))
    assert err <= 1e-4, f"448 px: max |onnx - torch| = {err:.2e} of max |torch|"


def test_graph_and_metadata(fp32_file, reference):
    model = onnx.load(str(fp32_file))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # The position embedding was resampled before export: no interpolation in the graph.
    ops = [n.op_type for n in model.graph.node]
    assert "Resize" not in ops
    # Attention runs as ONNX Runtime's fused op, one per block; the torch model is left as it was.
    assert ops.count("MultiHeadAttention") == 12 and "Softmax" not in ops
    assert not any("forward" in vars(m) for m in reference.model.modules())
    (inp, pos), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and out.name == "tokens" and dims == ["batch", 3, SIZE, SIZE]
    assert pos.name == "positions" and pos.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in pos.type.tensor_type.shape.dim] == ["patches"]
    assert [d.dim_param for d in out.type.tensor_type.shape.dim][:2] == ["batch", "patches"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["backbone"] == NAME and meta["image_size"] == str(SIZE) and meta["patch_size"] == "14"
    assert meta["layers"] == "1" and meta["precision"] == "fp32" and meta["attention"] == "fused"
    assert json.loads(meta["mean"]) == pytest.approx(get_spec(NAME).mean)
    assert json.loads(meta["std"]) == pytest.approx(get_spec(NAME).std)
    assert meta["weights_fingerprint"] == reference.fingerprint
    assert float(meta["check_max_rel_error"]) <= 1e-4 and "dinopatch_version" in meta


def test_portable_export_has_standard_ops_only(weights, reference):
    path = export_onnx(NAME, weights, SIZE, portable=True)
    # A cache entry of its own: the fused graph is never taken for it, nor it for the fused graph.
    assert path == onnx_cache_path(NAME, SIZE, 1, "fp32", reference.fingerprint, portable=True)
    assert "_portable_" in path.name and path != onnx_cache_path(NAME, SIZE, 1, "fp32", reference.fingerprint)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node} | {o.domain for o in model.opset_import}
    assert domains <= {"", "ai.onnx"}, f"non-standard op domains {domains}"
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Softmax") == 12 and "MultiHeadAttention" not in ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["attention"] == "portable" and float(meta["check_max_rel_error"]) <= 1e-4
    x = textures(2)
    err = token_error(OnnxBackbone(path=path)(x), reference(x))
    assert err <= 1e-4, f"portable: max |onnx - torch| = {err:.2e} of max |torch|"


def test_cache_hit_reuses_the_file(fp32_file, weights, monkeypatch):
    import dinopatch.backbone.engines
    import dinopatch.backbone.onnx_export

    def no_export(*a, **k):
        raise AssertionError("exported again despite a cached file")

    monkeypatch.setattr(dinopatch.backbone.onnx_export, "export_onnx", no_export)
    stamp = fp32_file.stat().st_mtime_ns
    engine = make_backbone("onnx", name=NAME, weights=weights, image_size=SIZE, layers=1)
    # The GPU package runs on CUDA wherever a GPU is usable; device names it either way.
    provider = "CUDAExecutionProvider" if engine.device.startswith("cuda") else "CPUExecutionProvider"
    assert isinstance(engine, OnnxBackbone) and engine.path == fp32_file and engine.provider == provider
    assert find_or_export_onnx(NAME, weights, SIZE, fingerprint=engine.fingerprint) == fp32_file
    assert fp32_file.stat().st_mtime_ns == stamp
    # "auto" takes OpenVINO bf16 on a CPU with bf16: this test is about ONNX Runtime's cache on any CPU.
    monkeypatch.setattr(dinopatch.backbone.engines, "cpu_has_bf16", lambda: False)
    assert isinstance(make_backbone("auto", engine.fingerprint, name=NAME, weights=weights, image_size=SIZE),
                      OnnxBackbone)


def test_a_session_off_the_first_provider_asked_for_is_an_error(fp32_file):
    """TensorRT asked for (the GPU check's row) but not where the session runs: an error, not a CPU run."""
    import onnxruntime as ort

    trt = "TensorrtExecutionProvider"
    if trt in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT: the session may well start on it")
    with pytest.raises(DeviceUnavailableError, match=f"could not start {trt}.*would run on CPUExecution"):
        OnnxBackbone(path=fp32_file, device="cpu", providers=[(trt, {}), "CPUExecutionProvider"])
    engine = OnnxBackbone(path=fp32_file, device="cpu", providers=["CPUExecutionProvider"])
    assert engine.provider == "CPUExecutionProvider"


def test_bad_files_and_mismatches_are_clear_errors(fp32_file, reference, tmp_path):
    assert_refuses_foreign_graphs(OnnxBackbone, tmp_path)
    with pytest.raises(FileNotFoundError):
        OnnxBackbone(path=tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="image_size 448 wanted"):
        OnnxBackbone(path=fp32_file, image_size=448)
    with pytest.raises(ValueError, match="fitted with"):
        make_backbone(str(fp32_file), "0" * 64)
    with pytest.raises(ValueError, match="fitted with other weights"):
        TorchBackbone(NAME, image_size=SIZE, model=reference.model, fingerprint="0" * 64)
    with pytest.raises(ValueError, match="unknown engine"):
        make_backbone("onnx:int4")


def _run_torch_free(code: str, cwd: Path) -> None:
    """Run ``code`` where torch, timm and onnx cannot be imported: onnxruntime must suffice."""
    run_without(("torch", "timm", "onnx"), code, cwd)


def test_backbone_runs_without_torch(fp32_file, reference, tmp_path):
    x = textures(2)
    np.save(tmp_path / "x.npy", x)
    _run_torch_free(f"""
        import numpy as np
        from dinopatch.backbone import make_backbone
        # Found in the cache by fingerprint; the weights file is not needed here.
        engine = make_backbone("onnx", {reference.fingerprint!r}, name={NAME!r}, weights="gone.pth", image_size={SIZE})
        np.save("tokens.npy", engine(np.load("x.npy")))
        try:
            make_backbone("onnx", "f" * 64, name={NAME!r}, weights="random", image_size={SIZE})
        except FileNotFoundError as e:
            assert "torch is not installed" in str(e), e
        else:
            raise AssertionError("no error without a cached export")
    """, tmp_path)
    assert token_error(np.load(tmp_path / "tokens.npy"), reference(x)) <= 1e-4


def test_detector_predicts_without_torch(fp32_file, weights, tmp_path):
    from dinopatch import detector

    rng = np.random.default_rng(0)
    good = [np.full((96, 96, 3), 128, np.uint8) + rng.integers(0, 8, (96, 96, 3), dtype=np.uint8) for _ in range(4)]
    bad = good[0].copy()
    bad[30:60, 30:60] = 255
    det = detector.DinoPatch(weights=str(weights), image_size=SIZE, align=False, engine="onnx",
                             progress=False).fit(good)
    model = det.save(tmp_path / "model.npz")
    np.save(tmp_path / "x.npy", np.stack([good[1], bad]))
    _run_torch_free("""
        import numpy as np
        from dinopatch.detector import DinoPatch
        det = DinoPatch.load("model.npz", engine="onnx")
        np.save("scores.npy", [r.score for r in det.predict(list(np.load("x.npy")))])
    """, tmp_path)
    scores = np.load(tmp_path / "scores.npy")
    assert scores == pytest.approx(det.score_images([good[1], bad]), rel=1e-4, abs=1e-6)
    assert modelfile.read(model)[0]["weights_fingerprint"] == det.backbone_for().fingerprint


def test_int8_tokens_close_to_torch(reference, tmp_path, capsys):
    path = export_backbone(reference, tmp_path / "int8.onnx", precision="int8")
    x = textures(2)
    cosine = token_cosine(OnnxBackbone(path=path, precision="int8")(x), reference(x))
    with capsys.disabled():
        print(f"\nint8 token cosine vs torch: {cosine:.5f}")
    assert cosine >= 0.99


def test_fp16_export_keeps_float32_io(reference, tmp_path):
    path = export_backbone(reference, tmp_path / "fp16.onnx", precision="fp16")
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    with pytest.warns(UserWarning, match="fp16 is for GPUs"):
        engine = OnnxBackbone(path=path, device="cpu")
    x = textures(1)
    assert token_cosine(engine(x), reference(x)) >= 0.999


def test_export_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "dinopatch", "export", "-h"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--precision" in proc.stdout, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("category", ["pasta", "screw"])
def test_image_scores_match_torch_end_to_end(weights, category, capsys):
    """Whole pipeline (align, backbone, distances, post-processing) per engine, fitted and scored."""
    from dinopatch.detector import DinoPatch
    from dinopatch.metrics import auroc
    from dinopatch.synthetic import DEFECTS, make_images

    def sample(defect, n, seed):
        return make_images(category, defect, n, seed, size=160)

    train = sample("good", 12, 0)
    test = sample("good", 12, 1) + [im for k, d in enumerate(DEFECTS[category]) for im in sample(d, 4, 2 + k)]
    labels = np.r_[np.zeros(12), np.ones(len(test) - 12)]
    scores = {}
    for engine in ("torch", "onnx", "onnx:int8"):
        det = DinoPatch(weights=str(weights), image_size=SIZE, align=category == "screw", engine=engine,
                        progress=False, **SEED_SETTINGS).fit(train)
        scores[engine] = det.score_images(test)
    spread = np.ptp(scores["torch"])
    deviation = np.abs(scores["onnx"] - scores["torch"]).max() / spread
    aucs = {e: auroc(labels, s) for e, s in scores.items()}
    with capsys.disabled():
        print(f"\n{category}: fp32 score deviation {deviation:.2e} of the spread; image AUROC "
              + ", ".join(f"{e} {a:.4f}" for e, a in aucs.items()))
    assert deviation <= 1e-3
    assert abs(aucs["onnx:int8"] - aucs["onnx"]) <= 0.01
