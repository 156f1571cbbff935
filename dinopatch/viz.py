"""Pictures people look at: heatmap overlays and ROC curves."""
from __future__ import annotations

import os

import cv2
import numpy as np


def overlay(image: np.ndarray, amap: np.ndarray, *, vmax: float, gt_mask: np.ndarray | None = None,
            pred_mask: np.ndarray | None = None, text: str = "", alpha: float = 0.5) -> np.ndarray:
    """The image with its anomaly map as a heat overlay, uint8 BGR.

    Args:
        image: uint8 ``[H, W]`` or ``[H, W, 3]`` BGR.
        amap: float ``[H, W]`` anomaly map in the image's frame.
        vmax: map value shown as the hottest colour (one scale for a whole
            report, so overlays can be compared).
        gt_mask: ground-truth defect, drawn as a green contour.
        pred_mask: predicted defect mask, drawn as a white contour.
        text: a caption drawn in the top-left corner.
    """
    base = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3]
    heat = np.clip(amap / max(vmax, 1e-12), 0, 1)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    # Cool regions stay mostly image, so the part is still readable under the map.
    a = (alpha * heat)[..., None]
    out = (base * (1 - a) + colour * a).astype(np.uint8)
    for mask, col in ((pred_mask, (255, 255, 255)), (gt_mask, (0, 255, 0))):
        if mask is not None and mask.any():
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, col, 1, cv2.LINE_AA)
    if text:
        scale = max(0.35, out.shape[1] / 700)
        cv2.putText(out, text, (4, int(16 * scale + 4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, text, (4, int(16 * scale + 4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | os.PathLike, title: str = "ROC"):
    """Write ROC curves ``{name: (fpr, tpr, auroc)}`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUROC {area:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
