"""DINOPATCH_CPU: the package runs as on a lesser CPU, and refuses what it cannot take away.

The in-process tests give :mod:`dinopatch.cpu` a made-up /proc/cpuinfo, so
they hold on any machine; the subprocess tests start a fresh interpreter with
the variable set, as a user would, and need a CPU with AVX2.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dinopatch import cpu, engine_choice, kernels

FULL = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl",
                  "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8"})
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
has_avx2 = pytest.mark.skipif(kernels._C is None or not {"avx2", "fma", "f16c"} <= cpu._cpuinfo()[1],
                              reason="needs a CPU with AVX2 and the built cpp kernel")


@pytest.fixture
def machine(monkeypatch):
    """Set the CPU's flags and DINOPATCH_CPU (None: unset)."""
    def set_to(found, level):
        monkeypatch.setattr(cpu, "_cpuinfo", lambda: ("Test CPU", found))
        if level is None:
            monkeypatch.delenv(cpu.VARIABLE, raising=False)
        else:
            monkeypatch.setenv(cpu.VARIABLE, level)
    return set_to


def test_unset_keeps_the_machines_flags(machine):
    machine(FULL, None)
    assert cpu.level() is None and cpu.flags() == FULL and cpu.kernel_isa() is None
    machine(FULL, " ")
    assert cpu.level() is None


def test_avx2_takes_away_avx512_vnni_bf16_and_amx(machine):
    machine(FULL, "AVX2")
    assert cpu.level() == "avx2" and cpu.kernel_isa() == "avx2"
    assert cpu.flags() == AVX2_ONLY


def test_avx512_keeps_the_core_and_takes_away_vnni_bf16_and_amx(machine):
    machine(FULL, "avx512")
    assert cpu.flags() == AVX2_ONLY | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert cpu.kernel_isa() == "avx512"


def test_unknown_values_and_missing_features_are_errors(machine):
    machine(FULL, "sse9")
    with pytest.raises(ValueError, match="DINOPATCH_CPU='sse9' is not a CPU level; choose one of avx2, avx512"):
        cpu.level()
    machine(AVX2_ONLY, "avx512")
    with pytest.raises(ValueError, match="asks for avx512f, avx512cd.*lacks: the override can only take"):
        cpu.level()
    machine(AVX2_ONLY, "avx2")
    assert cpu.level() == "avx2"
    machine(frozenset({"sse4_2"}), "avx2")
    with pytest.raises(ValueError, match="asks for avx2, fma, f16c"):
        cpu.flags()


def test_the_engine_choice_fingerprint_follows_the_level(machine):
    """A choice measured on the full CPU is kept under another fingerprint from one made under the override."""
    machine(FULL, None)
    full = engine_choice.machine()
    machine(FULL, "avx2")
    avx2 = engine_choice.machine()
    machine(FULL, "avx512")
    avx512 = engine_choice.machine()
    machine(AVX2_ONLY, None)
    native_avx2 = engine_choice.machine()
    assert len({full, avx2, avx512, native_avx2}) == 4
    machine(FULL, None)
    assert engine_choice.machine() == full


def test_bf16_is_neither_a_candidate_nor_auto_under_the_override(monkeypatch):
    pytest.importorskip("openvino")
    from dinopatch.backbone import auto_engine, cpu_has_bf16, engines, make_backbone

    monkeypatch.setenv(cpu.VARIABLE, "avx2")
    monkeypatch.setattr(engines, "installed", lambda module: module in {"openvino", "onnxruntime"})
    assert not cpu_has_bf16()
    assert auto_engine("cpu") == "onnx"
    assert engine_choice.skip_reason("openvino:bf16") == "the CPU has neither AVX512-BF16 nor AMX"
    with pytest.raises(ValueError, match="AVX512-BF16 or AMX"):
        make_backbone("openvino:bf16", name="dinov2_vits14", weights="random", image_size=112)


@has_avx2
def test_the_kernel_isa_is_capped_in_process(monkeypatch):
    monkeypatch.setenv(cpu.VARIABLE, "avx2")
    assert kernels.isas() == ["avx2", "generic"]
    for above in {"avx512", "avx512bf16"} & set(kernels._C.isas()):
        with pytest.raises(ValueError, match="beyond DINOPATCH_CPU=avx2"):
            kernels.set_isa(above)


PROBE = textwrap.dedent("""
    import json, os, warnings
    warnings.simplefilter("always")
    import numpy as np
    from dinopatch import kernels
    import numba, openvino as ov, torch
    from openvino import opset13 as ops
    # One convolution through OpenVINO's CPU plugin: which oneDNN kernel it compiled to.
    p = ops.parameter([1, 32, 16, 16], np.float32)
    conv = ops.convolution(p, ops.constant(np.ones((32, 32, 3, 3), np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])
    compiled = ov.Core().compile_model(ov.Model([conv], [p]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    info = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
    kinds = [i["primitiveType"].astype(str) for i in info if i["layerType"].astype(str) == "Convolution"]
    dot = numba.njit(fastmath=True)(lambda a: (a * a).sum())
    dot(np.ones(1024, np.float32))
    numba_avx512 = "zmm" in dot.inspect_asm(dot.signatures[0])
    print(json.dumps({"numba_avx512": numba_avx512, "isa": kernels.isa(), "isas": kernels.isas(),
                      "aten": torch.backends.cpu.get_cpu_capability(), "openvino": kinds,
                      "env": {k: os.environ.get(k) for k in %r}}))
""" % (tuple(cpu.LEVELS["avx2"].environment),))


def _run(code: str, level: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in cpu.LEVELS["avx2"].environment}
    return subprocess.run([sys.executable, "-c", code], env=dict(env, DINOPATCH_CPU=level), capture_output=True,
                          text=True, timeout=300)


@has_avx2
def test_a_fresh_process_runs_every_library_at_the_level():
    """The cpp kernel, torch's ATen, oneDNN in OpenVINO's CPU plugin and numba's code all stay at AVX2."""
    for library in ("openvino", "torch", "numba"):
        pytest.importorskip(library)
    done = _run(PROBE, "avx2")
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["isa"] == "avx2" and seen["isas"] == ["avx2", "generic"]
    assert seen["aten"] == "AVX2"
    assert seen["openvino"] and all("avx512" not in k and "amx" not in k for k in seen["openvino"]), seen
    assert not seen["numba_avx512"]
    assert seen["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                           "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}


def test_a_bad_value_stops_the_import_with_the_reason():
    done = _run("import dinopatch", "avx3")
    assert done.returncode != 0
    assert "ValueError: DINOPATCH_CPU='avx3' is not a CPU level" in done.stderr


@has_avx2
def test_a_library_loaded_before_dinopatch_is_warned_about():
    pytest.importorskip("torch")
    done = _run("import torch, dinopatch", "avx2")
    assert done.returncode == 0 and "torch loaded before dinopatch" in done.stderr, done.stderr[-2000:]


def test_the_bench_report_names_the_level(machine):
    from dinopatch.bench import report

    machine(FULL, "avx2")
    hw = report.hardware()
    assert hw["cpu"] == "Test CPU" and hw["cpu_level"] == "avx2"
    text = report.show({"hardware": hw, "versions": {}, "rows": [], "load_avg_after": (0.0,)})
    assert text.startswith("Test CPU as DINOPATCH_CPU=avx2, ")
    machine(FULL, None)
    assert "cpu_level" not in report.hardware()
