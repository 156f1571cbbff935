"""pytest-benchmark suite of the kernels: ``pytest benchmarks --benchmark-only``.

min_distance at the sizes of ``python -m dinopatch.bench kernels`` (L=1024,
K=200, D=384) at batch 1 and 16, every kernel but the numpy reference, fp32
and fp16 banks; k-center smaller than the bench's (L=16 instead of 64, N=400,
D=384, k=40); one tolerance vs a tolerance map of 2 everywhere (32x32 grid, K=40).
Speed targets are checked by the bench command, not here: these only time.
"""
import numpy as np
import pytest

from dinopatch import kernels

L, K, D = 1024, 200, 384
FAST = [b for b in kernels.available() if b != "numpy"]


@pytest.fixture(scope="module")
def banks():
    b = np.random.default_rng(0).standard_normal((L, K, D), dtype=np.float32)
    return {"fp32": b, "fp16": b.astype(np.float16)}


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("kernel", FAST)
def test_min_distance(benchmark, banks, kernel, dtype, batch):
    q = np.random.default_rng(1).standard_normal((batch, L, D), dtype=np.float32)
    bank = banks[dtype]
    benchmark.extra_info.update(bank_bytes=bank.nbytes, batch=batch)
    out = benchmark(kernels.min_distance, q, bank, kernel)
    assert out.shape == (batch, L)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("form", ["single r=2", "map all 2"])
@pytest.mark.parametrize("kernel", FAST)
def test_min_distance_tolerance_map(benchmark, kernel, form, batch):
    """One tolerance vs a map of the same tolerance everywhere (the same work): the map's overhead."""
    side, k = 32, 40
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((side * side, k, D), dtype=np.float32)
    q = rng.standard_normal((batch, side * side, D), dtype=np.float32)
    tolerance = 2 if form == "single r=2" else np.full(side * side, 2, np.int8)
    out = benchmark(kernels.min_distance, q, bank, kernel, grid=(side, side), tolerance=tolerance)
    assert out.shape == (batch, side * side)


@pytest.mark.parametrize("kernel", kernels.available())
def test_kcenter(benchmark, kernel):
    x = np.random.default_rng(2).standard_normal((16, 400, D), dtype=np.float32)
    rounds = 1 if kernel == "numpy" else 5
    out = benchmark.pedantic(kernels.kcenter_greedy, args=(x, 40, kernel), rounds=rounds, warmup_rounds=1)
    assert out.shape == (16, 40)
