"""The harder synthetic benchmark's run: ``dinopatch benchmark-quality``.

:func:`run` fits a detector per category of :mod:`dinopatch.benchmark_sets` on
good parts only and reports, per category and per defect, what a line sees at
the model's own threshold (defects caught, good parts rejected) beside image
AUROC, pixel AUROC, AU-PRO (to 30% and 5%) and SegF1, with the detector's own
settings (no tuning on the test images).  :func:`run_few_shot` does the same
with 1, 2, 4 and 8 good images drawn (seeded) from one rendered training set.
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
from .benchmark_sets import ALIGN, CATEGORIES, check_defect, make_set

# Good images per category in the few-shot protocol.
SHOTS = (1, 2, 4, 8)


def _pixel(masks, maps, predicted) -> dict:
    y = np.concatenate([m.ravel() for m in masks])
    if not y.any():
        return dict.fromkeys(("pixel_auroc", "aupro", "aupro_05", "seg_f1"), float("nan"))
    return {
        "pixel_auroc": metrics.auroc(y, np.concatenate([a.ravel() for a in maps])),
        "aupro": metrics.aupro(masks, maps, fpr_limit=0.3),
        "aupro_05": metrics.aupro(masks, maps, fpr_limit=0.05),
        "seg_f1": metrics.seg_f1(masks, predicted),
    }


def score_category(det, data: dict, train=None) -> dict:
    """Fit ``det`` on the category's good parts; metrics of its own settings and threshold on the test images.

    Args:
        train: the good images to fit on (default: all of ``data["train"]``).

    Returns:
        image AUROC, the line's counts at the model's threshold (:func:`.metrics.line_counts`) and the
        pixel metrics, overall and per defect; ``threshold_source`` says what the threshold promises.
    """
    t0 = time.perf_counter()
    det.fit(data["train"] if train is None else train)
    results = det.predict(data["test"])
    seconds = time.perf_counter() - t0
    scores = np.array([r.score for r in results])
    flagged = np.array([r.is_anomaly for r in results])
    maps, masks = [r.anomaly_map for r in results], [r.mask for r in results]
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
            "defects_caught": int(flagged[idx].sum()),
            **_pixel([data["masks"][i] for i in idx], [maps[i] for i in idx], [masks[i] for i in idx]),
        }
    return {
        "image_auroc": metrics.auroc(labels, scores),
        **metrics.line_counts(labels, flagged),
        **_pixel(data["masks"], maps, masks),
        "threshold_source": det.threshold_.describe(),
        "per_defect": per_defect,
        "seconds": seconds,
        "n_train": len(data["train"] if train is None else train),
        "n_test": len(data["test"]),
        "auto": det.auto_,
    }


def _detectors(params: dict | None, categories, size: int) -> tuple[dict, dict]:
    """Checked parameters and one unfitted detector per category; ValueError before any work."""
    from .detector import DinoPatch
    from .fitted import check_params

    params = dict(params or {})
    known = set(inspect.signature(DinoPatch).parameters)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown detector parameter(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if "align" in params:
        raise ValueError("align is set per category (weave and circuit off, comb on); leave it out of params")
    for name in categories:
        check_defect(name, "good", size)
    params.setdefault("image_size", size)
    params.setdefault("progress", False)
    # Built first so that a bad parameter fails before the minutes of rendering and fitting.
    detectors = {name: DinoPatch(**dict(params, align=ALIGN[name])) for name in categories}
    for det in detectors.values():
        check_params(det.get_params())
    return params, detectors


def _check_counts(**counts) -> None:
    for name, n in counts.items():
        if int(n) < 1:
            raise ValueError(f"{name} must be at least 1, got {n}")


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
        ``{"params", "categories": {name: metrics}, "mean_image_auroc", "mean_pixel_auroc", "mean_recall",
        "good_rejected", "n_good", "seconds"}``: ``mean_recall`` is the mean over categories of the share
        of defects caught at the model's own threshold, ``good_rejected`` of ``n_good`` the good test
        parts it flagged (see :func:`score_category`).

    Raises:
        ValueError: an unknown category or parameter, a value out of range, ``align`` among ``params``,
            or a count below 1, before any image is rendered.
    """
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    params, detectors = _detectors(params, categories, size)
    t0 = time.perf_counter()
    out = {}
    for name, det in detectors.items():
        data = make_set(
            name, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, size=size, seed=seed
        )
        out[name] = score_category(det, data)
        if progress:
            m = out[name]
            progress(f"{name}: image AUROC {m['image_auroc']:.3f}, {m['defects_caught']} of {m['n_defect']} "
                     f"defects caught, {m['good_rejected']} of {m['n_good']} good rejected ({m['seconds']:.0f} s)")
    return {
        "params": {k: str(v) for k, v in params.items()},
        "categories": out,
        "mean_image_auroc": float(np.mean([m["image_auroc"] for m in out.values()])),
        "mean_pixel_auroc": float(np.mean([m["pixel_auroc"] for m in out.values()])),
        "mean_recall": float(np.mean([m["defects_caught"] / m["n_defect"] for m in out.values()])),
        "good_rejected": sum(m["good_rejected"] for m in out.values()),
        "n_good": sum(m["n_good"] for m in out.values()),
        "seconds": time.perf_counter() - t0,
    }


def run_few_shot(params: dict | None = None, *, categories=CATEGORIES, shots=SHOTS, size: int = 224, seed: int = 0,
                 n_test_good: int = 10, n_test_defect: int = 5, progress=print) -> dict:
    """The few-shot protocol: each category fitted on ``k`` good images for each ``k`` in ``shots``.

    The ``k`` images are drawn, seeded by ``(seed, k)``, from one training set of ``max(shots)``
    rendered images; every ``k`` is scored on the same test images.  With one good image no
    threshold can be calibrated (leave-one-out needs two): that row has image AUROC and the
    threshold-free pixel metrics; its counts and SegF1 are None and its ``note`` says why.

    Returns:
        ``{"params", "shots", "few_shot": {category: {str(k): metrics}}, "seconds"}``.
    """
    shots = sorted({int(k) for k in shots})
    _check_counts(shots=min(shots, default=0), n_test_good=n_test_good, n_test_defect=n_test_defect)
    params, detectors = _detectors(params, categories, size)
    t0 = time.perf_counter()
    out = {}
    for name, det in detectors.items():
        data = make_set(name, n_train=max(shots), n_test_good=n_test_good, n_test_defect=n_test_defect, size=size,
                        seed=seed)
        out[name] = {}
        for k in shots:
            train = [data["train"][i] for i in np.random.default_rng([seed, k]).permutation(max(shots))[:k]]
            calibrated = k >= 2 or params.get("threshold") is not None
            # One image: any threshold ranks the same; the counts at it would mean nothing and are dropped.
            m = score_category(det if calibrated else det.set_params(threshold=1.0), data, train)
            if not calibrated:
                det.set_params(threshold=None)
                m.update(good_rejected=None, defects_caught=None, seg_f1=None, threshold_source=None,
                         note="1 good image: no threshold can be calibrated (needs 2)")
                for v in m["per_defect"].values():
                    v.update(defects_caught=None, seg_f1=None)
            out[name][str(k)] = m
            if progress:
                progress(f"{name}, {k} good: image AUROC {m['image_auroc']:.3f} ({m['seconds']:.0f} s)")
    return {"params": {k: str(v) for k, v in params.items()}, "shots": shots, "few_shot": out,
            "seconds": time.perf_counter() - t0}


def _cells(m: dict, good: bool = True) -> str:
    """One table row's numbers: AUROC, caught, rejected, pixel metrics (a value that is None shows "-")."""
    def frac(a, b):
        return "-" if a is None else f"{a}/{b}"

    rejected = frac(m["good_rejected"], m["n_good"]) if good else ""
    return (f"{m['image_auroc']:>7.3f}{frac(m['defects_caught'], m.get('n_defect', m.get('n'))):>8}{rejected:>9}"
            f"{m['pixel_auroc']:>10.3f}{m['aupro']:>9.3f}{m['aupro_05']:>8.3f}"
            f"{'-' if m['seg_f1'] is None else format(m['seg_f1'], '.3f'):>7}")


HEADER = f"{'AUROC':>7}{'caught':>8}{'rejected':>9}{'pix AUROC':>10}{'AU-PRO':>9}{'AUPRO5':>8}{'SegF1':>7}"
LEGEND = ("caught: defects flagged, rejected: good parts flagged, both at the model's own threshold\n"
          "AUROC: image AUROC; AU-PRO, AUPRO5: AU-PRO to 30% and to 5% false-positive pixels\n"
          "SegF1: pixel F1 of the model's own masks")


def format_table(report: dict) -> str:
    """Per category and defect: the line's counts beside the AUROCs and pixel metrics; then the means.

    Fits 100 columns.
    """
    lines = [f"{'category':<10}{'defect':<14}{HEADER}"]
    for name, m in report["categories"].items():
        lines.append(f"{name:<10}{'(all)':<14}{_cells(m)}")
        for d, v in m["per_defect"].items():
            lines.append(f"{'':<10}{d[:13]:<14}{_cells(v, good=False)}")
    lines.append(f"mean image AUROC {report['mean_image_auroc']:.3f}, mean pixel AUROC "
                 f"{report['mean_pixel_auroc']:.3f}, {report['seconds']:.0f} s")
    lines.append(f"at the model's threshold: mean recall {report['mean_recall']:.3f}, "
                 f"{report['good_rejected']} of {report['n_good']} good parts rejected")
    return "\n".join(lines + [LEGEND])


def format_few_shot(report: dict) -> str:
    """Per category and number of good images: the counts at the model's threshold beside the AUROCs."""
    lines, notes = [f"{'category':<10}{'good':>5}  {HEADER}"], []
    for name, by_k in report["few_shot"].items():
        for k, m in by_k.items():
            mark = ""
            if m.get("note"):  # a footnote, so that the rows keep within 100 columns
                notes += [] if m["note"] in notes else [m["note"]]
                mark = " " + "*" * (notes.index(m["note"]) + 1)
            lines.append(f"{name:<10}{k:>5}  {_cells(m)}{mark}")
    for k in report["shots"]:
        rows = [by_k[str(k)] for by_k in report["few_shot"].values()]
        recall = ("-" if rows[0]["defects_caught"] is None else
                  f"{np.mean([m['defects_caught'] / m['n_defect'] for m in rows]):.3f}")
        lines.append(f"mean, {k} good: image AUROC {np.mean([m['image_auroc'] for m in rows]):.3f}, recall {recall}")
    lines += [f"{'*' * (i + 1)} {note}" for i, note in enumerate(notes)]
    return "\n".join(lines + [LEGEND])


def compare(reports: dict[str, dict]) -> str:
    """Reports of several runs side by side: image / pixel AUROC per category and defect, each run's
    recall and good parts rejected at the model's threshold, then what ``"auto"`` chose in each run and category.

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
        if "mean_recall" in report:  # reports written before the line's counts lack them
            lines.append(f"{n}: at the model's threshold, mean recall {report['mean_recall']:.3f}, "
                         f"{report['good_rejected']} of {report['n_good']} good parts rejected")
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
    from .cli import HelpFormatter, Parser, number_type

    p = Parser(prog="dinopatch benchmark-quality", formatter_class=HelpFormatter, allow_abbrev=False,
               description="The harder synthetic benchmark (weave, circuit, comb, wheel, wheel_size): per category "
                           "and defect, defects caught and good parts rejected at the model's own threshold beside "
                           "image AUROC, pixel AUROC, AU-PRO and SegF1, with the detector's own settings.")
    count = number_type(int, 1, 10_000)
    p.add_argument("-o", "--output", default="benchmark-quality.json", help="JSON report to write")
    p.add_argument("--force", action="store_true", help="replace the report if it exists")
    p.add_argument("--weights", default="pretrained", help="'pretrained', 'random' or a checkpoint path")
    p.add_argument("--size", type=number_type(int, 64, 4096), default=224,
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
    p.add_argument("--few-shot", nargs="*", type=count, metavar="K",
                   help="the few-shot protocol instead: fit on K good images (seeded draws from one set of "
                        f"max K), for each K given (none given: {' '.join(map(str, SHOTS))}); --n-train is unused")
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
        params, counts = dict(args.param, weights=args.weights), dict(
            categories=args.categories, size=args.size, seed=args.seed, n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect)
        if args.few_shot is not None:
            report = run_few_shot(params, shots=args.few_shot or SHOTS, **counts)
        else:
            report = run(params, n_train=args.n_train, **counts)
        Path(args.output).write_text(json.dumps(report, indent=1, default=float))
    except (ValueError, OSError, WeightsUnavailableError) as e:
        if args.debug:
            raise
        print(f"dinopatch: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    rows = [m for by_k in report["few_shot"].values() for m in by_k.values()] if args.few_shot is not None \
        else list(report["categories"].values())
    print(format_few_shot(report) if args.few_shot is not None else format_table(report))
    print(f"report: {Path(args.output).resolve()}")
    return 0 if all(math.isfinite(m["image_auroc"]) for m in rows) else 1
