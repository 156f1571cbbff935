"""The line's numbers of two package versions on the same images: defects caught and good parts rejected.

``render OUT`` stores the benchmark-quality sets as rendered by the package on the path;
``judge OUT WEIGHTS`` fits that package's defaults (with ``--backbone``) on each stored set and prints
image AUROC beside the counts at the model's own threshold.  Run ``judge`` once with each version on
``PYTHONPATH`` (an older one may not render the newer categories, hence the stored sets).
"""
import argparse
import glob
import os
import warnings

import numpy as np


def render(out: str, size: int) -> None:
    from dinopatch.benchmark_sets import ALIGN, CATEGORIES, make_set

    os.makedirs(out, exist_ok=True)
    for name in CATEGORIES:
        d = make_set(name, n_train=20, n_test_good=10, n_test_defect=5, size=size, seed=0)
        np.savez_compressed(os.path.join(out, f"{name}.npz"), train=np.stack(d["train"]), test=np.stack(d["test"]),
                            defects=np.array(d["defects"]), align=ALIGN[name])
        print(name, len(d["train"]), len(d["test"]), sorted(set(d["defects"])))


def judge(out: str, weights: str, size: int, backbone: str, engine: str) -> None:
    from dinopatch import DinoPatch, metrics

    print(f"{'category':<11}{'AUROC':>7}{'caught':>9}{'rejected':>10}  caught per defect")
    recall, rejected_all, good_all, aurocs = [], 0, 0, []
    for path in sorted(glob.glob(os.path.join(out, "*.npz"))):
        z = np.load(path)
        det = DinoPatch(backbone=backbone, weights=weights, image_size=size, align=bool(z["align"]), progress=False,
                        engine=engine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = det.fit(list(z["train"])).predict(list(z["test"]))
        labels = z["defects"] != "good"
        scores = np.array([r.score if r.score is not None and np.isfinite(r.score) else np.inf for r in results])
        flagged = np.array([bool(r.is_anomaly) for r in results])
        auroc = metrics.auroc(labels, scores)
        caught, rejected = int(flagged[labels].sum()), int(flagged[~labels].sum())
        recall.append(caught / labels.sum())
        rejected_all, good_all = rejected_all + rejected, good_all + int((~labels).sum())
        aurocs.append(auroc)
        per = " ".join(f"{d}:{int(flagged[z['defects'] == d].sum())}/{int((z['defects'] == d).sum())}"
                       for d in sorted(set(z["defects"].tolist()) - {"good"}))
        name = os.path.basename(path)[:-4]
        print(f"{name:<11}{auroc:7.3f}{caught:>5}/{labels.sum():<3}{rejected:>6}/{(~labels).sum():<3}  {per}")
    print(f"mean AUROC {np.mean(aurocs):.3f}, mean recall {np.mean(recall):.3f}, "
          f"good rejected {rejected_all} of {good_all}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("render", "judge"))
    p.add_argument("folder")
    p.add_argument("weights", nargs="?", help="checkpoint (judge): python -m dinopatch weights --random-blocks")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--backbone", default="dinov2_vits14", help="judge: the backbone (e.g. dinov3_vits16)")
    p.add_argument("--engine", default="auto", help="judge: the engine; a fixed one (onnx) compares two versions "
                   "without the measured choice, which may differ between runs, in between")
    a = p.parse_args()
    render(a.folder, a.size) if a.what == "render" else judge(a.folder, a.weights, a.size, a.backbone, a.engine)
