#!/usr/bin/env bash
# CUDA check for a machine with an NVIDIA GPU: builds dinopatch._C_cuda in
# place, runs the CUDA parity tests, then times the GPU kernel at
# L=3136 K=200 D=768 (ViT-B/14 at 784 px), batch 32, fp32 and fp16 banks,
# against the H200's ~4.3 TB/s.  Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
CMAKE_ARGS="-DDINOPATCH_CUDA=ON ${CMAKE_ARGS:-}" python setup.py build_ext --inplace > /tmp/dinopatch_gpu_build.log 2>&1 \
  || { tail -40 /tmp/dinopatch_gpu_build.log; exit 1; }
python -m pytest tests/test_kernels.py -q -m cuda -rs
python - <<'PY'
import time
import numpy as np
from dinopatch import _C_cuda, kernels

L, K, D, B, PEAK = 3136, 200, 768, 32, 4.3e12
h = w = 56
assert "cuda" in kernels.available(), kernels.available()
rng = np.random.default_rng(0)
bank32 = rng.standard_normal((L, K, D), dtype=np.float32)
q = rng.standard_normal((B, L, D), dtype=np.float32)
rows = []
for name, bank, f16 in (("fp32", bank32, False), ("fp16", bank32.astype(np.float16), True)):
    dev = _C_cuda.DeviceBank(bank.view(np.uint16) if f16 else bank, f16)
    for b in (1, B):
        qb = np.ascontiguousarray(q[:b])
        for radius in (0, 1):
            dev.min_distance(qb, h, w, radius)
            _C_cuda.synchronize()
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                dev.min_distance(qb, h, w, radius)  # includes query upload + result download
                times.append(time.perf_counter() - t0)
            t = min(times)
            reads = bank.nbytes * (1 if radius == 0 else 9)
            rows.append((name, b, radius, t * 1e3, t / b * 1e3, bank.nbytes / t / 1e9,
                         bank.nbytes / t / PEAK, 2.0 * b * L * K * D * (1 if radius == 0 else 9) / t / 1e12))
    if f16:
        ref = kernels.min_distance(q[:2], bank, "cpp" if "cpp" in kernels.available() else "numpy")
        got = dev.min_distance(np.ascontiguousarray(q[:2]), h, w, 0)
        print(f"fp16 parity vs CPU on the full size: max rel err {np.abs(got - ref).max() / ref.max():.2e}")
x = rng.standard_normal((64, 400, D), dtype=np.float32)
kernels.kcenter_greedy(x, 40, "cuda")
t0 = time.perf_counter(); idx = kernels.kcenter_greedy(x, 40, "cuda"); tk = time.perf_counter() - t0
t0 = time.perf_counter(); ref = kernels.kcenter_greedy(x, 40, "cpp"); tc = time.perf_counter() - t0
print(f"\nL={L} K={K} D={D} ({bank32.nbytes / 2**30:.2f} GiB fp32), ms include query upload and result download")
print(f"{'bank':5} {'batch':>5} {'radius':>6} {'ms/call':>8} {'ms/img':>8} {'GB/s':>8} {'of 4.3TB/s':>10} {'TFLOP/s':>8}")
for r in rows:
    print(f"{r[0]:5} {r[1]:5d} {r[2]:6d} {r[3]:8.3f} {r[4]:8.3f} {r[5]:8.0f} {r[6]:10.1%} {r[7]:8.2f}")
print(f"\nk-center L=64 N=400 D={D} k=40: cuda {tk*1e3:.1f} ms, cpp {tc*1e3:.1f} ms, same indices: {np.array_equal(idx, ref)}")
PY
