"""The OpenVINO engine against the torch reference, on a ViT-S/14 whose blocks matter (LayerScale 1).

f32 is held to the fp32 export's bound (1e-4 of the largest token); bf16,
where the CPU has it, by token cosine and by end-to-end image scores.
"""
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCKS_MATTER, SEED_SETTINGS, assert_refuses_foreign_graphs, run_without, textures

ov = pytest.importorskip("openvino")
pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from dinopatch import cpu  # noqa: E402
from dinopatch.backbone import (  # noqa: E402
    OnnxBackbone,
    OpenVinoBackbone,
    TorchBackbone,
    auto_engine,
    cpu_has_bf16,
    engines,
    make_backbone,
)
from dinopatch.backbone.onnx_export import export_backbone, export_onnx, token_cosine, token_error  # noqa: E402

NAME, SIZE = "dinov2_vits14", 112
_AT = f" at DINOPATCH_CPU={cpu.level()}" if cpu.level() else ""
needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason=f"this CPU{_AT} has neither AVX512-BF16 nor AMX")


@pytest.fixture(scope="module")
def weights():
    return Path(BLOCKS_MATTER)


@pytest.fixture(scope="module")
def reference(weights) -> TorchBackbone:
    return TorchBackbone(NAME, weights, SIZE)


@pytest.fixture(scope="module")
def fp32_file(weights):
    return export_onnx(NAME, weights, SIZE)


@pytest.mark.parametrize("batch", [1, 3])
def test_f32_tokens_match_torch(fp32_file, reference, weights, batch):
    engine = make_backbone("openvino:fp32", name=NAME, weights=weights, image_size=SIZE)
    assert isinstance(engine, OpenVinoBackbone) and engine.path == fp32_file and engine.precision == "fp32"
    x = textures(batch)
    got, ref = engine(x), reference(x)
    assert got.shape == ref.shape == (batch, 8, 8, 384) and got.dtype == np.float32
    err = token_error(got, ref)
    assert err <= 1e-4, f"max |openvino - torch| = {err:.2e} of max |torch|"


def test_f32_tokens_at_positions_match_torch(fp32_file, reference, weights):
    """Foreground tokens: the export's ``positions`` input, fed the region's flat indices."""
    engine = make_backbone("openvino:fp32", name=NAME, weights=weights, image_size=SIZE)
    x = textures(2)
    for positions in (np.arange(1, 64, 3), np.array([63])):
        got, ref = engine(x, positions), reference(x, positions)
        assert got.shape == ref.shape == (2, len(positions), 384)
        err = token_error(got, ref)
        assert err <= 1e-4, f"max |openvino - torch| = {err:.2e} of max |torch| at {len(positions)} positions"
    with pytest.raises(ValueError, match="positions"):
        engine(x, np.array([5, 3]))


def test_reads_the_fused_attention_of_the_export(fp32_file):
    """OpenVINO's ONNX reader maps com.microsoft.MultiHeadAttention to its own attention op, one per block."""
    onnx_ops = [n.op_type for n in onnx.load(str(fp32_file)).graph.node]
    ov_ops = [op.get_type_name() for op in ov.Core().read_model(str(fp32_file)).get_ordered_ops()]
    assert onnx_ops.count("MultiHeadAttention") == 12
    assert ov_ops.count("ScaledDotProductAttention") == 12 and "Softmax" not in ov_ops


def test_layers_and_threads(reference, tmp_path):
    four = TorchBackbone(NAME, image_size=SIZE, layers=4, model=reference.model)
    engine = OpenVinoBackbone(path=export_backbone(four, tmp_path / "l4.onnx"), layers=4, precision="fp32", threads=1)
    assert engine.threads == 1 and engine.layers == 4
    x = textures(2)
    assert token_error(engine(x), four(x)) <= 1e-4


@needs_bf16
def test_bf16_tokens_close_to_torch(reference, weights, capsys):
    engine = make_backbone("openvino:bf16", name=NAME, weights=weights, image_size=SIZE)
    x = textures(2)
    cosine = token_cosine(engine(x), reference(x))
    with capsys.disabled():
        print(f"\nopenvino bf16 token cosine vs torch: {cosine:.5f}")
    assert engine.precision == "bf16" and cosine >= 0.999


@pytest.mark.skipif(cpu_has_bf16(), reason="the refusal is for CPUs without bf16 (DINOPATCH_CPU=avx2 makes one)")
def test_bf16_is_refused_where_the_cpu_lacks_it(weights):
    with pytest.raises(ValueError, match="AVX512-BF16 or AMX"):
        make_backbone("openvino:bf16", name=NAME, weights=weights, image_size=SIZE)
    assert make_backbone("openvino", name=NAME, weights=weights, image_size=SIZE).precision == "fp32"


def test_refuses_other_exports(fp32_file, tmp_path):
    with pytest.raises(ValueError, match="fitted with"):
        OpenVinoBackbone(path=fp32_file, fingerprint="0" * 64)
    with pytest.raises(ValueError, match="image_size 224 wanted"):
        OpenVinoBackbone(path=fp32_file, image_size=224)
    relabelled = onnx.load(str(fp32_file))
    for prop in relabelled.metadata_props:
        if prop.key == "precision":
            prop.value = "int8"
    onnx.save(relabelled, str(tmp_path / "int8.onnx"))
    with pytest.raises(ValueError, match="OpenVINO reads the fp32 export"):
        OpenVinoBackbone(path=tmp_path / "int8.onnx")
    assert_refuses_foreign_graphs(OpenVinoBackbone, tmp_path)
    with pytest.raises(ValueError, match="must be one of"):
        OpenVinoBackbone(path=fp32_file, precision="fp16")


def test_runs_without_torch_or_onnxruntime(fp32_file, reference, tmp_path):
    x = textures(2)
    np.save(tmp_path / "x.npy", x)
    run_without(("torch", "timm", "onnx", "onnxruntime"), f"""
        import numpy as np
        from dinopatch.backbone import make_backbone
        # Found in the cache by fingerprint; the weights file is not needed here.
        engine = make_backbone("openvino:fp32", {reference.fingerprint!r}, name={NAME!r}, weights="gone.pth",
                               image_size={SIZE})
        np.save("tokens.npy", engine(np.load("x.npy")))
    """, tmp_path)
    assert token_error(np.load(tmp_path / "tokens.npy"), reference(x)) <= 1e-4


def test_auto_follows_the_documented_rule(monkeypatch):
    """bf16 OpenVINO first, then ONNX Runtime fp32, then OpenVINO f32, then torch."""
    def machine(have: set, bf16: bool):
        monkeypatch.setattr(engines, "installed", lambda module: module in have)
        monkeypatch.setattr(engines, "cpu_has_bf16", lambda: bf16)
        return auto_engine()

    assert machine({"openvino", "onnxruntime"}, True) == "openvino:bf16"
    assert machine({"openvino", "onnxruntime"}, False) == "onnx"
    assert machine({"onnxruntime"}, True) == "onnx"
    assert machine({"openvino"}, False) == "openvino:fp32"
    assert machine(set(), True) == "torch"


def test_auto_on_this_machine(weights, fp32_file):
    engine = make_backbone("auto", name=NAME, weights=weights, image_size=SIZE)
    if cpu_has_bf16():
        assert isinstance(engine, OpenVinoBackbone) and engine.precision == "bf16"
    else:
        assert isinstance(engine, OnnxBackbone) and engine.precision == "fp32"


@pytest.mark.parametrize("engine", ["openvino:fp32", pytest.param("openvino:bf16", marks=needs_bf16)])
def test_image_scores_match_torch_end_to_end(weights, engine, capsys):
    """Align, backbone, distances and post-processing, fitted and scored on each engine."""
    from dinopatch.detector import DinoPatch
    from dinopatch.metrics import auroc
    from dinopatch.synthetic import make_images

    train = make_images("screw", "good", 8, 0, size=128)
    test = make_images("screw", "good", 6, 1, size=128) + make_images("screw", "missing_washer", 3, 2, size=128) \
        + make_images("screw", "extra_object", 3, 3, size=128)
    labels = np.r_[np.zeros(6), np.ones(6)]
    scores = {}
    for name in ("torch", engine):
        det = DinoPatch(weights=str(weights), image_size=SIZE, engine=name, progress=False, **SEED_SETTINGS)
        scores[name] = det.fit(train).score_images(test)
    deviation = np.abs(scores[engine] - scores["torch"]).max() / np.ptp(scores["torch"])
    aucs = {e: auroc(labels, s) for e, s in scores.items()}
    with capsys.disabled():
        print(f"\n{engine}: score deviation {deviation:.2e} of the spread; image AUROC "
              + ", ".join(f"{e} {a:.4f}" for e, a in aucs.items()))
    bound, auc_bound = (1e-3, 0.0) if engine.endswith("fp32") else (0.05, 0.01)
    assert deviation <= bound and abs(aucs[engine] - aucs["torch"]) <= auc_bound
