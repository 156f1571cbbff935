#!/usr/bin/env bash
# The one prepared GPU check: build dinopatch._C_cuda, run the whole kernel
# test module with the cuda kernel required, then the bench's cuda group:
# kernel call and event times on device-resident queries (L=3136 K=200
# D=768, tolerance 0 and 1, fp32 and fp16, against --peak-gbs and a measured
# device copy; full-size parity, exact zeros and k-center identity are
# required checks), then end to end (stage cuda_e2e): ViT-S/14 at 448 px and
# the notebook's ViT-B/14 at 784 px fitted on 200 aligned synthetic parts,
# parts per second and the split across align, backbone, distances and
# post-processing for torch fp32, torch fp16 autocast, the foreground-token
# path, and ONNX Runtime CUDA / TensorRT (portable graph) where installed.
#
# Time on one H200, estimated (no GPU has run this yet): about 5 minutes.
#   build (nvcc for sm_80 and sm_90, C++ for 4 ISAs, 16 cores)        ~60-90 s
#   kernel tests, cuda kernel required                               ~30-60 s
#   kernel stages (10 repeats, 1.9 GB fp32 bank; 64x400 k-center)    ~30 s
#   cuda_e2e, engines not started within --e2e-budget 120 s skipped  <= 120 s
#     ViT-B/14 at 784 px: 3137 tokens, ~0.9 TFLOP an image (0.53 in the
#     linear layers, 2*86M*3137; 0.36 in attention, 12*4*3137^2*768): at
#     ~35 TFLOP/s fp32 (torch leaves TF32 off) ~26 ms, fp16 autocast ~4 ms.
#     ViT-S/14 at 448 px: ~62 GFLOP, ~2 ms fp32.  The CPU side (align into
#     the 784 px frame, resize, post-processing, a 77 MB query upload per
#     batch of 8) adds ~20 ms an image.  Fits, two per model (all tokens,
#     foreground) on 200 parts with torch fp32: ViT-B 2 x 200 x ~45 ms + the
#     1.9 GB bank ~ 22 s, ViT-S ~ 8 s.  Torch engines (fp32, fp16,
#     foreground) x 2 models: set-up ~3 s + 36 parts x <= 45 ms each, ~30 s.
#     So the torch rows are in after ~60 s.  The ONNX Runtime rows come last
#     (onnxruntime-gpu only) and start only with >= 60 s of budget left: an
#     export of ViT-B at 784 px is ~30-60 s on the CPU and a TensorRT engine
#     build 1-2 min; what the budget leaves out is a row saying so, and at
#     most one build runs past the budget.  Each engine's timed predict
#     stops after 15 s.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (or DINOPATCH_GPU_OUT=OUT_DIR)
#
# OUT_DIR (default ./gpu_check_out) receives gpu_check.log (everything
# printed), build.log, test_kernels.xml and gpu_check.json (every figure).
# Extra bench options: DINOPATCH_GPU_BENCH_ARGS="--peak-gbs 3350" (H100).
# Needs on the machine: a Python 3.10+ with DinoPatch's dependencies (torch
# with CUDA, timm, safetensors, OpenCV), pybind11, pytest and hypothesis;
# onnxruntime-gpu for the ONNX Runtime rows; CMake >= 3.18 and a CUDA
# toolkit; no network.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${DINOPATCH_GPU_OUT:-gpu_check_out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/gpu_check.log") 2>&1
fail() { echo "gpu_check: FAILED: $*"; exit 1; }
date -u

PY="$(command -v python3 || command -v python || true)"
[ -n "$PY" ] || fail "no python3 or python on PATH"
"$PY" - <<'PY' || fail "this Python cannot run the check (see above)"
import importlib.util, sys
assert sys.version_info >= (3, 10), f"Python 3.10+ needed, this is {sys.version}"
missing = [m for m in ("numpy", "pybind11", "pytest", "hypothesis", "torch", "timm", "safetensors", "cv2")
           if importlib.util.find_spec(m) is None]
assert not missing, f"missing Python packages: {missing}"
PY
echo "python: $PY ($("$PY" --version 2>&1))"

# CMake finds nvcc only on PATH; CUDA installs often leave it off.
if ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
command -v nvcc >/dev/null || fail "no nvcc on PATH or in /usr/local/cuda*/bin"
CMAKE="$(command -v cmake || true)"
[ -n "$CMAKE" ] || fail "no cmake on PATH (pip install cmake, or the distribution's)"
nvidia-smi -L || fail "nvidia-smi sees no GPU"
nvcc --version | tail -1

# CMake directly, not setup.py: pyproject's licence field needs setuptools >= 77.
echo "building into dinopatch/ (log: $OUT/build.log)"
{
  "$CMAKE" -S . -B build/gpu_check -DCMAKE_BUILD_TYPE=Release -DDINOPATCH_CUDA=ON \
    -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/dinopatch" -DDINOPATCH_VERSION_INFO=gpu-check &&
  "$CMAKE" --build build/gpu_check -j "$(nproc)"
} > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; fail "build (see build.log)"; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "from dinopatch import _C_cuda as c; n = c.device_count(); assert n > 0, 'the CUDA runtime sees no device'; print(n, 'device(s):', c.device_name(0))" \
  || fail "dinopatch._C_cuda does not see a device"

# Every parity test on every kernel, cuda among them, and device-resident
# queries from torch (DLPack) against the host path; DINOPATCH_REQUIRE_CUDA
# turns the CUDA tests' skips into failures.
DINOPATCH_REQUIRE_CUDA=1 "$PY" -m pytest tests/test_kernels.py tests/test_bank.py tests/test_cuda_queries.py \
  -q -rs -p no:cacheprovider \
  --junitxml "$OUT/test_kernels.xml" || fail "kernel tests"

# shellcheck disable=SC2086  # the extra arguments are meant to split
"$PY" -m dinopatch.bench cuda --strict --repeats 10 --bank 200 --e2e-budget 120 --json "$OUT/gpu_check.json" \
  ${DINOPATCH_GPU_BENCH_ARGS:-} \
  || fail "bench cuda group (a required check failed, see the targets table)"
echo "gpu_check: OK; figures in $OUT/gpu_check.json"
date -u
