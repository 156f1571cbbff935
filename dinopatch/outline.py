"""A part's outline measured in one image: gray, blur, Canny, external contours, filled.

The moments of the filled outline give the part's centre, principal axis and
size (the standard deviation along the axis); :mod:`.align` turns them into a
pose.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_PAD = 4                 # analysis-image padding, so outlines cut by the border still close
MIN_SIDE = 8             # analysis images smaller than this hold no measurable part
_MIN_CONTRAST = 12.0     # gray levels between part and background
_MIN_AREA = 0.002        # smallest part, as a fraction of the analysis image
_BORDER_CONTACT = 0.5    # border contact, in part widths, beyond which the part is cut off
_STRAY_MARGIN = 0.03     # of the analysis side: outlines this near the part's hull belong to the part
_DISC5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


@dataclass
class Part:
    """A part measured in input-pixel units."""

    centre: np.ndarray        # (x, y)
    axis: np.ndarray          # unit principal axis (x, y), pointing towards +x
    sigma: float              # standard deviation of the silhouette along the axis
    frame: float              # the image's longest side
    elongation: float         # minor / major eigenvalue
    mask: np.ndarray          # uint8 0/255: the filled outline, analysis resolution
    to_input: np.ndarray      # 2x3 affine, analysis pixel -> input pixel
    gray: np.ndarray          # the gray image at analysis resolution, uint8
    stray: np.ndarray         # uint8 0/255: outlines of other objects, away from the part, analysis resolution
    outline: np.ndarray       # int32 [n, 2]: the outline's (x, y) points, analysis pixels (none where not found)
    reason: str = ""

    # The two below serve fit and the silhouette, never the pose: computed when asked.
    @property
    def silhouette(self) -> np.ndarray:
        """The filled outline, float32 0..1, analysis resolution."""
        return self.mask.astype(np.float32) / 255

    @property
    def length(self) -> float:
        """The outline's extent along the axis / sigma (0 where no outline was found)."""
        if not len(self.outline):
            return 0.0
        pts = self.outline.astype(np.float64)
        proj = ((self.to_input @ np.vstack([pts.T, np.ones(len(pts))])).T - self.centre) @ self.axis
        return float(np.ptp(proj)) / self.sigma

    @property
    def stray_area(self) -> float:
        """Largest connected object away from the part, as a fraction of the image."""
        if not self.stray.any():
            return 0.0
        n, _, stats, _ = cv2.connectedComponentsWithStats(self.stray, connectivity=8)
        return float(stats[1:, cv2.CC_STAT_AREA].max()) / self.stray.size if n > 1 else 0.0


def measure_part(image: np.ndarray, analysis_size: int) -> Part:
    """Measure the part's outline (see the module docstring); ``reason`` says why it could not be."""
    h, w = image.shape[:2]
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    f = min(1.0, analysis_size / max(h, w))
    sw, sh = max(1, round(w * f)), max(1, round(h * f))
    small = cv2.resize(gray, (sw, sh), interpolation=cv2.INTER_AREA) if f < 1 else gray
    to_input = np.array([[w / sw, 0, 0.5 * w / sw - 0.5], [0, h / sh, 0.5 * h / sh - 0.5]])

    def failed(reason: str) -> Part:
        return Part(np.array([(w - 1) / 2, (h - 1) / 2]), np.array([1.0, 0.0]), 0.0, max(h, w), 1.0,
                    np.zeros((sh, sw), np.uint8), to_input, small, np.zeros((sh, sw), np.uint8),
                    np.zeros((0, 2), np.int32), reason)

    if min(sw, sh) < MIN_SIDE:
        return failed(f"image of {h}x{w} pixels is too small to find a part in")
    blur = cv2.GaussianBlur(small, (5, 5), 0)
    t, _ = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    # The mean gray level either side of Otsu's threshold, from OpenCV's sums: NumPy's boolean indexing of the
    # whole image costs several times as much.
    _, above = cv2.threshold(blur, t, 0, cv2.THRESH_TOZERO)
    n_hi = cv2.countNonZero(above)
    n_lo, sum_hi = blur.size - n_hi, cv2.sumElems(above)[0]
    contrast = float(sum_hi / n_hi - (cv2.sumElems(blur)[0] - sum_hi) / n_lo) if n_hi and n_lo else 0.0
    if contrast < _MIN_CONTRAST:
        return failed(f"no part found (contrast {contrast:.1f} gray levels)")
    # Pad with the background level so an outline cut by the border still closes.
    background = float(np.median(np.concatenate([blur[0], blur[-1], blur[:, 0], blur[:, -1]])))
    padded = cv2.copyMakeBorder(blur, _PAD, _PAD, _PAD, _PAD, cv2.BORDER_CONSTANT, value=background)
    edges = cv2.Canny(padded, 0.5 * contrast, contrast)
    edges = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, _DISC5)
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return failed("no part outline found")
    # By hull area: Canny may leave the part's rim open, and an open contour encloses nothing, while a
    # closed inner edge (a hub, a bore) does.
    hulls = [cv2.convexHull(c) for c in contours]
    largest = max(range(len(contours)), key=lambda i: cv2.contourArea(hulls[i]))
    outline = contours[largest]
    mask = np.zeros(edges.shape, np.uint8)
    cv2.drawContours(mask, [outline], -1, 255, cv2.FILLED)
    # Canny leaves gaps (at sharp tips, say) that no small closing bridges, and an
    # open outline fills to a thin band: add the pixels of the part's gray level
    # (Otsu's side away from the background) inside the outline's convex hull.
    hull = np.zeros_like(mask)
    cv2.fillConvexPoly(hull, hulls[largest], 255)
    _, part_side = cv2.threshold(padded, t, 255, cv2.THRESH_BINARY if background <= t else cv2.THRESH_BINARY_INV)
    cv2.bitwise_or(mask, cv2.bitwise_and(hull, part_side), dst=mask)
    mask = mask[_PAD:-_PAD, _PAD:-_PAD]
    # The part lies within its outline's bounding box: its moments there, a quarter of the image or less;
    # the central moments do not move with the box, the centre is put back in the image's coordinates.
    x0, y0, bw, bh = cv2.boundingRect(outline)
    x0, y0 = x0 - _PAD, y0 - _PAD
    pts, contact = outline[:, 0] - _PAD, 0.0
    if min(x0, y0) < 1 or x0 + bw > sw - 1 or y0 + bh > sh - 1:  # the outline's box reaches the border
        off = (pts < 1) | (pts > [sw - 2, sh - 2])
        contact = np.count_nonzero(off[:, 0] | off[:, 1]) * np.sqrt(w * h / (sw * sh))
    x0, y0 = max(x0, 0), max(y0, 0)
    mom = cv2.moments(mask[y0:y0 + bh, x0:x0 + bw], binaryImage=True)
    if mom["m00"] < _MIN_AREA * sw * sh:
        return failed(f"part outline too small ({int(mom['m00'])} of {sw * sh} analysis pixels)")
    # Covariance in input pixels: the analysis image may be scaled slightly differently along x and y.
    d = np.diag(to_input[:, :2].diagonal())
    cov = d @ np.array([[mom["mu20"], mom["mu11"]], [mom["mu11"], mom["mu02"]]]) @ d / mom["m00"]
    evals, evecs = np.linalg.eigh(cov)
    axis = evecs[:, 1] if evecs[0, 1] > 0 or (evecs[0, 1] == 0 and evecs[1, 1] > 0) else -evecs[:, 1]
    centre = to_input @ np.array([x0 + mom["m10"] / mom["m00"], y0 + mom["m01"] / mom["m00"], 1.0])
    sigma = float(np.sqrt(max(evals[1], 1e-12)))
    part = Part(centre, axis, sigma, max(h, w), float(evals[0] / max(evals[1], 1e-12)), mask, to_input, small,
                _stray(contours, outline, hull, (sh, sw)), pts)
    width = np.sqrt(12 * evals[0])  # of a rectangle with this second moment
    if contact > _BORDER_CONTACT * width:
        part.reason = f"part cut off by the image border (contact {contact / width:.1f} part widths)"
    return part


def _stray(contours, outline, hull: np.ndarray, shape) -> np.ndarray:
    """Other objects' filled outlines, outside the part's convex hull widened by a margin (padding removed).

    Args:
        contours: every external contour of the padded analysis image; ``outline`` is the part's.
        hull: uint8 padded-analysis mask of the part's convex hull.
        shape: ``(h, w)`` of the analysis image.
    """
    rest = [c for c in contours if c is not outline]
    if not rest:  # the part alone: nothing to dilate around or open
        return np.zeros(shape, np.uint8)
    others = np.zeros(hull.shape, np.uint8)
    cv2.drawContours(others, rest, -1, 255, cv2.FILLED)
    k = 2 * max(1, round(_STRAY_MARGIN * max(shape))) + 1
    others[cv2.dilate(hull, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0] = 0
    # An object has an inside; the open outlines that lighting steps leave along the border do not.
    others = cv2.morphologyEx(others, cv2.MORPH_OPEN, _DISC5)
    return others[_PAD:-_PAD, _PAD:-_PAD].copy()
