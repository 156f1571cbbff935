"""The GPU check script cannot rot: its bench command runs here as a CPU dry run.

``benchmarks/gpu_check.sh`` calls ``python -m dinopatch.bench cuda ...``; this
test takes that exact command line from the script, adds the dry-run options
(the cpp kernel at small sizes) and runs it through the same stages, which
then must pass their required checks.  The shell around it is syntax-checked.
"""
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from dinopatch import bench

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
# The cpp kernel at small sizes; end to end ViT-S/14 at 112 px on 4 bank parts, batches of 4.
DRY_RUN = ["--kernel", "cpp", "--quick", "--size", "64,20,32", "--repeats", "1", "--image-size", "112", "--bank", "4",
           "--batch", "4"]


def script_bench_argv(json_path: str) -> list[str]:
    """The script's bench arguments, its output folder replaced by ``json_path``'s."""
    line = next(ln for ln in SCRIPT.read_text().splitlines() if "-m dinopatch.bench" in ln)
    argv = shlex.split(line.split("-m dinopatch.bench", 1)[1].split("${", 1)[0].replace("\\", ""))
    return [json_path if a == "$OUT/gpu_check.json" else a for a in argv]


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], check=True)


def test_script_requires_what_it_promises():
    text = SCRIPT.read_text()
    assert re.search(r"command -v python3 \|\| command -v python", text)
    assert "/usr/local/cuda/bin" in text and "nvidia-smi -L || fail" in text
    assert "setup.py" not in text.replace("not setup.py", "")  # built with CMake directly
    assert "DINOPATCH_REQUIRE_CUDA=1" in text and "tests/test_kernels.py" in text
    assert "-m cuda" not in text  # the whole module, not the 8 CUDA-only tests


def test_the_scripts_bench_command_as_a_cpu_dry_run(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    argv = script_bench_argv(str(out))
    assert argv[0] == "cuda" and "--strict" in argv and str(out) in argv
    assert bench.main(argv + DRY_RUN) == 0
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if r["stage"] == "cuda_min_distance"]
    assert {(r["dtype"], r["batch"], r["radius"]) for r in timed} == {
        (d, b, r) for d in ("fp32", "fp16") for b in (1, 4) for r in (0, 1)
    }
    assert all(r["method"] == "cpp" and r["ms_call"] > 0 and r["ms_kernel"] is None for r in timed)
    checks = {r["method"]: r for r in rows if r["stage"] == "target" and r["required"]}
    assert all(r["met"] for r in checks.values()), [m for m, r in checks.items() if not r["met"]]
    assert "cpp k-center indices equal to numpy's (fraction)" in checks
    assert [r["stage"] for r in rows if r["stage"].startswith("cuda_")].count("cuda_bandwidth") == 1
    assert "cuda_kcenter" in capsys.readouterr().out
    e2e = {r["method"].split(", ", 1)[1]: r for r in rows if r["stage"] == "cuda_e2e"}
    assert all(r["method"].startswith("dinov2_vits14 112px, ") for r in rows if r["stage"] == "cuda_e2e")
    trt = "onnxruntime TensorrtExecutionProvider, portable graph"
    assert e2e.pop(trt)["note"].startswith("skipped: TensorRT runs on a GPU only")
    ran = {"torch fp32", "torch fp16 autocast", "onnxruntime CPUExecutionProvider"}
    assert ran < set(e2e) and len(e2e) == 4 and next(m for m in e2e if m not in ran).startswith("foreground tokens")
    for method, r in e2e.items():
        split = [r[f"ms_{k}"] for k in ("align", "backbone", "distances", "post")]
        assert min(split) > 0 and r["ms_per_image"] == pytest.approx(sum(split)), method
        assert r["images_s"] == pytest.approx(1e3 / r["ms_per_image"]) and 0 <= r["auroc"] <= 1, method
        assert r["note"].startswith("6 of 6 test parts") and r["provider"] in ("cpu", "CPUExecutionProvider")
        assert checks[f"dinov2_vits14 112px, {method}: runs on {r['provider']}"]["measured"] == 1
    assert len(checks) == 9 + 4  # the kernel checks, and one per engine that ran


def test_an_engine_on_another_provider_than_asked_fails_the_strict_run(tmp_path, monkeypatch):
    """ONNX Runtime asked for CUDA but landing on the CPU must fail ``--strict``, not pass as a CPU figure."""
    from dinopatch.bench.stages import cuda_e2e

    plans = cuda_e2e.engine_plans

    def onnx_asked_on_cuda(device, batch, common, folder):  # and torch fp32: the stage fits with it
        torch, _, onnx, _ = plans(device, batch, common, folder)
        return [torch, (onnx[0], "CUDAExecutionProvider", onnx[2])]

    monkeypatch.setattr(cuda_e2e, "engine_plans", onnx_asked_on_cuda)
    out = tmp_path / "run.json"
    argv = ["cuda_e2e", "--strict", "--json", str(out)] + DRY_RUN
    assert bench.main(argv) == 1
    failed = [r["method"] for r in json.loads(out.read_text())["rows"] if r.get("required") and not r["met"]]
    assert failed == ["dinov2_vits14 112px, onnxruntime CPUExecutionProvider: runs on CUDAExecutionProvider"]


def test_cuda_kernel_without_a_device_fails_loudly(monkeypatch):
    from dinopatch import kernels
    from dinopatch.bench.stages import cuda

    monkeypatch.setattr(kernels, "_cuda", lambda: None)
    monkeypatch.setattr(cuda, "_RUNNERS", {})
    with pytest.raises(RuntimeError, match="sees no device"):
        bench.main(["cuda_bandwidth", "--kernel", "cuda", "--size", "4,2,2"])
