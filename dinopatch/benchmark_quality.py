"""The harder synthetic benchmark's run: ``dinopatch benchmark-quality``.

:func:`run` fits a detector per category of :mod:`dinopatch.benchmark_sets` on
good parts only and reports image AUROC, pixel AUROC and AUPRO per category and
per defect, with the detector's own settings (no tuning on the test images).
:func:`compare` puts the JSON reports of several runs side by side.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import metrics
from .benchmark_sets import ALIGN, CATEGORIES, _check, make_set


def _pixel(masks, maps) -> dict:
    y = np.concatenate([m.ravel() for m in masks])
    if not y.any():
        return {"pixel_auroc": float("nan"), "aupro": float("nan")}
    return {
        "pixel_auroc": metrics.auroc(y, np.concatenate([a.ravel() for a in maps])),
        "aupro": metrics.aupro(masks, maps, fpr_limit=0.3),
    }


def score_category(det, data: dict) -> dict:
    """Fit ``det`` on the category's good parts; metrics of its own settings on the test images."""
    t0 = time.perf_counter()
    det.fit(data["train"])
    results = det.predict(data["test"])
    seconds = time.perf_counter() - t0
    scores = np.array([r.score for r in results])
    maps = [r.anomaly_map for r in results]
    defects = np.array(data["defects"])
    labels = defects != "good"
    good = np.flatnonzero(~labels)
    per_defect = {}
    for d in sorted(set(defects.tolist()) - {"good"}):
        idx = np.flatnonzero(defects == d)
        both = np.r_[good, idx]
        per_defect[d] = {
            "n": int(idx.size),
            "image_auroc": metrics.auroc(labels[both], scores[both]),
            **_pixel([data["masks"][i] for i in idx], [maps[i] for i in idx]),
        }
    return {
        "image_auroc": metrics.auroc(labels, scores),
        **_pixel(data["masks"], maps),
        "per_defect": per_defect,
        "seconds": seconds,
        "n_train": len(data["train"]),
        "n_test": len(data["test"]),
        "auto": det.auto_,
    }


def run(
    params: dict | None = None,
    *,
    categories=CATEGORIES,
    size: int = 224,
    seed: int = 0,
    n_train: int = 20,
    n_test_good: int = 10,
    n_test_defect: int = 5,
    progress=print,
) -> dict:
    """The benchmark: every category fitted and scored with ``DinoPatch(**params)``.

    Args:
        params: detector parameters; ``align`` is set per category and
            ``image_size`` defaults to ``size``.
        size: rendered image side in pixels.

    Returns:
        ``{"params", "categories": {name: metrics}, "mean_image_auroc", "mean_pixel_auroc", "seconds"}``.

    Raises:
        ValueError: an unknown category or parameter, a value out of range, ``align`` among ``params``,
            or a count below 1, before any image is rendered.
    """
    from .detector import DinoPatch
    from .fitted import check_params

    params = dict(params or {})
    known = set(inspect.signature(DinoPatch).parameters)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown detector parameter(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if "align" in params:
        raise ValueError("align is set per category (weave and circuit off, comb on); leave it out of params")
    for name, n in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if int(n) < 1:
            raise ValueError(f"{name} must be at least 1, got {n}")
    for name in categories:
        _check(name, "good", size)
    params.setdefault("image_size", size)
    params.setdefault("progress", False)
    # Built first so that a bad parameter fails before the minutes of rendering and fitting.
    detectors = {name: DinoPatch(**dict(params, align=ALIGN[name])) for name in categories}
    for det in detectors.values():
        check_params(det.get_params())
    t0 = time.perf_counter()
    out = {}
    for name, det in detectors.items():
        data = make_set(
            name, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, size=size, seed=seed
        )
        out[name] = score_category(det, data)
        if progress:
            progress(f"{name}: image AUROC {out[name]['image_auroc']:.3f} ({out[name]['seconds']:.0f} s)")
    return {
        "params": {k: str(v) for k, v in params.items()},
        "categories": out,
        "mean_image_auroc": float(np.mean([m["image_auroc"] for m in out.values()])),
        "mean_pixel_auroc": float(np.mean([m["pixel_auroc"] for m in out.values()])),
        "seconds": time.perf_counter() - t0,
    }


def format_table(report: dict) -> str:
    """Per category and defect: image AUROC, pixel AUROC, AUPRO; then the means."""
    lines = [f"{'category':<10}{'defect':<14}{'image AUROC':>12}{'pixel AUROC':>13}{'AUPRO':>8}"]
    for name, m in report["categories"].items():
        lines.append(
            f"{name:<10}{'(all)':<14}{m['image_auroc']:>12.3f}{m['pixel_auroc']:>13.3f}{m['aupro']:>8.3f}"
        )
        for d, v in m["per_defect"].items():
            lines.append(
                f"{'':<10}{d:<14}{v['image_auroc']:>12.3f}{v['pixel_auroc']:>13.3f}{v['aupro']:>8.3f}"
            )
    lines.append(
        f"mean image AUROC {report['mean_image_auroc']:.3f}, mean pixel AUROC "
        f"{report['mean_pixel_auroc']:.3f}, {report['seconds']:.0f} s"
    )
    return "\n".join(lines)


def compare(reports: dict[str, dict]) -> str:
    """Reports of several runs side by side: image / pixel AUROC per category and defect, then what
    ``"auto"`` chose in each run and category.

    Args:
        reports: column name -> a report of :func:`run` (its JSON); the first one's rows are shown.
    """
    names = list(reports)
    first = next(iter(reports.values()))
    head = "".join(f"{n[:17]:>18}" for n in names)
    lines = [f"{'image / pixel AUROC':<24}{head}"]

    def row(label, get):
        cells = []
        for n in names:
            v = get(reports[n])
            cells.append(f"{v['image_auroc']:>9.3f}{v['pixel_auroc']:>9.3f}" if v else f"{'-':>18}")
        lines.append(f"{label:<24}{''.join(cells)}")

    for cat, m in first["categories"].items():
        row(f"{cat}", lambda r, c=cat: r["categories"].get(c))
        for d in m["per_defect"]:
            row(f"  {d}", lambda r, c=cat, d=d: r["categories"].get(c, {}).get("per_defect", {}).get(d))
    row("mean", lambda r: {"image_auroc": r["mean_image_auroc"], "pixel_auroc": r["mean_pixel_auroc"]})
    for n, report in reports.items():
        for cat, m in report["categories"].items():
            if m.get("auto"):
                chosen = ", ".join(f"{k}={v}" for k, v in m["auto"]["chosen"].items())
                lines.append(f"{n}: {cat} auto chose {chosen}{' (fallback)' if m['auto']['fallback'] else ''}")
    return "\n".join(lines)


def _read_report(item: str) -> tuple[str, dict]:
    """``[NAME=]REPORT.json`` -> (column name, report); ValueError for a file that is not a report."""
    name, _, path = item.rpartition("=")
    try:
        report = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(report, dict) or not {"categories", "mean_image_auroc", "mean_pixel_auroc"} <= set(report):
        raise ValueError(f"{path} is not a benchmark-quality report")
    return name or Path(path).stem, report


def _param(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> (name, value), the value read as the parameter table says (:mod:`.params`)."""
    from .params import parse_value

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, parse_value(name, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from .cli import _Help, _number, _Parser

    p = _Parser(prog="dinopatch benchmark-quality", formatter_class=_Help, allow_abbrev=False,
                description="The harder synthetic benchmark (weave, circuit, comb): image AUROC, pixel AUROC "
                            "and AUPRO per category and defect, with the detector's own settings.")
    count = _number(int, 1, 10_000)
    p.add_argument("-o", "--output", default="benchmark-quality.json", help="JSON report to write")
    p.add_argument("--force", action="store_true", help="replace the report if it exists")
    p.add_argument("--weights", default="pretrained", help="'pretrained', 'random' or a checkpoint path")
    p.add_argument("--size", type=_number(int, 64, 4096), default=224,
                   help="rendered image side in pixels; also the backbone input unless -p image_size=N")
    p.add_argument("--seed", type=int, default=0, help="seeds the rendered images")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES,
                   help="categories to run")
    p.add_argument("--n-train", type=count, default=20, help="good training images per category")
    p.add_argument("--n-test-good", type=count, default=10, help="good test images per category")
    p.add_argument("--n-test-defect", type=count, default=5, help="test images per defect type")
    p.add_argument("-p", "--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="a detector parameter, e.g. -p tolerance=0 -p score=p99 -p foreground=off "
                        "(repeatable; the last of a name wins; `dinopatch fit -h` lists them)")
    p.add_argument("--compare", nargs="+", metavar="[NAME=]REPORT.json",
                   help="print earlier reports side by side instead of running")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    """``dinopatch benchmark-quality``; a mistake is one line on stderr and exit code 2."""
    from .backbone import WeightsUnavailableError
    from .cli import EXIT_USAGE
    from .outputs import claim

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.compare:
            print(compare(dict(_read_report(item) for item in args.compare)))
            return 0
        if "weights" in dict(args.param):
            raise ValueError("give the weights with --weights, not -p weights=...")
        claim([Path(args.output)], args.force)
        report = run(dict(args.param, weights=args.weights), categories=args.categories, size=args.size,
                     seed=args.seed, n_train=args.n_train, n_test_good=args.n_test_good,
                     n_test_defect=args.n_test_defect)
        Path(args.output).write_text(json.dumps(report, indent=1, default=float))
    except (ValueError, OSError, WeightsUnavailableError) as e:
        if args.debug:
            raise
        print(f"dinopatch: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table(report))
    print(f"report: {Path(args.output).resolve()}")
    return 0 if all(math.isfinite(m["image_auroc"]) for m in report["categories"].values()) else 1
