"""``python -m dinopatch {fit,predict,evaluate,demo,export}``."""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2

from .backbone import ENGINES


def _engine(value: str) -> str:
    if value in ENGINES or value.endswith(".onnx"):
        return value
    raise argparse.ArgumentTypeError(f"choose one of {', '.join(ENGINES)} or a path to an .onnx export")


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detector")
    g.add_argument("--backbone", default="dinov2_vits14")
    g.add_argument("--weights", default="pretrained", help="'pretrained', 'random' or a checkpoint path")
    g.add_argument("--image-size", type=int, default=448)
    g.add_argument("--no-align", dest="align", action="store_false", help="fixtured parts and flat textures")
    g.add_argument("--engine", default="auto", type=_engine, help=f"{', '.join(ENGINES)} or an .onnx file")
    g.add_argument("--kernel", default="auto", choices=["auto", "cuda", "cpp", "numba", "numpy"])
    g.add_argument("--coreset-ratio", type=float, default=1.0)
    g.add_argument("--tolerance", type=int, default=1)
    g.add_argument("--score", default="max", choices=["max", "mean", "p99", "topk"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--foreground", default="auto", choices=["auto", "on", "off"],
                   help="run the backbone on the part's region only (aligned parts; auto: where it pays)")


def _detector(args):
    from .detector import DinoPatch

    return DinoPatch(backbone=args.backbone, weights=args.weights, image_size=args.image_size, align=args.align,
                     engine=args.engine, kernel=args.kernel, coreset_ratio=args.coreset_ratio,
                     tolerance=args.tolerance, score=args.score, seed=args.seed,
                     foreground={"on": True, "off": False}.get(args.foreground, args.foreground))


def _image_paths(items: list[str]) -> list[Path]:
    from .data import IMAGE_SUFFIXES

    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            paths.append(p)
        else:
            raise SystemExit(f"dinopatch: {item}: no such file or folder")
    if not paths:
        raise SystemExit(f"dinopatch: no images found in {items}")
    return paths


def cmd_fit(args) -> int:
    paths = _image_paths(args.images)
    det = _detector(args).fit(paths)
    path = det.save(args.output)
    print(f"fitted on {len(paths)} images; threshold {det.threshold_.image:.4f} ({det.threshold_.describe()}); saved {path}")
    return 0


def cmd_predict(args) -> int:
    from .data import read_image
    from .detector import DinoPatch
    from .viz import overlay

    det = DinoPatch.load(args.model, **({"engine": args.engine} if args.engine else {}))
    paths = _image_paths(args.images)
    out = Path(args.output)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    results = det.predict(paths)
    vmax = 2 * det.threshold_.image
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "is_anomaly", "aligned"])
        for p, r in zip(paths, results):
            w.writerow([str(p), f"{r.score:.6f}", int(r.is_anomaly), int(r.aligned)])
            pic = overlay(read_image(p), r.anomaly_map, vmax=vmax, pred_mask=r.mask,
                          text=f"{r.score:.3f}{' ANOMALY' if r.is_anomaly else ''}")
            cv2.imwrite(str(out / "overlays" / f"{p.parent.name}_{p.stem}.png"), pic)
    print(f"{sum(r.is_anomaly for r in results)}/{len(results)} anomalous; scores in {out / 'scores.csv'}")
    return 0


def cmd_evaluate(args) -> int:
    from .data import MVTecFolder
    from .detector import DinoPatch
    from .evaluate import evaluate

    folder = MVTecFolder(args.data)
    if args.model:
        det = DinoPatch.load(args.model)
    else:
        det = _detector(args).fit(folder.train_paths())
    m = evaluate(det, folder, args.output, tune_fraction=args.tune_fraction, seed=args.seed,
                 threshold=args.threshold, tune_on_report=args.tune_on_report)
    keys = ("image_auroc", "average_precision", "pixel_auroc", "aupro", "f1", "precision", "recall", "accuracy")
    print(f"{'':<18}{'tuning part':>12}{'reported':>10}")
    for k in keys:
        print(f"{k:<18}{m['tuned'][k]:>12.3f}{m[k]:>10.3f}")
    if m["optimistic"]:
        print("OPTIMISTIC: tuned on the reported images (--tune-on-report)")
    print(f"report: {(Path(args.output) / 'index.html').resolve()}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.output, quick=args.quick, weights=args.weights, engine=args.engine)


def cmd_export(args) -> int:
    from .backbone.onnx_export import main as export_main

    return export_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinopatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit on good images and save a model file")
    p.add_argument("images", nargs="+", help="image files or folders of good parts")
    p.add_argument("-o", "--output", required=True, help="model file to write (.npz)")
    _add_detector_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="score images: scores.csv and heatmap overlays")
    p.add_argument("images", nargs="+")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-o", "--output", default="predictions")
    p.add_argument("--engine", type=_engine, help="override the model file's engine, e.g. an .onnx export "
                   "(runs without torch)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics.json, overlays and roc.png on an MVTec-layout folder")
    p.add_argument("data", help="folder with train/good, test/<type>, ground_truth/<type>")
    p.add_argument("-m", "--model", help="a fitted model file; without it, fit on DATA/train/good")
    p.add_argument("-o", "--output", default="report")
    p.add_argument("--tune-fraction", type=float, default=0.5,
                   help="share of each defect type used to tune post-processing; the rest is reported")
    p.add_argument("--threshold", choices=["tuned", "good"], default="tuned",
                   help="'tuned': best F1 on the tuning part; 'good': from held-out good parts only")
    p.add_argument("--tune-on-report", action="store_true",
                   help="tune on the reported images too (the report says it is optimistic)")
    _add_detector_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="synthetic pasta and screw: generate, fit, evaluate (offline)")
    p.add_argument("-o", "--output", default="dinopatch-demo")
    p.add_argument("--weights", default="pretrained", help="falls back to 'random', loudly, when offline")
    p.add_argument("--engine", default="auto", type=_engine, help=f"{', '.join(ENGINES)} or an .onnx file")
    p.add_argument("--quick", action="store_true", help="fewer, smaller images")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export a backbone to ONNX (see python -m dinopatch export -h)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # export parses its own flags: argparse's REMAINDER in a subparser rejects leading options.
    if argv[:1] == ["export"]:
        return cmd_export(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
