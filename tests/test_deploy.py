"""The deployment folder's scripts, run as a user would: export a model's graph, then score torch-free."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parent.parent


def test_export_then_inspect_a_folder(tmp_path):
    det = DinoPatch(**FAST).fit(screws("good", 4, seed=1))
    model = det.save(tmp_path / "model.npz")
    graph = tmp_path / "model.onnx"
    subprocess.run([sys.executable, str(ROOT / "export" / "export_for_model.py"), str(model), str(graph)],
                   check=True, capture_output=True, timeout=300)
    frames = screws("good", 2, seed=2) + screws("missing_washer", 1, seed=3)
    (tmp_path / "in").mkdir()
    for i, im in enumerate(frames):
        cv2.imwrite(str(tmp_path / "in" / f"{i}.png"), im)
    (tmp_path / "in" / "1a.png").write_bytes(b"\x89PNG half written")  # an unreadable frame is a line, not the end
    out = subprocess.run([sys.executable, str(ROOT / "export" / "inspect_folder.py"), str(model), str(graph),
                          str(tmp_path / "in")], check=True, capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["0.png", "1.png", "1a.png", "2.png"]
    assert "1a.png" in rows[2].pop("error") and [r["error"] for r in rows if "error" in r] == [None] * 3
    del rows[2]
    np.testing.assert_allclose([r["score"] for r in rows], det.score_images(frames), rtol=1e-4)
    assert rows[2]["is_anomaly"] and "(conformal, leave-one-out)" in rows[2]["threshold_source"]
