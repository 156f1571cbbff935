"""The bench command's registry and report (the timings themselves are not tested)."""
import pytest

from dinopatch import bench


def test_registry_and_groups():
    assert {"min_distance", "coreset"} <= set(bench.STAGES)
    assert bench.GROUPS["kernels"] == ["min_distance", "coreset"]


def test_stage_decorator_registers_one_function(monkeypatch):
    monkeypatch.setattr(bench, "STAGES", dict(bench.STAGES))
    monkeypatch.setattr(bench, "GROUPS", {k: list(v) for k, v in bench.GROUPS.items()})

    @bench.stage("toy", groups=("e2e",))
    def toy(args):
        return [{"stage": "toy", "method": "x", "ms_per_image": 1.0}]

    assert bench.STAGES["toy"] is toy and bench.GROUPS["e2e"] == ["toy"]


def test_table_aligns_and_skips_empty_columns():
    rows = [{"stage": "a", "method": "m", "ms_per_image": 1.23456}, {"stage": "bb", "method": "mm"}]
    lines = bench.format_table(rows, bench.COLUMNS).splitlines()
    assert lines[0].split() == ["stage", "method", "ms_per_image"]
    assert "1.235" in lines[2] and len(lines) == 4


def test_unknown_stage_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["nope"])
    assert "unknown stage 'nope'" in capsys.readouterr().err


def test_pipeline_stages_write_the_documented_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert bench.main(["align", "post", "stream", "--quick", "--repeats", "1", "--engine", "torch",
                       "--image-size", "112", "--bank", "4", "--json", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    assert {"hardware", "versions", "args", "rows", "load_avg_after"} <= set(report)
    rows = {r["stage"]: r for r in report["rows"]}
    assert {"align", "post", "stream", "target"} <= set(rows)
    for key in ("ms_per_image", "ms_p50", "ms_p95", "ms_p99", "images_s", "peak_rss_mib"):
        assert rows["stream"][key] > 0, key
    assert rows["target"]["method"].startswith("streaming p99") and isinstance(rows["target"]["met"], bool)
    assert "stream" in capsys.readouterr().out
