"""The fit-time pose report as a reader sees it: its numbers for a report's JSON, a picture, an HTML panel.

Fit's aligner keeps what it saw of the good parts' poses (:attr:`.Aligner.report_`): the mean
aligned part, how far the parts stray from it at each place, the symmetry, the nominal ranges and
the good images whose pose was doubtful.  A model file keeps the aligner's template, symmetry and
evidence, not the report; a loaded model that keeps its good parts (``keep_parts``) has the report
made again from them (alignment is deterministic: the same parts give the same report), and one
without them reports what its aligner keeps (the misalignment map and the doubtful images are then
not known).
"""
from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from .data import write_png
from .goodset import aligner_for
from .viz import pose_picture

PICTURE = "pose.png"


def of_model(model) -> dict | None:
    """The pose report of a fitted model (:class:`~.fitted.Fitted`), None where parts are not aligned.

    Returns:
        the keys of :attr:`.Aligner.report_` (``misalignment`` and ``doubtful`` None where not known)
        and ``names``: fit's image names in order, or None where the model keeps none.
    """
    aligner = model.aligner
    if not aligner.enabled:
        return None
    report, good = aligner.report_, model.good
    if report is None and good is not None:
        report = aligner_for(model.params).fit(list(good.images)).report_
    if report is None:
        report = {"mean_part": aligner.template_, "misalignment": None, "symmetry": aligner.symmetry(),
                  "fold": aligner.fold_, "ranges": aligner.ranges(), "doubtful": None}
    return dict(report, names=None if good is None else list(good.names))


def summary(report: dict | None) -> dict | None:
    """The report's numbers, JSON-able: ``symmetry`` (the sentence), ``fold``, ``size_range`` (relative to
    the good parts' median size), ``lowest_peak_ratio``, ``highest_residual`` and ``largest_stray`` (the
    nominal limits a new part's pose is judged by), ``misalignment`` (``mean``, ``max`` in the mean part's
    standard deviations, ``worst_at``: ``[x, y]`` in fractions of the canonical frame) and ``doubtful``
    (``[{"name", "reason"}]``); the last two None where not known."""
    if report is None:
        return None
    ranges, gap, doubtful, names = report["ranges"], report["misalignment"], report["doubtful"], report["names"]
    out = {"symmetry": report["symmetry"], "fold": int(report["fold"]),
           "size_range": [float(v) for v in ranges["size"]], "lowest_peak_ratio": float(ranges["peak_ratio"]),
           "highest_residual": float(ranges["residual"]), "largest_stray": float(ranges["stray"]),
           "misalignment": None, "doubtful": None}
    if gap is not None:
        y, x = np.unravel_index(int(np.argmax(gap)), gap.shape)
        out["misalignment"] = {"mean": float(gap.mean()), "max": float(gap.max()),
                               "worst_at": [round(float(x) / gap.shape[1], 3), round(float(y) / gap.shape[0], 3)]}
    if doubtful is not None:
        out["doubtful"] = [{"name": names[i] if names else f"#{i}", "reason": why}
                           for i, why in sorted(doubtful.items())]
    return out


def write(model, out: str | os.PathLike) -> dict | None:
    """Write :data:`PICTURE` of ``model``'s pose report into folder ``out``; its :func:`summary` (None, and no
    picture, where parts are not aligned)."""
    report = of_model(model)
    if report is not None:
        write_png(Path(out) / PICTURE, pose_picture(report["mean_part"], report["misalignment"]))
    return summary(report)


def panel(pose: dict | None, registration: str | None = None) -> str:
    """The evaluation page's pose section for a :func:`summary` (or None: parts not aligned), with alignment
    off the ``registration`` sentence where there is one."""
    if pose is None:
        frames = "" if registration is None else f" Fixtured {html.escape(registration)}."
        return f"<h2>Pose of the good parts</h2><p>Parts are not aligned (align off): no pose report.{frames}</p>"
    esc = html.escape
    lo, hi = pose["size_range"]
    gap = pose["misalignment"]
    where = ("not kept in this model file" if gap is None else
             f"mean {gap['mean']:.2f}, largest {gap['max']:.2f} standard deviations of the mean part, at "
             f"{gap['worst_at'][0]:.0%} across and {gap['worst_at'][1]:.0%} down the frame")
    if pose["doubtful"] is None:
        doubtful = "not known (the model file keeps no good parts)"
    elif not pose["doubtful"]:
        doubtful = "none"
    else:
        doubtful = "".join(f"<li>{esc(d['name'])}: {esc(d['reason'])}</li>" for d in pose["doubtful"])
        doubtful = f"<ul>{doubtful}</ul>"
    return f"""<h2>Pose of the good parts (at fit)</h2>
<div class=pose><a href="{PICTURE}"><img src="{PICTURE}" width=480></a>
<table><tr><td class=l>Symmetry</td><td class=l>{esc(pose['symmetry'])}</td></tr>
<tr><td class=l>Size range</td><td class=l>{lo:.2f}-{hi:.2f} of the good parts' median size; a part outside is
flagged</td></tr>
<tr><td class=l>Pose limits</td><td class=l>best rotation at least {pose['lowest_peak_ratio']:.2f}x the next,
residual at most {pose['highest_residual']:.2f}, objects away from the part at most
{pose['largest_stray']:.2%} of the image</td></tr>
<tr><td class=l>Misalignment</td><td class=l>{where}</td></tr>
<tr><td class=l>Doubtful good images</td><td class=l>{doubtful}</td></tr></table></div>"""


__all__ = ["PICTURE", "of_model", "panel", "summary", "write"]
