"""Scoring files into an output folder: one record per input, in order, written batch by batch."""
import csv
import json

import cv2
import numpy as np
import pytest
from conftest import screws

from dinopatch.predictions import predict_files


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"{i:03d}.png")
        cv2.imwrite(str(paths[-1]), im)
    return paths


def read_records(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overlap", [False, True])
def test_one_image_failing_in_a_batch_fails_alone_and_records_come_batch_by_batch(screw_detector, tmp_path,
                                                                                  monkeypatch, overlap):
    det = screw_detector
    flat = np.full((77, 77), 128, np.uint8)
    images = screws("good", 3, seed=7) + [flat] + screws("missing_washer", 1, seed=8)
    paths = write_images(tmp_path / "in", images)
    out = tmp_path / "out"
    expected = det.predict(images[:3] + images[4:])
    distances = det.distances_aligned
    written = []

    def flaky(items):
        # What a later batch finds on disk: every earlier batch's records.
        written.append(len(read_records(out)) if (out / "predictions.jsonl").exists() else 0)
        if any(item[1].shape == (77, 77) for item in items):
            raise ValueError("cannot score this one")
        return distances(items)

    monkeypatch.setattr(det, "distances_aligned", flaky)
    monkeypatch.setattr(det, "batch_size", 2)
    monkeypatch.setattr(det, "overlap", overlap)
    summary = predict_files(det, paths, out, root=tmp_path / "in", progress=False)

    records = read_records(out)
    assert [r["path"] for r in records] == [str(p) for p in paths]
    assert records[3]["error"] == "ValueError: cannot score this one" and records[3]["score"] is None
    scored = [r["score"] for i, r in enumerate(records) if i != 3]
    np.testing.assert_allclose(scored, [r.score for r in expected], rtol=1e-6)
    assert (summary.scored, summary.failed, summary.anomalous) == (4, 1, sum(r.is_anomaly for r in expected))
    assert records[4]["is_anomaly"]
    # The conformal p-value of each verdict, in the JSON records and the CSV rows alike (empty for the failure).
    assert [r["p_value"] for i, r in enumerate(records) if i != 3] == [r.p_value for r in expected]
    assert records[3]["p_value"] is None and all(0 < r.p_value <= 1 for r in expected)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [row["p_value"] for row in rows] == ["" if r["p_value"] is None else str(r["p_value"]) for r in records]
    # Batches [0, 1], [2, 3] (fails, then 2 and 3 alone), [4]; overlapped, the backbone runs a batch while the
    # one before it is written, so it finds at most the records of the batches before.
    before = [0, 2, 2, 2, 4]
    assert written == before if not overlap else all(w <= b for w, b in zip(written, before))
    assert written == sorted(written) and len(written) == len(before)
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["000.png.png", "001.png.png", "002.png.png", "004.png.png"]


def test_map_files_hold_the_maps(screw_detector, tmp_path):
    det = screw_detector
    paths = write_images(tmp_path / "in", screws("missing_washer", 1, seed=9))
    predict_files(det, paths, tmp_path / "npy", root=tmp_path / "in", overlays=False, save_maps="npy",
                  progress=False)
    predict_files(det, paths, tmp_path / "png", root=tmp_path / "in", overlays=False, save_maps="png",
                  progress=False)
    exact = np.load(tmp_path / "npy" / "maps" / "000.png.npy")
    np.testing.assert_array_equal(exact, det.predict(paths)[0].anomaly_map)
    png = cv2.imread(str(tmp_path / "png" / "maps" / "000.png.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == exact.shape
    assert not (tmp_path / "png" / "overlays").exists()
    # 65535 stands for twice the pixel threshold; above it, the map saturates.
    full = 2 * det.threshold_.pixel
    below = exact < full
    assert below.any() and (~below).any()
    np.testing.assert_allclose(png[below] / 65535 * full, exact[below], atol=full / 65535)
    assert (png[~below] == 65535).all()
