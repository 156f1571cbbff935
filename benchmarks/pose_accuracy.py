"""Residual pose error of aligned good parts with known pose: rotation (degrees) and translation (canonical px).

``PYTHONPATH=. python benchmarks/pose_accuracy.py [SIZE]`` from the repository root.  Each good
part is rendered at a known pose; when alignment is exact, part frame -> canonical frame is the
same similarity for every part, so the spread of that composition over the parts is the residual
error.  ``ALIGNER=package`` measures another package's ``Aligner`` (a copy of an older
``dinopatch`` under another name, on ``PYTHONPATH``) on the same parts.
"""
import importlib
import os
import sys
import time

import numpy as np

from dinopatch import benchmark_sets as bs
from dinopatch.synthetic import finish_image
from dinopatch.synthetic import pose_matrix as scene_pose

Aligner = importlib.import_module(os.environ.get("ALIGNER", "dinopatch") + ".align").Aligner

SIZE = int(sys.argv[1]) if len(sys.argv) > 1 else 448
SCENE = 320


def wheel(rng):
    angle, scale = rng.uniform(0, 360), rng.uniform(0.95, 1.05)
    centre = SCENE / 2 + rng.uniform(-0.05, 0.05, 2) * SCENE
    m = scene_pose(angle, scale * SCENE, centre)
    img = np.full((SCENE, SCENE, 3), bs._BENCH, np.uint8)
    bs._draw_wheel(img, m)
    return finish_image(img, np.random.default_rng(rng.integers(2**63)), 2.5, drift=bs.DRIFT), m


def comb(rng):
    angle, scale = rng.uniform(0, 360), rng.uniform(0.9, 1.1)
    centre = SCENE / 2 + rng.uniform(-0.06, 0.06, 2) * SCENE
    m = scene_pose(angle, scale * SCENE, centre)
    img = np.full((SCENE, SCENE, 3), bs._TABLE, np.uint8)
    bs._draw_comb(img, m, np.stack([np.ones(bs._TEETH), np.zeros(bs._TEETH)], 1))
    return finish_image(img, np.random.default_rng(rng.integers(2**63)), 2.5, drift=bs.DRIFT), m


for name, render in (("wheel", wheel), ("comb", comb)):
    rng = np.random.default_rng(0)
    fit = [render(rng)[0] for _ in range(20)]
    test = [render(rng) for _ in range(30)]
    al = Aligner(size=SIZE).fit(fit)
    t0 = time.perf_counter()
    out = [al.transform(im)[2] for im, _ in test]
    ms = 1000 * (time.perf_counter() - t0) / len(test)
    # Part frame -> canonical: the same similarity for every part when alignment is exact.
    comp = [a.matrix[:, :2] @ m[:, :2] for a, (_, m) in zip(out, test)]
    trans = np.array([a.matrix[:, :2] @ m[:, 2] + a.matrix[:, 2] for a, (_, m) in zip(out, test)])
    rot = np.degrees([np.arctan2(c[1, 0], c[0, 0]) for c in comp])
    ref = np.degrees(np.angle(np.mean(np.exp(1j * np.radians(rot)))))
    drot = np.abs((rot - ref + 180) % 360 - 180)
    good = drot < 5
    pts = np.array([a.matrix @ [*(m @ [0.3, 0.0, 1.0]), 1.0] for a, (_, m) in zip(out, test)])
    rim = np.linalg.norm(pts - np.median(pts, axis=0), axis=1)
    dt = np.linalg.norm(trans - np.median(trans[good] if good.any() else trans, axis=0), axis=1)
    print(f"{name}: {SIZE} px, {len(test)} good parts: rotation error mean {drot.mean():.3f} deg "
          f"({drot[good].mean() if good.any() else float('nan'):.3f} over the {good.sum()} within 5 deg); "
          f"translation error of the part's centre mean {dt.mean():.3f} px, of a point on its rim / tip "
          f"{rim.mean():.3f} px; "
          f"trusted {sum(a.trusted for a in out)}/{len(out)}; align {ms:.1f} ms/image")
