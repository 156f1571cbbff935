"""Evaluate a fitted detector on an MVTec-layout test set and write a report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from . import metrics
from .data import read_image, read_mask
from .viz import overlay, plot_roc


def evaluate(det, folder, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Score ``folder``'s test images and write the report into ``out``.

    Writes ``metrics.json`` (image_auroc, pixel_auroc, f1, precision, recall,
    accuracy at the detector's threshold, per image scores), one heatmap
    overlay PNG per test image under ``overlays/`` and ``roc.png``.

    Returns:
        the metrics dictionary.
    """
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    items = folder.test_items()
    if not items:
        raise ValueError(f"{folder.root}: no test images")
    results = []
    bs = det.batch_size
    for i in tqdm(range(0, len(items), bs), desc="evaluate", disable=not progress, leave=False):
        results.extend(det.predict([it.path for it in items[i:i + bs]]))

    labels = np.array([it.label for it in items], bool)
    scores = np.array([r.score for r in results], np.float64)
    thr = det.threshold
    vmax = 2 * thr if np.isfinite(thr) else float(np.nanmax(scores))
    pix_labels, pix_scores = [], []
    for it, r in zip(items, results):
        image = read_image(it.path)
        gt = read_mask(it.mask_path, image.shape[:2]) if it.mask_path else np.zeros(image.shape[:2], bool)
        pix_labels.append(gt.ravel())
        pix_scores.append(r.anomaly_map.ravel())
        caption = f"{it.defect} {r.score:.3f}{' ANOMALY' if r.is_anomaly else ''}{'' if r.aligned else ' (unaligned)'}"
        pic = overlay(image, r.anomaly_map, vmax=vmax, gt_mask=gt, pred_mask=r.mask, text=caption)
        cv2.imwrite(str(out / "overlays" / f"{it.defect}_{Path(it.path).stem}.png"), pic)

    finite = np.isfinite(scores)
    report = {
        "image_auroc": metrics.auroc(labels[finite], scores[finite]),
        "pixel_auroc": metrics.auroc(np.concatenate(pix_labels), np.concatenate(pix_scores)),
        "threshold": thr,
        **metrics.binary_report(labels, [r.is_anomaly for r in results]),
        "n_good": int((~labels).sum()),
        "n_defect": int(labels.sum()),
        "n_unaligned": int(sum(not r.aligned for r in results)),
        "detector": {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in det.get_params().items()},
        "images": [{"path": str(it.path), "defect": it.defect, "label": int(it.label), "score": r.score,
                    "is_anomaly": bool(r.is_anomaly), "aligned": bool(r.aligned)} for it, r in zip(items, results)],
    }
    fpr, tpr, _ = metrics.roc_curve(labels[finite], scores[finite])
    plot_roc({"image": (fpr, tpr, report["image_auroc"])}, out / "roc.png", title=f"ROC: {Path(folder.root).name}")
    with open(out / "metrics.json", "w") as f:
        json.dump(report, f, indent=1, default=float)
    return report
