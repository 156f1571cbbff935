"""The harder synthetic benchmark: its sets (benchmark_sets) and its run (benchmark_quality)."""

import json

import numpy as np
import pytest
from conftest import FAST

from dinopatch import benchmark_quality, benchmark_sets
from dinopatch.cli import main


def test_benchmark_sets_are_deterministic_with_masks_where_the_defects_are():
    a = benchmark_sets.make_set("circuit", n_train=2, n_test_good=1, n_test_defect=1, size=96, seed=3)
    b = benchmark_sets.make_set("circuit", n_train=2, n_test_good=1, n_test_defect=1, size=96, seed=3)
    c = benchmark_sets.make_set("circuit", n_train=2, n_test_good=1, n_test_defect=1, size=96, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a["train"] + a["test"], b["train"] + b["test"]))
    assert not np.array_equal(a["train"][0], c["train"][0])  # the seed matters
    assert a["defects"] == ["good", *benchmark_sets.DEFECTS["circuit"]]
    assert not a["masks"][0].any() and all(m.any() and m.mean() < 0.05 for m in a["masks"][1:])


def test_training_images_do_not_depend_on_the_test_counts():
    a = benchmark_sets.make_set("weave", n_train=2, n_test_good=1, n_test_defect=1, size=64)
    b = benchmark_sets.make_set("weave", n_train=2, n_test_good=3, n_test_defect=2, size=64)
    assert all(np.array_equal(x, y) for x, y in zip(a["train"], b["train"]))


@pytest.mark.parametrize("category", benchmark_sets.CATEGORIES)
def test_every_defect_renders_a_visible_change_inside_its_mask(category):
    for defect in benchmark_sets.DEFECTS[category]:
        good, _ = benchmark_sets._RENDER[category](np.random.default_rng(7), 128, defect="good")
        bad, mask = benchmark_sets._RENDER[category](np.random.default_rng(7), 128, defect=defect)
        diff = np.abs(good.astype(int) - bad).max(-1)
        assert bad.shape == (128, 128, 3) and bad.dtype == np.uint8 and mask.dtype == np.uint8
        assert mask.any(), defect
        assert diff[mask > 0].mean() > 3 * diff[mask == 0].mean(), defect  # the change is where the mask says


def test_benchmark_rejects_unknown_names_and_tiny_images():
    with pytest.raises(ValueError, match="unknown category"):
        benchmark_sets.make_set("pasta")
    with pytest.raises(ValueError, match="has no defect"):
        benchmark_sets.render_weave(np.random.default_rng(0), defect="crack")
    with pytest.raises(ValueError, match="size >= 64"):
        benchmark_sets.render_comb(np.random.default_rng(0), size=32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(params={"tolerence": 0}), "unknown detector parameter"),
    (dict(params={"align": False}), "align is set per category"),
    (dict(n_test_defect=0), "n_test_defect must be at least 1"),
    (dict(categories=("circuit", "pasta")), "unknown category"),
    (dict(params={"image_size": 100}), "multiple of 14"),
    (dict(params={"tolerance": -1}), "tolerance"),
])
def test_run_refuses_bad_input_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark_quality.run(**{"params": {}, **kwargs}, progress=None)


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "q.json"
    args = "--size 112 --categories circuit --n-train 3 --n-test-good 2 --n-test-defect 1 -p engine='torch'"
    assert main(["benchmark-quality", "--weights", FAST["weights"], *args.split(), "-p", "tolerance=0",
                 "-o", str(out)]) == 0
    return out


def test_benchmark_command_writes_its_report(report_file):
    report = json.loads(report_file.read_text())
    m = report["categories"]["circuit"]
    assert set(report["categories"]) == {"circuit"}
    assert set(m["per_defect"]) == set(benchmark_sets.DEFECTS["circuit"])
    assert 0 <= m["image_auroc"] <= 1 and 0 <= m["pixel_auroc"] <= 1 and 0 <= m["aupro"] <= 1
    assert m["n_test"] == 5 and m["n_train"] == 3
    assert report["params"]["tolerance"] == "0" and report["params"]["image_size"] == "112"
    assert report["mean_image_auroc"] == m["image_auroc"]
    # The line's numbers at the model's own threshold, overall and per defect.
    assert (m["n_good"], m["n_defect"]) == (2, 3) and 0 <= m["good_rejected"] <= 2
    assert m["defects_caught"] == sum(v["defects_caught"] for v in m["per_defect"].values())
    assert report["mean_recall"] == m["defects_caught"] / 3 and report["good_rejected"] == m["good_rejected"]
    assert m["threshold_source"].startswith("false-alarm rate <= 0.25 for parts like the 3 good parts")
    assert 0 <= m["aupro_05"] <= 1 and 0 <= m["seg_f1"] <= 1


def test_benchmark_table_fits_100_columns_and_shows_the_counts(report_file, capsys):
    report = json.loads(report_file.read_text())
    table = benchmark_quality.format_table(report)
    m = report["categories"]["circuit"]
    assert max(map(len, table.splitlines())) <= 100
    assert f"{m['defects_caught']}/3" in table and f"{m['good_rejected']}/2" in table


def test_few_shot_protocol_says_one_image_cannot_be_calibrated(tmp_path, capsys):
    out = tmp_path / "few.json"
    args = "--size 112 --categories circuit --n-test-good 2 --n-test-defect 1 -p engine='torch' -p tolerance=0"
    assert main(["benchmark-quality", "--weights", FAST["weights"], *args.split(), "--few-shot", "2", "1",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["shots"] == [1, 2]
    one, two = report["few_shot"]["circuit"]["1"], report["few_shot"]["circuit"]["2"]
    assert one["n_train"] == 1 and one["defects_caught"] is None and one["seg_f1"] is None
    assert "no threshold" in one["note"]
    assert 0 <= one["image_auroc"] <= 1 and two["n_train"] == 2 and two["defects_caught"] is not None
    assert "1 good image: no threshold can be calibrated" in printed
    assert max(map(len, printed.splitlines())) <= 100
    # Seeded: the draw of good images is the same each run.
    again = benchmark_quality.run_few_shot({"weights": FAST["weights"], "engine": "torch", "tolerance": 0},
                                           categories=("circuit",), shots=(2,), size=112, n_test_good=2,
                                           n_test_defect=1, progress=None)
    assert again["few_shot"]["circuit"]["2"]["image_auroc"] == two["image_auroc"]


def test_benchmark_command_compares_runs(report_file, capsys):
    m = json.loads(report_file.read_text())["categories"]["circuit"]
    assert main(["benchmark-quality", "--compare", f"one={report_file}", f"two={report_file}"]) == 0
    table = capsys.readouterr().out
    cell = f"{m['image_auroc']:>9.3f}{m['pixel_auroc']:>9.3f}"
    assert f"{'one':>18}{'two':>18}" in table.splitlines()[0]
    assert f"circuit{' ' * 17}{cell}{cell}" in table
    assert all(f"  {d}" in table for d in benchmark_sets.DEFECTS["circuit"])


def test_benchmark_command_mistakes_are_one_line(tmp_path, capsys):
    not_json = tmp_path / "x.json"
    not_json.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    for argv, message in [
        (["--compare", str(not_json)], "is not JSON"),
        (["--compare", str(other)], "is not a benchmark-quality report"),
        (["--compare", str(tmp_path / "missing.json")], "No such file"),
        (["-p", "weights='random'"], "--weights"),
        (["-p", "nonsense"], "expected NAME=VALUE"),
        (["--n-train", "0"], "outside"),
        (["-o", str(not_json)], "exists; pass --force"),
    ]:
        try:
            code = main(["benchmark-quality", *argv])
        except SystemExit as e:  # flags are checked by argparse, which exits
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("dinopatch: error:") and message in err and len(err.splitlines()) == 1, err
