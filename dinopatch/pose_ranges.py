"""The good parts' pose evidence, the nominal ranges it gives, and the judgement of one part against them.

Alignment normalises a part's pose away; what a line must still judge is kept
as evidence per good part at fit: its size over the nominal size, how clearly
its best rotation beat the next (peak ratio), how well the aligned part
matches the template (residual), and the largest object lying away from it
(fraction of the image). The ranges are robust (median and MAD, with floors),
so one odd good image does not widen them, and are derived from the evidence
at fit and on load alike: the model file keeps the evidence, not the ranges.
"""
from __future__ import annotations

import numpy as np

__all__ = ["PoseEvidence", "MAX_RATIO"]

KEYS = ("size", "peak_ratio", "residual", "stray")
MAX_RATIO = 1e3          # peak ratios are capped here (a pose without a rival)
_SIZE_K = 4.0            # robust standard deviations of the good parts' sizes in the nominal range
_RATIO_FLOOR = 1.02      # a best pose that beats the next by less is always ambiguous
_RATIO_SHARE = 0.25      # ... and so is one that keeps less than this share of the good parts' median margin
_RESIDUAL_K = 6.0
_RESIDUAL_FLOOR = 0.1    # the residual catches a part that is not this one or not in pose; the backbone judges detail
_STRAY_K = 6.0
_STRAY_FLOOR = 0.002     # of the image: smaller objects away from the part are dust


def robust_range(values, k: float, floor: float, centre: float | None = None) -> tuple[float, float]:
    """``median -+ max(k * 1.4826 * MAD, floor)`` of ``values`` (``centre`` replaces the median where given)."""
    v = np.asarray(values, np.float64)
    med = float(np.median(v)) if centre is None else centre
    half = max(k * 1.4826 * float(np.median(np.abs(v - np.median(v)))), floor)
    return med - half, med + half


class PoseEvidence:
    """Per good part: ``size``, ``peak_ratio``, ``residual`` and ``stray``, one list each.

    Args:
        values: the lists, checked (ValueError saying what is wrong): the four keys, one
            non-negative finite number per part in each, peak ratios at most :data:`MAX_RATIO`.
        size_tolerance: smallest half-width of the size range, relative.
    """

    def __init__(self, values: dict, size_tolerance: float):
        if not isinstance(values, dict) or set(values) != set(KEYS):
            raise ValueError(f"pose evidence must hold {KEYS}, got {values if values is None else sorted(values)}")
        self.values = {}
        for k in KEYS:
            v = values[k]
            if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                       for x in v):
                raise ValueError(f"pose evidence {k!r} must be a non-empty list of numbers")
            a = np.asarray(v, np.float64)
            if not np.isfinite(a).all() or (a < 0).any() or (k == "peak_ratio" and (a > MAX_RATIO).any()):
                raise ValueError(f"pose evidence {k!r} holds values out of range")
            self.values[k] = [float(x) for x in a]
        if len({len(v) for v in self.values.values()}) != 1:
            raise ValueError("pose evidence lists of different lengths")
        self.size_tolerance = float(size_tolerance)
        # Derived once: every placed part is judged against them (their medians cost a tenth of an alignment).
        e = self.values
        ratio, res = float(np.median(e["peak_ratio"])), float(np.median(e["residual"]))
        self._ranges = {"size": robust_range(e["size"], _SIZE_K, self.size_tolerance, centre=1.0),
                        "peak_ratio": max(_RATIO_FLOOR, 1.0 + _RATIO_SHARE * (ratio - 1.0)),
                        "residual": robust_range(e["residual"], _RESIDUAL_K, max(_RESIDUAL_FLOOR, 2.0 * res))[1],
                        "stray": robust_range(e["stray"], _STRAY_K, _STRAY_FLOOR)[1]}

    def ranges(self) -> dict:
        """``size`` (lo, hi) over the nominal size, ``peak_ratio`` (lowest), ``residual`` (highest),
        ``stray`` (largest object away from the part, fraction of the image)."""
        return dict(self._ranges)

    def judge(self, size: float, peak_ratio: float, residual: float, stray: float, stray_at) -> tuple[str, bool]:
        """Why a placed part is not trusted ("" if it is), and whether an object lies away from it.

        Args:
            size, peak_ratio, residual, stray: the part's evidence (as the lists hold it).
            stray_at: ``(x, y)`` input point of the objects away from the part, or None.
        """
        r = self.ranges()
        lo, hi = r["size"]
        reasons = []
        if not lo <= size <= hi:
            reasons.append(f"part {size:.2f}x the nominal length; nominal range {lo:.2f}-{hi:.2f}")
        if not peak_ratio >= r["peak_ratio"]:
            reasons.append(f"ambiguous pose: the best rotation beats the next by {peak_ratio:.3f}x "
                           f"(nominal >= {r['peak_ratio']:.3f}x)")
        if not residual <= r["residual"]:
            reasons.append(f"part does not match the nominal template (residual {residual:.3f}, "
                           f"nominal <= {r['residual']:.3f})")
        away = stray > r["stray"]
        if away:
            x, y = stray_at
            reasons.append(f"an object away from the part near ({x:.0f}, {y:.0f}), {100 * stray:.1f}% of the image")
        return "; ".join(reasons), away
