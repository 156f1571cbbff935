"""The foreground stage: foreground-only tokens against every token on aligned screws."""

from __future__ import annotations

import numpy as np

from dinopatch import margin

from ..registry import latency_row, paired_ratio, round_robin, stage, target
from .pipeline import aurocs, good_frames, labelled, make_detector


@stage("foreground", groups=("pipeline",))
def bench_foreground(args) -> list[dict]:
    """Foreground-only tokens against every token on aligned screws: speed and accuracy, in one run.

    Both detectors are fitted on the same ``--bank`` good screws and judge the
    same test set (good, and each defect); the backbone and end-to-end predict
    are timed in turn, round after round.
    """
    test = labelled(1 if args.quick else 6)
    frames = [im for im, _, _ in test]
    dets = {fg: make_detector(args, foreground=fg).fit(good_frames(args.bank, seed=1)) for fg in (False, True)}
    region = dets[True].model_.foreground
    if region is None:
        raise RuntimeError("no foreground region was fitted")
    batch = np.stack([c for c, _, _ in map(dets[True].model_.aligner.transform, frames[:args.batch])])
    engine = dets[True].backbone_for()
    runs = {("backbone", False): lambda: engine(batch), ("backbone", True): lambda: engine(batch, region.positions),
            ("e2e", False): lambda: dets[False].predict(frames), ("e2e", True): lambda: dets[True].predict(frames)}
    out = {}
    times = round_robin({k: lambda k=k, fn=fn: out.__setitem__(k, fn()) for k, fn in runs.items()},
                        max(1, args.repeats // 2))
    rows = []
    for fg in dets:
        image, pixel = aurocs(test, out["e2e", fg])
        what = (f"foreground tokens ({len(region.positions)} of {region.grid[0] * region.grid[1]} patches kept, "
                f"{region.fraction:.0%})" if fg else "every token")
        rows.append(latency_row("foreground", f"backbone, {what}", times["backbone", fg], len(batch)))
        rows.append(latency_row("foreground", f"predict, {what}", times["e2e", fg], len(frames),
                                note=f"image AUROC {image:.4f}, pixel AUROC {pixel:.4f}, weights {args.weights}"
                                     + (f"; {margin.describe(region)}"
                                        if fg else "")))
    speedup = paired_ratio(times, ("e2e", False), ("e2e", True))
    rows.append(target("foreground tokens: end-to-end speed-up", "> 1", speedup, lambda v: v > 1))
    return rows
