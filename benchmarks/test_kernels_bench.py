"""pytest-benchmark suite of the kernels: ``pytest benchmarks --benchmark-only``.

min_distance at the sizes of ``python -m dinopatch.bench kernels`` (L=1024,
K=200, D=384) at batch 1 and 16, every backend but the numpy reference, fp32
and fp16 banks; k-center smaller than the bench's (L=16 instead of 64, N=400,
D=384, k=40).  Speed targets are checked by
the bench command, not here: these only time.
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
@pytest.mark.parametrize("backend", FAST)
def test_min_distance(benchmark, banks, backend, dtype, batch):
    q = np.random.default_rng(1).standard_normal((batch, L, D), dtype=np.float32)
    bank = banks[dtype]
    benchmark.extra_info.update(bank_bytes=bank.nbytes, batch=batch)
    out = benchmark(kernels.min_distance, q, bank, backend)
    assert out.shape == (batch, L)


@pytest.mark.parametrize("backend", kernels.available())
def test_kcenter(benchmark, backend):
    x = np.random.default_rng(2).standard_normal((16, 400, D), dtype=np.float32)
    rounds = 1 if backend == "numpy" else 5
    out = benchmark.pedantic(kernels.kcenter_greedy, args=(x, 40, backend), rounds=rounds, warmup_rounds=1)
    assert out.shape == (16, 40)
