"""The command line on a tiny MVTec-layout folder."""
import csv
import json

import pytest
from conftest import BLOCKS_MATTER

from dinopatch.cli import main
from dinopatch.synthetic import synthesize

DET = ["--weights", BLOCKS_MATTER, "--image-size", "112", "--engine", "torch"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("screw")
    return synthesize("screw", root, n_train=6, n_test_good=2, n_test_defect=1, size=128, seed=0)


def test_fit_predict_evaluate(folder, tmp_path, capsys):
    model = tmp_path / "screw.npz"
    assert main(["fit", str(folder / "train" / "good"), "-o", str(model), *DET]) == 0
    assert model.is_file()

    preds = tmp_path / "preds"
    assert main(["predict", str(folder / "test"), "-m", str(model), "-o", str(preds)]) == 0
    rows = list(csv.DictReader(open(preds / "scores.csv")))
    assert rows and {"path", "score", "is_anomaly", "aligned"} <= set(rows[0])
    assert len(list((preds / "overlays").glob("*.png"))) == len(rows)

    report = tmp_path / "report"
    assert main(["evaluate", str(folder), "-m", str(model), "-o", str(report)]) == 0
    m = json.load(open(report / "metrics.json"))
    for key in ("image_auroc", "pixel_auroc", "f1", "precision", "recall", "accuracy"):
        assert 0.0 <= m[key] <= 1.0, key
    assert (report / "roc.png").stat().st_size > 1000
    # One overlay per test image, tuning and reported parts alike.
    assert len(list((report / "overlays").glob("*.png"))) == len(m["split"]["tune"]) + len(m["split"]["report"])


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main(["fit", str(tmp_path / "nothing"), "-o", str(tmp_path / "m.npz"), *DET])
