"""Query tokens already on the GPU go to the cuda kernel in place (DLPack), equal to the host path.

The GPU tests skip here (no GPU) and fail instead under DINOPATCH_REQUIRE_CUDA
(benchmarks/gpu_check.sh).  The dispatch and its refusals on the CPU side run
everywhere, with a stand-in for a CUDA array.
"""
import numpy as np
import pytest
from conftest import need_cuda

from dinopatch import kernels
from dinopatch.bank import MemoryBank


class CudaArrayStandIn:
    """Says it lives in CUDA memory (DLPack device type 2) and cannot be read as a host array."""

    shape = (2, 6, 4)

    def __dlpack_device__(self):
        return 2, 0

    def __array__(self, *args, **kwargs):
        raise TypeError("a CUDA array cannot be read as a host array")


def test_host_arrays_and_cpu_tensors_are_not_taken_for_device_queries():
    torch = pytest.importorskip("torch")
    assert not kernels.on_cuda(np.zeros((1, 2, 3), np.float32))
    assert not kernels.on_cuda(torch.zeros(1, 2, 3)) and kernels.on_cuda(CudaArrayStandIn())


@pytest.mark.parametrize("kernel", ["cpp", "numpy"])
def test_device_queries_on_a_host_backend_are_refused_by_name(kernel):
    bank = np.zeros((6, 3, 4), np.float32)
    with pytest.raises(ValueError, match=f"GPU memory; kernel '{kernel}' needs host arrays"):
        kernels.min_distance(CudaArrayStandIn(), bank, kernel)


def _pair(rng, torch, B=3, h=3, w=4, K=9, D=40, dtype=np.float32):
    """Host queries with image 0 equal to bank rows, the same on the GPU, and the bank."""
    q = rng.standard_normal((B, h * w, D), dtype=np.float32)
    bank = rng.standard_normal((h * w, K, D), dtype=np.float32).astype(dtype)
    q[0] = bank[:, 2]
    return q, torch.from_numpy(q).cuda(), bank


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("tolerance", [0, 1])
def test_device_queries_equal_the_host_path(rng, dtype, tolerance):
    """Same kernel, same numbers: bitwise equal to host queries, within 1e-4 of the reference, exact zeros."""
    need_cuda(torch=True)
    import torch

    q, qt, bank = _pair(rng, torch, dtype=dtype)
    counts = np.array([9, 1, 4, 9, 2, 9, 9, 5, 9, 3, 9, 7])
    for dev in (kernels.upload(bank), kernels.upload(bank, counts)):  # ragged banks too
        host = kernels.min_distance(q, dev, "cuda", grid=(3, 4), tolerance=tolerance)
        got = kernels.min_distance(qt, dev, "cuda", grid=(3, 4), tolerance=tolerance)
        np.testing.assert_array_equal(got, host)
    ref = kernels.min_distance_numpy(q, bank, grid=(3, 4), tolerance=tolerance)
    got = kernels.min_distance(qt, bank, "cuda", grid=(3, 4), tolerance=tolerance)  # a host bank, uploaded per call
    assert np.abs(got - ref).max() <= 1e-4 * ref.max() and (got[0] == 0).all()


@pytest.mark.cuda
def test_device_queries_written_on_another_stream_are_waited_for(rng):
    """Queries still being computed on a side stream when the call starts are read only once they are done."""
    need_cuda(torch=True)
    import torch

    q, _, bank = _pair(rng, torch, B=16, D=256)
    dev = kernels.upload(bank)
    want = kernels.min_distance(q, dev, "cuda")
    side = torch.cuda.Stream()
    for _ in range(3):
        with torch.cuda.stream(side):
            slow = torch.randn(4096, 4096, device="cuda")
            for _ in range(8):  # tens of milliseconds of work before the queries are written
                slow = torch.tanh(slow @ slow)
            qt = torch.from_numpy(q).cuda() + 0 * slow[:1, :1].sum()
            got = kernels.min_distance(qt, dev, "cuda")
        np.testing.assert_array_equal(got, want)


@pytest.mark.cuda
def test_device_queries_of_the_wrong_kind_are_refused(rng):
    need_cuda(torch=True)
    import torch

    _, qt, bank = _pair(rng, torch)
    dev = kernels.upload(bank)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.min_distance(qt.transpose(0, 1).contiguous().transpose(0, 1), dev, "cuda")
    with pytest.raises(ValueError, match="float32"):
        kernels.min_distance(qt.half(), dev, "cuda")
    with pytest.raises(ValueError, match="disagree on L or D"):
        kernels.min_distance(qt[:, :, :8], dev, "cuda")
    with pytest.raises(ValueError, match="3 dimensions"):
        kernels.min_distance(qt[0], dev, "cuda")
    with pytest.raises(ValueError, match="GPU memory; kernel 'cpp'"):
        kernels.min_distance(qt, bank, "cpp")
    assert kernels.min_distance(qt[:0], dev, "cuda").shape == (0, 12)


@pytest.mark.cuda
@pytest.mark.parametrize("tolerance", [0, 1])
@pytest.mark.parametrize("region", [False, True])
def test_bank_distances_of_device_tokens_equal_the_host_path(rng, tolerance, region):
    need_cuda(torch=True)
    import torch

    nominal = rng.standard_normal((5, 3, 4, 16), dtype=np.float32)
    positions = np.array([1, 2, 5, 6, 9]) if region else None
    bank = MemoryBank.fit(nominal, tolerance=tolerance, positions=positions)
    tokens = rng.standard_normal((2, 3, 4, 16), dtype=np.float32)
    host = bank.distances(tokens, kernel="cuda")
    got = bank.distances(torch.from_numpy(tokens).cuda(), kernel="cuda")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(host))
    np.testing.assert_array_equal(got[~np.isnan(got)], host[~np.isnan(host)])
    assert np.isnan(got).any() == region


def test_torch_engine_hands_its_tokens_over_on_its_device():
    torch = pytest.importorskip("torch")
    from dinopatch.backbone import TorchBackbone

    engine = TorchBackbone("dinov2_vits14", "random", 112)
    frames = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    tensor = engine(frames, on_device=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    np.testing.assert_array_equal(tensor.numpy(), engine(frames))


@pytest.mark.cuda
def test_detector_on_the_gpu_keeps_tokens_there_and_scores_as_the_host_path(monkeypatch):
    """Torch on cuda and the cuda kernel: device tokens go to the kernel; scores equal cpp's on host ones."""
    need_cuda(torch=True)
    import copy

    from conftest import FAST, screws

    from dinopatch import DinoPatch

    det = DinoPatch(**dict(FAST, device="cuda", kernel="cuda", foreground=False))
    det.fit(screws("good", 6, seed=1))
    frames = screws("good", 2, seed=5) + screws("bent_thread", 2, seed=6)
    seen, min_distance = [], kernels.min_distance
    monkeypatch.setattr(kernels, "min_distance",
                        lambda q, *a, **k: seen.append(kernels.on_cuda(q)) or min_distance(q, *a, **k))
    got = det.score_images(frames)
    assert seen == [True]
    seen.clear()
    want = copy.copy(det).set_params(kernel="cpp").score_images(frames)  # same model and engine, host tokens
    assert seen == [False]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
