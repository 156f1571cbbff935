"""The bench command: registry, table, and one small run of every stage held to the schema in docs/benchmarks.md.

Timings are not checked (they depend on the machine); what each stage must
have run is: every method it names, with correct distances where it reports
them, and its targets.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dinopatch import bench, kernels
from dinopatch.bench import report

BENCHMARKS_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def readme_schema() -> dict[str, set[str]]:
    """``stage -> keys`` from the table of row keys in docs/benchmarks.md."""
    text = BENCHMARKS_DOC.read_text()
    schema = {}
    for line in text[text.index("## Running the bench") : text.index("## Engines")].splitlines():
        m = re.match(r"\| `(\w+)` \| (`.*`) \|$", line)
        if m:
            schema[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return schema


def test_registry_and_groups():
    assert bench.GROUPS["kernels"] == ["bandwidth", "min_distance", "coreset"]
    assert bench.GROUPS["cuda"] == ["cuda_bandwidth", "cuda_min_distance", "cuda_kcenter", "cuda_e2e"]
    assert bench.GROUPS["scale"] == ["serve"]
    assert set(bench.GROUPS["pipeline"]) == {"align", "backbone", "post", "e2e", "stream", "foreground"}
    assert set(readme_schema()) == set(bench.STAGES) | {"target"}


def test_stage_decorator_registers_one_function(monkeypatch):
    monkeypatch.setattr(bench.registry, "STAGES", dict(bench.STAGES))
    monkeypatch.setattr(bench.registry, "GROUPS", {k: list(v) for k, v in bench.GROUPS.items()})

    @bench.stage("toy", groups=("e2e",))
    def toy(args):
        return [{"stage": "toy", "method": "x", "ms_per_image": 1.0}]

    assert bench.registry.STAGES["toy"] is toy and bench.registry.GROUPS["e2e"] == ["toy"]


def test_paired_ratio_pairs_each_round():
    # A round taken at a high load slows both alike: the pairs say 2x, the medians 4x.
    times = {"slow": [2.0, 10.0, 4.0], "fast": [1.0, 5.0, 1.0]}
    assert bench.registry.paired_ratio(times, "slow", "fast") == 2.0
    assert bench.registry.paired_ratio(times, "fast", "fast") == 1.0


def test_table_aligns_and_skips_empty_columns():
    rows = [
        {"stage": "a", "method": "m", "ms_per_image": 1.23456, "rel_err": None},
        {"stage": "bb", "method": "mm"},
    ]
    lines = report.format_table(rows, report.COLUMNS).splitlines()
    assert lines[0].split() == ["method", "ms_per_image"]
    assert "1.235" in lines[2] and len(lines) == 4


def _realistic_report() -> dict:
    """A report shaped like a --quick run's: long method names and notes, many columns per stage."""
    e2e = ["defaults: predict (OpenVinoBackbone, kernel cpp, foreground auto)",
           "reference: predict (OnnxBackbone fp32, foreground False)", "notebook (torch per image, numpy distances)"]
    rows = [{"stage": "e2e", "method": m, "batch": 6, "ms_per_image": 28.1 * (i + 1), "ms_p50": 28.0, "ms_p95": 28.2,
             "ms_p99": 28.2, "images_s": 35.58, "peak_rss_mib": 1903, "note": "batch_size 8; 12 good screws in "
             "the bank; image AUROC 1.000, pixel AUROC 0.834; tokens kept 33% on good, 35% on defective screws"}
            for i, m in enumerate(e2e)]
    rows += [{"stage": "min_distance", "method": f"cpp[{isa}]", "dtype": dtype, "batch": batch, "ms_per_image": 2.575,
              "ms_median": 2.613, "GB_s": 30.5, "GFLOP_s": 15.3, "roofline": 2.8, "rel_err": 7.1e-08,
              "exact_match": 0.0, "note": "numba has no fp16 dot product: it widens every row" if dtype == "fp16"
              else None} for isa in ("avx512bf16", "avx512", "avx2") for dtype in ("fp32", "fp16") for batch in (1, 16)]
    rows += [{"stage": "backbone", "method": e, "batch": 1, "ms_per_image": 56.2, "ms_per_image_min": 55.0,
              "vs_torch": 2.39, "note": "dinov2_vits14 at 224 px, 2 threads, median of 5 rounds, round-robin"}
             for e in ("torch", "onnx", "onnx:int8", "openvino:fp32", "openvino:bf16")]
    rows += [{"stage": "cuda_e2e", "method": "ViT-B/14 784 px, onnx:fp16 on TensorRT, foreground tokens", "batch": 8,
              "ms_per_image": 3.1, "images_s": 322.5, "ms_align": 0.81, "ms_backbone": 1.92, "ms_distances": 0.22,
              "ms_post": 0.15, "auroc": 1.0, "provider": "TensorrtExecutionProvider", "setup_s": 41.2, "note": None}]
    rows += [{"stage": "target", "method": "end-to-end predict, defaults over the reference configuration",
              "target": ">= 3", "measured": 3.22, "met": True, "required": False}]
    versions = {"python": "3.11.7", "numpy": "2.4.6", "numba": "0.68.1", "torch": "2.14.1+cu130",
                "onnxruntime": "1.32.0", "dinopatch._C isa": "avx512bf16"}
    return {"hardware": {"cpu": "AMD EPYC 9654 96-Core Processor", "cpus": 2, "load_avg": (0.29, 0.3, 0.3)},
            "versions": versions, "rows": rows, "load_avg_after": (2.3, 1.0, 1.0)}


def test_printed_report_fits_100_columns_and_keeps_every_value():
    text = report.show(_realistic_report())
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    for stage in ("e2e", "min_distance", "backbone", "cuda_e2e", "targets"):
        assert f"== {stage} ==" in lines
    # Nothing is cut: every column, every note and the long method names (wrapped) are there.
    for word in ("peak_rss_mib", "exact_match", "TensorrtExecutionProvider", "setup_s", "widens every row",
                 "35% on defective screws", "foreground auto)", "avx512bf16"):
        assert word in text, word
    # A note every row of a stage shares is printed once.
    assert text.count("median of 5 rounds") == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["nope"], "unknown stage 'nope'"),
        (["--size", "3,4"], "--size takes"),
        (["--repeats", "0"], "--repeats must be"),
    ],
)
def test_bad_arguments_are_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Every stage once, small: kernels at L=64 K=20 D=32, pipeline at 112 px, the cuda group on cpp."""
    out = tmp_path_factory.mktemp("bench") / "run.json"
    argv = [
        "kernels",
        "pipeline",
        "cuda",
        "--quick",
        "--repeats",
        "1",
        "--size",
        "64,20,32",
        "--engine",
        "torch",
        "--engines",
        "torch",
        "--image-size",
        "112",
        "--bank",
        "4",
        "--batch",
        "2",
        "--kernel",
        "cpp",
        "--strict",
        "--json",
        str(out),
    ]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_every_row_has_the_readme_keys_and_every_stage_ran(run):
    assert {"hardware", "versions", "args", "rows", "load_avg_after"} <= set(run)
    schema = readme_schema()
    stages = {r["stage"] for r in run["rows"]}
    # `serve` starts Ray and an HTTP service: tests/test_serve.py covers the service, the stage runs when named.
    assert stages == set(schema) - {"serve"}, (set(schema) - {"serve"}) ^ stages
    for row in run["rows"]:
        assert set(row) == schema[row["stage"]], (row["stage"], set(row) ^ schema[row["stage"]])
    assert max(len(line) for line in report.show(run).splitlines()) <= 100


def test_kernel_stages_ran_every_method_exactly(run):
    rows = [r for r in run["rows"] if r["stage"] == "min_distance"]
    ours = [b for b in kernels.available() if b not in ("numpy", "cuda")]
    names = {r["method"] for r in rows}
    # Every instruction set of this CPU at its DINOPATCH_CPU level, and none beyond it.
    assert {f"cpp[{i}]" for i in kernels.isas() if i != "generic"} == {n for n in names if n.startswith("cpp[")}
    assert "numpy-gemm" in names
    assert ("numba" in names) == ("numba" in ours)
    assert {(r["dtype"], r["batch"]) for r in rows} == {(d, b) for d in ("fp32", "fp16") for b in (1, 16)}
    for r in rows:
        if not r["method"].startswith(("numpy-gemm", "torch.cdist", "faiss")):  # GEMM expansions are inexact
            assert r["exact_match"] == 0, r
            assert r["rel_err"] is None if r["dtype"] == "fp16" else r["rel_err"] <= 1e-4, r
    coreset = {r["method"]: r for r in run["rows"] if r["stage"] == "coreset"}
    assert "numpy" in coreset and coreset["numpy"]["speedup_vs_numpy"] == 1
    bw = [r for r in run["rows"] if r["stage"] == "bandwidth"]
    assert len(bw) == 1 and bw[0]["GB_s"] > 0


def test_pipeline_stages_ran(run):
    by = {}
    for r in run["rows"]:
        by.setdefault(r["stage"], []).append(r)
    assert [r["method"] for r in by["backbone"]] == ["torch", "torch"] and by["backbone"][0]["vs_torch"] == 1
    ours, reference, notebook, in_turn, files, files_in_turn = by["e2e"]
    assert [in_turn["method"], files["method"], files_in_turn["method"]] == [
        "defaults on arrays, overlap off", "defaults on PNG files: predict", "defaults on PNG files, overlap off"]
    assert re.search(r"overlap on is [\d.]+x this \(rounds: [\d.]+", in_turn["note"]), in_turn["note"]
    assert ours["method"].startswith("defaults: predict (TorchBackbone") and "foreground auto" in ours["method"]
    assert reference["method"] == "reference: predict (OnnxBackbone fp32, foreground False)"
    assert "notebook" in notebook["method"] and all(r["batch"] == 6 for r in by["e2e"])  # good x2 + 4 defects
    for row in (ours, reference):
        image, pixel, tokens = re.search(r"image AUROC ([\d.]+), pixel AUROC ([\d.]+), (\d+)% of the tokens",
                                         row["note"]).groups()
        assert 0 <= float(image) <= 1 and 0 <= float(pixel) <= 1 and 0 < int(tokens) <= 100
        # The line's numbers at the model's own threshold: 4 defective screws and 2 good ones.
        counts = re.search(r"at its threshold (\d+) of 4 defects caught, (\d+) of 2 good rejected", row["note"])
        assert counts and int(counts[1]) <= 4 and int(counts[2]) <= 2, row["note"]
    assert reference["note"].count("100% of the tokens") == 1
    assert len(by["stream"]) == 3 and all(r["ms_p99"] >= r["ms_p50"] for r in by["stream"])
    same = [r for r in by["target"] if r["method"] == "largest score difference, overlap on minus off"]
    assert len(same) == 1 and same[0]["met"] and same[0]["required"]
    targets = {r["method"] for r in by["target"]}
    assert {"end-to-end score deviation / score spread", "coreset cpp speed-up over numpy",
            "end-to-end predict, defaults over the reference configuration",
            "image AUROC, reference minus defaults"} <= targets


def test_cuda_group_dry_run_checked_parity_zeros_and_kcenter(run):
    rows = [r for r in run["rows"] if r["stage"] == "cuda_min_distance"]
    assert {(r["dtype"], r["batch"], r["radius"]) for r in rows} == {
        (d, b, r) for d in ("fp32", "fp16") for b in (1, 4) for r in (0, 1)
    }
    checks = [r for r in run["rows"] if r["stage"] == "target" and r["required"]
              and "overlap" not in r["method"]]  # the e2e stage's: test_pipeline_stages_ran
    assert all(r["met"] for r in checks)
    # 2 dtypes x 2 tolerances x (parity, zeros) + k-center; cuda_e2e checks each engine's device (test_gpu_check.py)
    assert len([r for r in checks if ": runs on " not in r["method"]]) == 9


def test_strict_fails_on_an_unmet_required_check(monkeypatch, capsys):
    monkeypatch.setitem(
        bench.registry.STAGES,
        "bandwidth",
        lambda args: [bench.registry.target("always wrong", "== 0", 1.0, lambda v: v == 0, required=True)],
    )
    assert bench.main(["bandwidth", "--repeats", "1"]) == 0
    assert bench.main(["bandwidth", "--repeats", "1", "--strict"]) == 1
    assert "FAILED required checks: ['always wrong']" in capsys.readouterr().out


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, (1 << 20) + 5])
def test_bandwidth_probe_reads_every_element(n):
    """The probe's sum is exact on small integers: no element skipped or read twice, on any split."""
    from dinopatch import _bench_C

    x = np.random.default_rng(n).integers(0, 4, n).astype(np.float32)
    assert _bench_C.stream_read(x) == float(x.sum(dtype=np.float64))
    assert _bench_C.stream_read(x[1:]) == float(x[1:].sum(dtype=np.float64))  # unaligned start


def test_backbone_engines_that_cannot_run_are_rows_saying_why(monkeypatch):
    import argparse
    import importlib.util

    from dinopatch.bench.stages import backbone

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    args = argparse.Namespace(quick=True, engines="torch,openvino:fp32", repeats=1, image_size=56,
                              backbone="dinov2_vits14")
    rows = backbone.bench_backbone(args)
    skipped = [r for r in rows if r["method"] == "openvino:fp32"]
    assert len(skipped) == 1 and skipped[0]["note"].startswith("skipped: openvino is not installed")
    assert skipped[0]["ms_per_image"] is None
    assert sorted(r["batch"] for r in rows if r["method"] == "torch") == [1, 2]
