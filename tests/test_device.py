"""The device option of the engines: a GPU asked for that is not there, ``auto``, ONNX Runtime on CUDA.

This machine has no GPU; onnxruntime-gpu's behaviour without usable CUDA
(the CUDA provider listed, the session quietly on the CPU) is reproduced by
listing the provider where the CPU package cannot start it.
"""
import logging

import numpy as np
import pytest
from conftest import textures

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from dinopatch.backbone import OnnxBackbone, TorchBackbone, make_backbone  # noqa: E402
from dinopatch.backbone.device import CPU_PROVIDER, CUDA_PROVIDER, DeviceUnavailableError, onnx_providers, parse_device  # noqa: E402
from dinopatch.backbone.onnx_export import export_onnx, token_cosine  # noqa: E402

NAME, SIZE = "dinov2_vits14", 112
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is")
no_ort_gpu = pytest.mark.skipif(CUDA_PROVIDER in ort.get_available_providers(), reason="needs the CPU onnxruntime")


@pytest.fixture(scope="module")
def fp32_file():
    return export_onnx(NAME, "random", SIZE)


@pytest.fixture
def gpu_package(monkeypatch):
    """onnxruntime-gpu as it looks with no usable GPU: CUDA listed, sessions start on the CPU."""
    preloads = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloads.append(1), raising=False)
    return preloads


def test_parse_device():
    assert parse_device("auto") == ("auto", None) and parse_device("CPU") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", 0) and parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:x", "", "mps"):
        with pytest.raises(ValueError, match="must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            parse_device(bad)


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_torch_on_a_missing_gpu_fails_at_once(device, monkeypatch):
    import dinopatch.backbone.torch_engine as torch_engine

    def never(*a, **k):
        raise AssertionError("the model was built before the device was checked")

    monkeypatch.setattr(torch_engine, "build_model", never)
    missing = rf"device '{device}' asked for, but (torch sees 0 CUDA|this torch)"
    with pytest.raises(DeviceUnavailableError, match=missing):
        make_backbone("torch", device=device, name=NAME, weights="random", image_size=SIZE)


@no_ort_gpu
def test_onnx_on_a_missing_gpu_fails_at_once(tmp_path):
    # Refused before any export is looked for or made: the path does not even exist.
    with pytest.raises(DeviceUnavailableError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        OnnxBackbone(path=tmp_path / "never.onnx", device="cuda:0")


def test_openvino_refuses_a_gpu(tmp_path):
    pytest.importorskip("openvino")
    with pytest.raises(DeviceUnavailableError, match="runs on the CPU only"):
        make_backbone("openvino", device="cuda", path=tmp_path / "never.onnx")


def test_auto_runs_on_the_cpu_and_says_so(fp32_file, caplog):
    with caplog.at_level(logging.INFO, logger="dinopatch"):
        engine = make_backbone("onnx", device="auto", path=fp32_file)
    expected = "cuda:0" if CUDA_PROVIDER in ort.get_available_providers() else "cpu"
    assert engine.device == expected and f"runs the onnx engine on {expected}" in caplog.text
    with caplog.at_level(logging.INFO, logger="dinopatch"):
        reference = TorchBackbone(NAME, "random", SIZE, device="auto")
    assert reference.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert f"runs the torch engine on {reference.device}" in caplog.text


def test_provider_options_name_the_gpu():
    device, providers = onnx_providers("cuda:2", [CUDA_PROVIDER, CPU_PROVIDER])
    assert device == "cuda:2" and providers[-1] == CPU_PROVIDER
    name, options = providers[0]
    assert name == CUDA_PROVIDER and options["device_id"] == 2 and options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert onnx_providers("cpu", [CUDA_PROVIDER, CPU_PROVIDER]) == ("cpu", [CPU_PROVIDER])


def test_gpu_package_without_a_usable_gpu(fp32_file, gpu_package):
    """A named GPU that the session cannot start on is an error; with auto, a warning and the CPU."""
    with pytest.raises(DeviceUnavailableError, match="could not start CUDAExecutionProvider"):
        OnnxBackbone(path=fp32_file, device="cuda:0")
    assert gpu_package, "preload_dlls was not called before the CUDA session"
    with pytest.warns(UserWarning, match="runs on CPUExecutionProvider, not CUDAExecutionProvider"):
        engine = OnnxBackbone(path=fp32_file, device="auto")
    assert engine.device == "cpu" and engine.provider == CPU_PROVIDER and not engine.io_binding


def test_startup_failures_are_not_called_unreadable(fp32_file, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

    def fail(*a, **k):
        raise EPFail("CUDA failure 100: no CUDA-capable device is detected")

    monkeypatch.setattr(ort, "InferenceSession", fail)
    with pytest.raises(RuntimeError, match="could not start a session.*EPFail.*no CUDA-capable device") as info:
        OnnxBackbone(path=fp32_file, device="cpu")
    assert "not a readable" not in str(info.value)


def test_io_binding_matches_run(fp32_file):
    engine = OnnxBackbone(path=fp32_file, device="cpu")
    x = textures(3)
    assert not engine.io_binding
    plain = engine(x)
    engine.io_binding = True  # the GPU branch, on the CPU provider
    bound = engine(x)
    assert bound.shape == plain.shape == (3, 8, 8, 384) and bound.dtype == np.float32
    np.testing.assert_allclose(bound, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_torch_autocast(precision):
    fp32 = TorchBackbone(NAME, "random", SIZE)
    low = TorchBackbone(NAME, image_size=SIZE, model=fp32.model, precision=precision)
    x = textures(2)
    a, b = fp32(x), low(x)
    assert b.dtype == np.float32 and not np.array_equal(a, b), "autocast changed nothing"
    assert token_cosine(b, a) >= 0.99
    with pytest.raises(ValueError, match="must be one of"):
        TorchBackbone(NAME, image_size=SIZE, model=fp32.model, precision="int8")
