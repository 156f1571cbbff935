"""The per-input record that predict writes and a service answers."""
import json

import numpy as np

from dinopatch.align import Alignment
from dinopatch.records import CSV_FIELDS, FIELDS, defect_boxes, error_record, result_record
from dinopatch.result import Result


class Det:
    model_id = "0123456789ab"
    engine = "torch"


def result(score: float, mask: np.ndarray, trusted: bool = True) -> Result:
    alignment = Alignment(0.0, 1.0, (0.0, 0.0), False, False, trusted, "" if trusted else "no part found",
                          np.eye(2, 3))
    return Result(score=score, anomaly_map=mask.astype(np.float32), is_anomaly=not trusted or score > 1.0,
                  aligned=trusted, mask=mask, alignment=alignment, threshold=1.0,
                  threshold_source="given by the user", p_value=0.25 if score == score else None)


def test_boxes_largest_first_and_capped():
    mask = np.zeros((40, 60), bool)
    mask[2:4, 3:6] = True        # 2 x 3
    mask[10:30, 20:25] = True    # 20 x 5, the largest
    mask[35, 50] = True          # one pixel
    boxes, regions = defect_boxes(mask)
    assert boxes == [[20, 10, 5, 20], [3, 2, 3, 2], [50, 35, 1, 1]] and regions == 3
    assert defect_boxes(mask, limit=1) == ([[20, 10, 5, 20]], 3)
    # Diagonal neighbours are one region.
    assert defect_boxes(np.eye(5, dtype=bool))[1] == 1


def test_result_record_is_strict_json_with_every_field():
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:4] = True
    record = result_record(result(2.5, mask), Det(), path="a/x.png", latency_ms=12.34567)
    assert tuple(record) == FIELDS
    assert record["score"] == 2.5 and record["p_value"] == 0.25 and record["is_anomaly"] is True
    assert record["defect_area_px"] == 6
    assert record["defect_boxes"] == [[1, 1, 3, 2]] and record["latency_ms"] == 12.346
    assert record["model_id"] == "0123456789ab" and record["engine"] == "torch" and record["error"] is None
    json.dumps(record, allow_nan=False)


def test_an_unscorable_image_has_a_null_score_and_its_reason():
    record = result_record(result(float("nan"), np.zeros((4, 4), bool), trusted=False), Det(), path="p.png")
    assert record["score"] is None and record["p_value"] is None and record["is_anomaly"] is True
    assert record["reason"] == "no part found"
    json.dumps(record, allow_nan=False)


def test_error_record_keeps_the_path_and_the_error_and_nothing_else():
    record = error_record(ValueError("p.png: not a readable image"), Det(), path="p.png")
    assert tuple(record) == FIELDS and set(CSV_FIELDS) < set(FIELDS)
    assert record["error"] == "ValueError: p.png: not a readable image" and record["path"] == "p.png"
    assert all(record[k] is None for k in FIELDS if k not in ("path", "error", "model_id", "engine"))
