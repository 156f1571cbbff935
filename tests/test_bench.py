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
