"""Pictures people look at: heatmap overlays, tolerance maps, the pose report and ROC curves."""
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
        pred_mask: predicted defect mask, drawn as a magenta contour.
        text: a caption, drawn dark on a light band above the image, sized to
            read when the picture is shown 160 px wide.
    """
    base = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3]
    heat = np.clip(amap / max(vmax, 1e-12), 0, 1)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    # Cool regions stay mostly image, so the part is still readable under the map.
    a = (alpha * heat)[..., None]
    out = (base * (1 - a) + colour * a).astype(np.uint8)
    # Magenta and green: both stand out on grey parts and on the heat colours.
    for mask, col in ((pred_mask, (255, 0, 255)), (gt_mask, (0, 255, 0))):
        if mask is not None and mask.any():
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            # Thick enough to survive a thumbnail's downscaling.
            cv2.drawContours(out, contours, -1, col, max(1, out.shape[1] // 200), cv2.LINE_AA)
    return np.vstack([caption_band(out.shape[1], text), out]) if text else out


def caption_band(width: int, text: str) -> np.ndarray:
    """A light band ``[h, width, 3]`` uint8 with ``text`` in near-black, as large as the width allows.

    The text is about a twelfth of the width high (at least 14 px), so a
    picture shown as a thumbnail keeps a caption one can read; a longer text
    is shrunk to fit the width.
    """
    font, height = cv2.FONT_HERSHEY_DUPLEX, max(14, width // 12)
    (w, h), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = min(height / h, (width - 8) / w)
    thick = max(1, round(scale * 1.5))
    (w, h), base = cv2.getTextSize(text, font, scale, thick)
    band = np.full((h + base + 8, width, 3), 245, np.uint8)
    cv2.putText(band, text, (4, h + 4), font, scale, (20, 20, 20), thick, cv2.LINE_AA)
    return band


# BGR colour of each tolerance: in place (grey-blue), one step (amber), two steps (red).
TOLERANCE_COLOURS = ((110, 80, 60), (0, 190, 255), (40, 40, 220))


def tolerance_picture(tmap: np.ndarray, grid: tuple[int, int], *, cell: int = 20,
                      image: np.ndarray | None = None) -> np.ndarray:
    """A tolerance map drawn as a uint8 BGR picture: one cell per grid location, coloured and numbered by tolerance.

    Args:
        tmap: ``[h * w]`` tolerances in {0, 1, 2} (``MemoryBank.tolerance`` of a map bank).
        grid: ``(h, w)`` token grid.
        cell: pixels per grid location.
        image: optional canonical-frame image (uint8 ``[H, W]`` or ``[H, W, 3]``) blended under the cells,
            so the tolerances can be read against the part.

    Returns:
        ``[h * cell + legend, w * cell, 3]`` uint8 (a legend strip below the grid).
    """
    h, w = grid
    tmap = np.asarray(tmap)
    if tmap.shape != (h * w,) or not np.isin(tmap, range(len(TOLERANCE_COLOURS))).all():
        raise ValueError(f"a tolerance map must be {h * w} tolerances in 0..{len(TOLERANCE_COLOURS) - 1}, got "
                         f"{tmap.dtype}{list(tmap.shape)}")
    colours = np.array(TOLERANCE_COLOURS, np.uint8)[tmap.reshape(h, w)]
    pic = cv2.resize(colours, (w * cell, h * cell), interpolation=cv2.INTER_NEAREST)
    if image is not None:
        base = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3]
        pic = cv2.addWeighted(cv2.resize(base, (w * cell, h * cell), interpolation=cv2.INTER_AREA), 0.5, pic, 0.5, 0)
    scale = cell / 40
    if cell >= 14:  # the number too, for readers who do not see the colours apart
        for (y, x), r in np.ndenumerate(tmap.reshape(h, w)):
            cv2.putText(pic, str(int(r)), (x * cell + cell // 4, y * cell + 3 * cell // 4), cv2.FONT_HERSHEY_SIMPLEX,
                        scale, (255, 255, 255), 1, cv2.LINE_AA)
    legend = np.full((max(18, cell), w * cell, 3), 255, np.uint8)
    x = 4
    for r, colour in enumerate(TOLERANCE_COLOURS):
        side = legend.shape[0] - 6
        cv2.rectangle(legend, (x, 3), (x + side, 3 + side), colour, -1)
        cv2.putText(legend, f"{r}", (x + side + 3, 3 + side), cv2.FONT_HERSHEY_SIMPLEX, max(0.35, scale), (0, 0, 0), 1,
                    cv2.LINE_AA)
        x += side + 24
    return np.vstack([pic, legend])


def pose_picture(mean_part: np.ndarray, misalignment: np.ndarray | None, *, side: int = 320) -> np.ndarray:
    """Fit's pose report as one uint8 BGR picture: the mean aligned good part beside its misalignment map.

    Args:
        mean_part: float ``[S, S]`` mean gray image of the aligned good parts (0-255).
        misalignment: float ``[S, S]`` mean absolute difference of the aligned good parts from it, in its
            standard deviations, or None where it is not known (drawn as a panel saying so).
        side: pixels per panel.

    Each panel carries a caption band (:func:`caption_band`) that reads at thumbnail size; the map is a
    heat overlay on the mean part, hottest at its own largest value (said in its caption), with a colour
    bar under it.
    """
    mean = cv2.resize(np.clip(np.asarray(mean_part, np.float32), 0, 255).astype(np.uint8), (side, side),
                      interpolation=cv2.INTER_AREA)
    if misalignment is None:
        text, heat = "misalignment: not kept", np.full((side, side, 3), 235, np.uint8)
    else:
        gap = cv2.resize(np.asarray(misalignment, np.float32), (side, side), interpolation=cv2.INTER_AREA)
        top = max(float(np.nanmax(gap)), 1e-6)
        text, heat = f"misalignment, max {top:.2f} sd", overlay(mean, gap, vmax=top, alpha=0.8)
    bands = [caption_band(side, "mean aligned good part"), caption_band(side, text)]
    height = max(len(b) for b in bands)  # texts of other lengths get bands of other heights
    bands = [np.vstack([b, np.full((height - len(b), side, 3), 245, np.uint8)]) for b in bands]
    bar = np.full((max(14, side // 20), 2 * side, 3), 255, np.uint8)
    bar[:, side:] = cv2.applyColorMap(np.linspace(0, 255, side).astype(np.uint8)[None].repeat(len(bar), 0),
                                      cv2.COLORMAP_JET)
    return np.vstack([np.hstack(bands), np.hstack([cv2.cvtColor(mean, cv2.COLOR_GRAY2BGR), heat]), bar])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(labels: np.ndarray, scores: np.ndarray, out: str | os.PathLike, title: str = "") -> None:
    """Write ``roc.png`` and ``pr.png`` for image scores into folder ``out``."""
    from . import metrics

    plt = _pyplot()
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    precision, recall, _ = metrics.precision_recall_curve(labels, scores)
    for name, x, y, xl, yl, label, diag in (
        ("roc", fpr, tpr, "false positive rate", "true positive rate",
         f"AUROC {metrics.auroc(labels, scores):.3f}", True),
        ("pr", np.r_[0.0, recall], np.r_[1.0, precision], "recall", "precision",
         f"AP {metrics.average_precision(labels, scores):.3f}", False),
    ):
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
        ax.plot(x, y, lw=2, label=label, drawstyle="steps-post" if name == "pr" else "default")
        if diag:
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.set(xlabel=xl, ylabel=yl, title=f"{title} {name.upper()}", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="lower right" if diag else "lower left", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}.png"))
        plt.close(fig)


def plot_histogram(good: np.ndarray, defect: np.ndarray, threshold: float, path: str | os.PathLike,
                   title: str = "") -> None:
    """Histogram of good vs defect image scores with the decision threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    both = np.r_[good, defect]
    bins = np.linspace(both.min(), both.max(), 30) if both.size and both.min() < both.max() else 10
    ax.hist(good, bins=bins, alpha=0.6, color="tab:green", label=f"good ({good.size})")
    ax.hist(defect, bins=bins, alpha=0.6, color="tab:red", label=f"defect ({defect.size})")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="image score (higher = more anomalous)", ylabel="images", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
