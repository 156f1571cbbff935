"""The command line as a line engineer runs it: fit, evaluate, predict; mistakes; help."""
import argparse
import csv
import json
import shutil

import pytest
from conftest import BLOCKS_MATTER

from dinopatch import kernels
from dinopatch._version import __version__
from dinopatch.backbone import BACKBONES, ENGINES
from dinopatch.bank import MATCHES
from dinopatch.cli import EXIT_SOME_FAILED, build_parser, main
from dinopatch.modelfile import ModelFileError
from dinopatch.postprocess import SCORES
from dinopatch.synthetic import synthesize

DET = ["--weights", BLOCKS_MATTER, "--image-size", "112", "--engine", "torch"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """An MVTec root, a model fitted on it through the CLI, and a model tuned by evaluate through the CLI."""
    tmp = tmp_path_factory.mktemp("cli")
    root = synthesize("screw", tmp / "screw", n_train=5, n_test_good=2, n_test_defect=2, size=128, seed=0)
    assert main(["fit", str(root), "-o", str(tmp / "screw.npz"), *DET]) == 0
    assert main(["evaluate", str(root), "-m", str(tmp / "screw.npz"), "-o", str(tmp / "report"),
                 "--save-model", str(tmp / "tuned.npz")]) == 0
    return tmp, root


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_on_an_mvtec_root_trains_on_train_good_only(work):
    from dinopatch import DinoPatch

    tmp, root = work
    det = DinoPatch.load(tmp / "screw.npz")
    # Leave-one-out on the 5 train/good images, not on the 13 images below the root.
    assert det.threshold_.source == {"method": "leave-one-out", "images": 5, "false_alarm_rate": 0.0}


def test_predict_with_the_tuned_model_survives_bad_files(work, tmp_path, capsys):
    from dinopatch import DinoPatch

    tmp, root = work
    tuned = DinoPatch.load(tmp / "tuned.npz")
    assert tuned.threshold_.source["method"] == "evaluation"
    inputs = tmp_path / "line"
    (inputs / "cam1").mkdir(parents=True)
    (inputs / "cam2").mkdir()
    shutil.copy(root / "test" / "good" / "000.png", inputs / "cam1" / "000.png")
    shutil.copy(root / "test" / "missing_washer" / "000.png", inputs / "cam2" / "000.png")
    good = (root / "test" / "good" / "001.png").read_bytes()
    (inputs / "cam1" / "001.png").write_bytes(good[: len(good) // 2])  # truncated mid-transfer
    out = tmp_path / "out"

    code, stdout, stderr = run(["predict", inputs, "-m", tmp / "tuned.npz", "-o", out, "-q"], capsys)
    assert code == EXIT_SOME_FAILED
    assert "2 scored" in stdout and "1 failed" in stdout and "cam1/001.png" in stderr
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    names = ("cam1/000.png", "cam1/001.png", "cam2/000.png")
    assert [r["path"] for r in lines] == [str(inputs / n) for n in names]
    part, broken, defect = lines
    assert broken["score"] is None and "not a readable image" in broken["error"]
    assert part["error"] is None and defect["error"] is None
    assert part["score"] < part["threshold"] < defect["score"]
    assert defect["is_anomaly"] and not part["is_anomaly"]
    assert defect["defect_area_px"] > 0 and defect["defect_boxes"]
    for r in (part, defect):
        assert r["threshold_source"].startswith("tuned by evaluation") and r["model_id"] == tuned.model_id
        assert r["engine"] == "torch" and r["latency_ms"] > 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["path"] for r in rows] == [r["path"] for r in lines] and rows[0]["score"] == str(part["score"])
    assert sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png")) == \
        ["cam1/000.png.png", "cam2/000.png.png"]

    # The same command again: refused, nothing touched.
    stale = out / "overlays" / "stale.png"
    stale.write_bytes(b"old")
    code, _, stderr = run(["predict", inputs, "-m", tmp / "tuned.npz", "-o", out, "-q"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "exists" in stderr and "--force" in stderr
    assert stale.exists()
    # With --force the old outputs go, maps come when asked, overlays only when asked.
    code, _, _ = run(["predict", inputs, "-m", tmp / "tuned.npz", "-o", out, "-q", "--force", "--no-overlays",
                      "--save-maps", "npy"], capsys)
    assert code == EXIT_SOME_FAILED and not (out / "overlays").exists()
    assert sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*")) == \
        ["cam1", "cam1/000.png.npy", "cam2", "cam2/000.png.npy"]


def test_predict_exits_0_when_every_input_is_scored(work, tmp_path, capsys):
    tmp, root = work
    argv = ["predict", root / "test" / "good", "-m", tmp / "screw.npz", "-o", tmp_path, "-q"]
    code, _, _ = run(argv, capsys)
    assert code == 0
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 2


def mistakes(tmp, root):
    """(argv, a word the one-line message must hold) per mistake the issue lists, and a few more."""
    model, tuned = tmp / "screw.npz", tmp / "tuned.npz"
    export = tmp / "x.onnx"
    export.write_bytes(b"onnx")
    text = tmp / "notes.txt"
    text.write_text("not an image")
    flat = tmp / "flat"
    (flat / "good").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "train" / "good" / "000.png", flat / "good" / "000.png")
    maps = tmp / "line" / "maps"  # images kept in a folder named like predict's output
    maps.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "train" / "good" / "000.png", maps / "000.png")
    return [
        (["fit", tmp / "nothing", "-o", tmp / "m.npz", *DET], "no such file or folder"),
        (["fit", root / "train" / "good", "-o", model, *DET], "exists"),
        (["fit", tmp, "-o", tmp / "m.npz", *DET], "test image or mask"),
        (["fit", text, "-o", tmp / "m.npz", *DET], "not a readable image"),
        (["fit", root / "test", "-o", tmp / "m.npz", *DET], "layout of a test folder"),
        (["fit", root, "-o", tmp / "m.npz", *DET, "--device", "cuda:99"], "'cuda:99'"),
        (["predict", root, "-m", model, "-o", tmp / "p1", "--device", "cuda:99"], "'cuda:99'"),
        (["fit", root, "-o", tmp / "m.npz", "--engine", "tensorrt"], "--engine"),
        (["fit", root, "-o", tmp / "m.npz", "--kernel", "gpu"], "--kernel"),
        (["fit", root, "-o", tmp / "m.npz", "--image-size", "big"], "--image-size"),
        (["predict", root, "-m", tmp / "nope.npz"], "no such model file"),
        (["predict", root, "-m", export], "--engine"),
        (["predict", root, "-m", text], "not a readable DinoPatch model file"),
        (["predict", root, "-m", model, "-o", root / "preds"], "inside the input folder"),
        (["predict", root, "-m", model, "-o", text], "is a file"),
        (["predict", maps, "-m", model, "-o", maps.parent, "--force"], "is inside the output"),
        (["predict", root, "-m", model, "-o", tmp / "p1", "--engine", tmp / "missing.onnx"],
         "no such ONNX file"),
        (["evaluate", flat, "-m", model, "-o", tmp / "r1"], "MVTec AD layout"),
        (["evaluate", root, "-m", model, "-o", tmp / "r2", "--tune-fraction", "0"], "--tune-fraction"),
        (["evaluate", root, "-m", model, "-o", tmp / "r3", "--tune-fraction", "1.5"], "--tune-fraction"),
        (["evaluate", root, "-m", model, "-o", tmp / "r4", "--tune-fraction", "nan"], "--tune-fraction"),
        (["evaluate", root, "-m", model, "-o", tmp / "r5", "--image-size", "224", "--no-align"],
         "--image-size, --no-align"),
        (["evaluate", root, "-m", model, "-o", tmp / "report"], "exists"),
        (["evaluate", root, "-m", model, "-o", tmp / "r6", "--save-model", tuned], "exists"),
        (["evaluate", root, "-m", model, "-o", tmp / "r6", "--save-model", model, "--force"], "is the input"),
        (["export", "--weights", "random", "-o", model], "exists"),
        (["frobnicate"], "invalid choice"),
    ]


def test_every_mistake_prints_one_line_and_exits_2(work, capsys):
    tmp, root = work
    for argv, word in mistakes(tmp, root):
        code, stdout, stderr = run(argv, capsys)
        assert code == 2, (argv, stdout, stderr)
        assert stderr.startswith("dinopatch: error: ") and stderr.count("\n") == 1, (argv, stderr)
        assert word in stderr, (argv, stderr)
    # Nothing was written by a refused command: no report folders, no models.
    assert not any((tmp / f"r{i}").exists() for i in range(1, 7)) and not (tmp / "m.npz").exists()
    assert not (root / "preds").exists() and not (tmp / "p1").exists()
    assert (tmp / "line" / "maps" / "000.png").exists()  # `predict OUT/maps -o OUT --force` kept its input


def test_a_wrong_run_time_value_is_blamed_on_itself_not_on_the_model_file(work):
    from dinopatch import DinoPatch

    tmp, _ = work
    with pytest.raises(ValueError, match=r"^batch_size must be an integer in \[1, \d+\], got 0$"):
        DinoPatch.load(tmp / "screw.npz", batch_size=0)


def test_debug_shows_the_traceback(work):
    tmp, root = work
    with pytest.raises(ModelFileError, match="no such model file"):
        main(["predict", str(root), "-m", str(tmp / "nope.npz"), "--debug"])


def test_evaluate_honours_run_time_flags_given_with_a_model(work, tmp_path, capsys):
    tmp, root = work
    code, _, stderr = run(["evaluate", root, "-m", tmp / "screw.npz", "-o", tmp_path / "r1", "--engine",
                           tmp_path / "missing.onnx"], capsys)
    # The export was looked for, before any output: the engine given replaced the file's torch.
    assert code == 2 and "missing.onnx: no such ONNX file" in stderr and not (tmp_path / "r1").exists()
    code, _, _ = run(["evaluate", root, "-m", tmp / "screw.npz", "-o", tmp_path / "r2", "--kernel", "numpy",
                      "--batch-size", "3"], capsys)
    detector = json.loads((tmp_path / "r2" / "metrics.json").read_text())["detector"]
    assert code == 0 and detector["kernel"] == "numpy" and detector["batch_size"] == 3


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dinopatch {__version__}"


def subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_shows_every_default_and_every_option_has_help():
    parser = build_parser()
    assert "``" not in parser.format_help() and ":mod:" not in parser.format_help()
    for name, sub in subparsers(parser).items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if not action.option_strings or action.required or action.default is argparse.SUPPRESS:
                continue
            if action.default is None:  # nothing to show: the help says what happens instead
                assert "default" in action.help, (name, action.dest)
            else:
                assert f"(default: {action.default})" in text, (name, action.dest)


def test_choices_come_from_the_registries():
    subs = subparsers(build_parser())
    actions = {a.dest: a for a in subs["evaluate"]._actions}
    assert actions["kernel"].choices == ("auto", *kernels.KERNELS)
    assert actions["score"].choices == ("auto", *SCORES)
    assert actions["match"].choices == ("auto", *MATCHES)
    assert actions["backbone"].choices == tuple(sorted(BACKBONES))
    for engine in ENGINES:
        assert actions["engine"].type(engine) == engine
    with pytest.raises(argparse.ArgumentTypeError):
        actions["engine"].type("tensorrt")


def test_export_writes_a_checked_export_and_refuses_to_replace_it(tmp_path, capsys):
    from dinopatch.backbone import OnnxBackbone

    out = tmp_path / "b112.onnx"
    argv = ["export", "--weights", BLOCKS_MATTER, "--image-size", "112", "-o", out]
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "checked against torch" in stdout
    engine = OnnxBackbone(path=out, device="cpu")
    assert (engine.image_size, engine.layers, engine.precision) == (112, 1, "fp32")
    code, _, stderr = run(argv, capsys)
    assert code == 2 and "exists" in stderr
