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
DRY_RUN = ["--kernel", "cpp", "--quick", "--size", "64,20,32", "--repeats", "1"]


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
    assert len(checks) == 9 and all(r["met"] for r in checks.values())
    assert "cpp k-center indices equal to numpy's (fraction)" in checks
    assert [r["stage"] for r in rows if r["stage"].startswith("cuda_")].count("cuda_bandwidth") == 1
    assert "cuda_kcenter" in capsys.readouterr().out


def test_cuda_kernel_without_a_device_fails_loudly(monkeypatch):
    from dinopatch import kernels
    from dinopatch.bench.stages import cuda

    monkeypatch.setattr(kernels, "_cuda", lambda: None)
    monkeypatch.setattr(cuda, "_RUNNERS", {})
    with pytest.raises(RuntimeError, match="sees no device"):
        bench.main(["cuda_bandwidth", "--kernel", "cuda", "--size", "4,2,2"])
