"""Any file name: a name that is not valid UTF-8 is scored and recorded losslessly by predict and evaluate;
CSV cells never start like a spreadsheet formula."""
import base64
import csv
import json
import os
import subprocess
import sys

import cv2
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch
from dinopatch.cli import main
from dinopatch.records import csv_row
from dinopatch.synthetic import synthesize

# A lone surrogate in a str path: the byte 0xff of a Linux file name that is not UTF-8.
ODD = os.fsdecode(b"part\xff.png")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return DinoPatch(**FAST).fit(screws("good", 3, seed=1)).save(tmp_path_factory.mktemp("m") / "m.npz")


def _png(path, image):
    ok, data = cv2.imencode(".png", image)
    with open(os.fsencode(path), "wb") as f:
        f.write(data.tobytes())


def test_predict_scores_every_input_whatever_its_name(model, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for name, im in zip(["a.png", ODD, "z.png"], screws("good", 3, seed=2)):
        _png(images / name, im)
    out = tmp_path / "out"
    assert main(["predict", str(images), "-m", str(model), "-o", str(out), "-q"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = list(csv.DictReader((out / "scores.csv").open(encoding="utf-8")))
    assert [r["error"] for r in records] == [None] * 3 and len(rows) == 3
    odd = records[1]
    assert odd["path"].endswith("part\\xff.png") and rows[1]["path"] == odd["path"]
    assert os.fsdecode(base64.b64decode(odd["path_base64"])) == str(images / ODD)
    assert "path_base64" not in records[0]
    assert os.path.exists(os.fsencode(out / "overlays" / (ODD + ".png")))


def test_evaluate_writes_its_report_whatever_the_names(model, tmp_path):
    root = synthesize("screw", tmp_path / "screw", n_train=3, n_test_good=2, n_test_defect=2, size=128, seed=0)
    os.rename(root / "test" / "good" / "000.png", root / "test" / "good" / ODD)
    out = tmp_path / "report"
    # In a child: OpenCV's imwrite crashed the process (SIGSEGV) on such a name.
    run = subprocess.run([sys.executable, "-m", "dinopatch", "evaluate", str(root), "-m", str(model), "-o", str(out)],
                         capture_output=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert run.returncode == 0, run.stderr[-2000:]
    assert os.path.exists(os.fsencode(out / "overlays" / ("good_" + ODD[:-4] + ".png")))
    assert os.fsencode(ODD) in (out / "index.html").read_bytes()  # the link finds the overlay
    assert any(im["path"].endswith(ODD) for im in json.loads((out / "metrics.json").read_text())["images"])


@pytest.mark.parametrize("cell", ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cells_never_start_like_a_formula(cell):
    row = csv_row({"path": cell, "error": cell, "score": -1.5, "is_anomaly": True})
    assert row["path"] == row["error"] == "'" + cell
    assert row["score"] == -1.5 and row["is_anomaly"] == 1  # numbers stay numbers
