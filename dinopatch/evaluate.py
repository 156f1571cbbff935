"""Evaluation you can trust: tune post-processing on one part of the test set, report on the other.

The seed tuned its post-processing on the very images it reported.  Here the
test images are split, stratified by defect type and seeded, into a tuning
part and a disjoint reporting part; the sweep (Gaussian sigma, image score,
decision threshold, pixel threshold and morphology kernel) sees only the
tuning part.  Tuning on the reported images takes an explicit
``tune_on_report=True``, and the report then says it is optimistic.
"""
from __future__ import annotations

import dataclasses
import html
import json
import numbers
import os
from contextlib import closing
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import metrics, pose_report
from .calibration import Threshold, measured_with, tuned_mask, tuned_threshold
from .data import read_image, read_mask, write_png
from .evidence import reach
from .inputs import MVTEC_LAYOUT
from .postprocess import SCORES
from .viz import overlay, plot_curves, plot_histogram

SIGMAS = (2.0, 4.0, 8.0)
MORPH_KERNELS = (1, 3, 5, 9)
PIXEL_QUANTILES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
# Below this many reported images of one kind (good or a defect type), the
# report warns that its figures for that kind say little.
FEW_IMAGES = 10


def check_layout(folder, *, need_train: bool = False) -> list:
    """The test items of ``folder``; ValueError naming the expected layout when there are none.

    Args:
        need_train: also require ``train/good`` images (to fit on).
    """
    items = folder.test_items()
    if not items:
        raise ValueError(f"{folder.root}: no test images; expected {MVTEC_LAYOUT}")
    if need_train:
        try:
            folder.train_paths()
        except ValueError as e:
            raise ValueError(f"{e}; expected {MVTEC_LAYOUT}") from None
    return items


def check_arguments(tune_fraction, threshold: str) -> None:
    """Raise before any work on arguments that would fail after every image was scored."""
    _check_tune_fraction(tune_fraction)
    if threshold not in ("tuned", "good"):
        raise ValueError(f"threshold must be 'tuned' or 'good', got {threshold!r}")


def _check_tune_fraction(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"tune_fraction must be a number in (0, 1), got {value!r}")


def split(defects: list[str], tune_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of test items by defect type: ``(tune, report)`` index arrays.

    Each type with at least two images gives ``round(tune_fraction * n)`` of
    them (at least one, at most ``n - 1``) to tuning; a lone image is reported.
    """
    _check_tune_fraction(tune_fraction)
    rng = np.random.default_rng(seed)
    defects = np.asarray(defects)
    tune = []
    for d in sorted(set(defects.tolist())):
        idx = rng.permutation(np.flatnonzero(defects == d))
        if idx.size >= 2:
            tune += idx[: min(idx.size - 1, max(1, round(tune_fraction * idx.size)))].tolist()
    tune = np.sort(np.array(tune, int))
    return tune, np.setdiff1d(np.arange(defects.size), tune)


def _image_metrics(labels, scores, predicted) -> dict:
    finite = np.isfinite(scores)
    y, s = labels[finite], scores[finite]
    best_t, best_f1 = metrics.best_f1_threshold(y, s) if y.any() else (float("nan"), float("nan"))
    return {"image_auroc": metrics.auroc(y, s), "average_precision": metrics.average_precision(y, s),
            **metrics.binary_report(labels, predicted), "best_f1_threshold": best_t, "best_f1": best_f1,
            "n_good": int((~labels).sum()), "n_defect": int(labels.sum()), "n_unscored": int((~finite).sum())}


def _pixel_metrics(gts, maps, preds) -> dict:
    if not any(g.any() for g in gts):
        return dict.fromkeys(("pixel_auroc", "aupro", "aupro_05", "pixel_f1"), float("nan"))
    y = np.concatenate([g.ravel() for g in gts])
    return {"pixel_auroc": metrics.auroc(y, np.concatenate([m.ravel() for m in maps])),
            "aupro": metrics.aupro(gts, maps, fpr_limit=0.3), "aupro_05": metrics.aupro(gts, maps, fpr_limit=0.05),
            "pixel_f1": metrics.seg_f1(gts, preds)}


def _line(det, raws, labels, gts, defects) -> dict:
    """The detector's own verdicts, nothing tuned, on every test image: what a line would see.

    Good parts rejected and defects caught at the model's threshold (overall and per defect type),
    and SegF1 of the masks at the model's own mask threshold.
    """
    results = [det.result_from(r) for r in raws]
    flagged = np.array([r.is_anomaly for r in results], bool)
    per_defect = {}
    for d in sorted(set(defects) - {"good"}):
        idx = np.array([x == d for x in defects])
        counts = metrics.line_counts(labels[idx], flagged[idx])
        per_defect[d] = {k: counts[k] for k in ("defects_caught", "n_defect")}
    return {**metrics.line_counts(labels, flagged), "per_defect": per_defect,
            "seg_f1": metrics.seg_f1(gts, [r.mask for r in results]),
            "threshold": det.threshold_.image, "threshold_source": det.threshold_.describe(),
            "mask_source": det.threshold_.describe_mask()}


def _tune(det, raws, labels, gts, threshold: str) -> dict:
    """Choose the post-processing on the tuning part only; with an empty tuning part, the detector's own."""
    # What fit settled on: the constructor may say "auto" (see DinoPatch.auto_).
    chosen = (det.auto_ or {}).get("chosen", {})
    own = {k: chosen.get(k, getattr(det, k)) for k in ("sigma", "score", "morph_kernel")}
    if not raws:
        sweep = _mask_sweep([], [], det.threshold_.pixel, own["morph_kernel"])
        return dict(own, threshold=det.threshold_.image, pixel_threshold=det.threshold_.pixel, mask_sweep=sweep)
    # The detector's own settings come first: they stand when the tuning part
    # cannot rank (one class only), and ties keep them.
    best, best_auc = None, -np.inf
    for sigma, score in [(own["sigma"], own["score"])] + [(g, s) for g in SIGMAS for s in SCORES]:
        s = np.array([det.result_from(r, sigma=sigma, score=score).score for r in raws])
        auc = metrics.auroc(labels[np.isfinite(s)], s[np.isfinite(s)])
        if best is None or auc > best_auc + 1e-12:
            best, best_auc, best_scores = dict(sigma=sigma, score=score), auc, s
    finite = np.isfinite(best_scores)
    if threshold == "tuned" and labels[finite].any() and (~labels[finite]).any():
        best["tuning"] = (best_scores[finite], labels[finite])
        best["threshold"] = tuned_threshold(labels[finite], best_scores[finite], reach(det.model_.bank.features))
    else:
        # The good parts' own threshold, read from their held-out maps scored as the tuned settings score.
        best["threshold"] = det.threshold_.rescored(dataclasses.replace(det.model_.post, **best)).image
    maps = [det.result_from(r, sigma=best["sigma"], score=best["score"]).anomaly_map for r in raws]
    best["mask_sweep"] = _mask_sweep(maps, gts, det.threshold_.pixel, own["morph_kernel"])
    best["pixel_threshold"], best["morph_kernel"] = tuned_mask(*best["mask_sweep"])
    return best


def _mask_sweep(maps: list[np.ndarray], gts: list[np.ndarray], pixel: float, kernel: int) -> tuple:
    """The mask sweep on the tuning images' ``maps`` and labelled masks ``gts``: the kernels ``[K]`` and map
    thresholds ``[C]`` tried (``pixel``, the model's own, and quantiles of the maps) and the pixels' ``(tp, fp,
    fn)`` with each pair ``[K, C, 3]`` (:func:`.calibration.tuned_mask` picks the best); without a labelled
    defect pixel, the model's own ``pixel`` and ``kernel`` alone."""
    if not any(g.any() for g in gts):
        return np.array([kernel], np.int64), np.array([pixel], np.float64), np.zeros((1, 1, 3), np.int64)
    from .postprocess import segment

    candidates = sorted({pixel} | set(np.quantile(np.concatenate([m.ravel() for m in maps]), PIXEL_QUANTILES).tolist()))
    candidates = np.array([c for c in candidates if np.isfinite(c)], np.float64)
    y = np.concatenate([g.ravel() for g in gts])
    counts = [[metrics.confusion(y, np.concatenate([segment(m, t, k).ravel() for m in maps])) for t in candidates]
              for k in MORPH_KERNELS]
    return np.array(MORPH_KERNELS, np.int64), candidates, np.array(counts, np.int64)


def evaluate(det, folder, out: str | os.PathLike, *, tune_fraction: float = 0.5, seed: int = 0,
             threshold: str = "tuned", tune_on_report: bool = False, progress: bool = True,
             save_model: str | os.PathLike | None = None) -> dict:
    """Score ``folder``'s test images, tune on one part, report on the other.

    Args:
        det: a fitted :class:`~dinopatch.DinoPatch`.
        folder: a :class:`~dinopatch.data.MVTecFolder`.
        out: report folder: ``metrics.json``, ``index.html``, ``roc.png``,
            ``pr.png``, ``hist.png``, ``pose.png`` (aligned parts) and ``overlays/`` (one PNG per test image).
        tune_fraction: share of each defect type used for tuning.
        seed: seeds the split.
        threshold: ``"tuned"`` (best F1 on the tuning part) or ``"good"`` (the
            detector's own threshold from held-out good parts, at its
            ``false_alarm_rate``; no defect sample needed).
        tune_on_report: tune and report on all images; the report is then
            marked optimistic.
        save_model: write the detector with the tuned threshold and
            post-processing to this model file; its threshold source names
            this evaluation's split.

    Returns:
        the content of ``metrics.json``: the reported metrics at top level,
        plus ``tuned`` (the same metrics on the tuning part), ``settings``,
        ``split``, ``per_defect`` and ``line``: the detector's own verdicts on
        every test image, nothing tuned (good parts rejected and defects caught
        at its threshold, per defect type too, and SegF1 of its own masks), ``pose``: fit's pose report
        (:func:`.pose_report.summary`; None where parts are not aligned) and ``registration``: with alignment
        off, whether and how the frames were registered (:meth:`.register.Registration.describe`; else None).
    """
    check_arguments(tune_fraction, threshold)
    items = check_layout(folder)
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    raws = []
    with closing(det.batches([it.path for it in items])) as batches:  # overlapped where det.overlap says so
        for batch in tqdm(batches, total=-(-len(items) // det.batch_size), desc="evaluate", disable=not progress,
                          leave=False):
            raws.extend(batch)
    images = [read_image(it.path) for it in items]
    gts = [read_mask(it.mask_path, im.shape[:2]) if it.mask_path else np.zeros(im.shape[:2], bool)
           for it, im in zip(items, images)]
    labels = np.array([it.label for it in items], bool)
    defects = [it.defect for it in items]

    if tune_on_report:
        tune = report = np.arange(len(items))
    else:
        tune, report = split(defects, tune_fraction, seed)
    line = _line(det, raws, labels, gts, defects)
    settings = _tune(det, [raws[i] for i in tune], labels[tune], [gts[i] for i in tune], threshold)
    post = {k: settings[k] for k in ("sigma", "score", "morph_kernel")}
    tuning = settings.pop("tuning", None)
    sweep = dict(zip(("mask_kernels", "mask_thresholds", "mask_counts"), settings.pop("mask_sweep")))
    if tuning is not None:
        source = {"method": "evaluation", "images": len(tune), "split": "all test images (optimistic)"
                  if tune_on_report else f"tuning split of {folder.root}, fraction {tune_fraction:g}, seed {seed}"}
        tuned_threshold = Threshold(settings["threshold"], settings["pixel_threshold"], source,
                                    measured_with=measured_with(dataclasses.replace(det.model_.post, **post)),
                                    tuning_scores=tuning[0], tuning_labels=tuning[1], pixel_tuned=True, **sweep)
    else:
        # The image threshold is still the calibrated one, read with the tuned settings: keep its
        # evidence, which a model file must carry.  The mask is the tuned value alone.
        tuned_threshold = dataclasses.replace(det.threshold_.rescored(dataclasses.replace(det.model_.post, **post)),
                                              pixel=settings["pixel_threshold"], pixel_tuned=True, **sweep)
    settings["threshold_source"] = tuned_threshold.describe()
    results = [det.result_from(r, threshold=settings["threshold"], pixel_threshold=settings["pixel_threshold"], **post)
               for r in raws]
    scores = np.array([r.score for r in results], np.float64)
    predicted = np.array([r.is_anomaly for r in results], bool)

    def part(idx):
        return {**_image_metrics(labels[idx], scores[idx], predicted[idx]),
                **_pixel_metrics([gts[i] for i in idx], [results[i].anomaly_map for i in idx],
                                 [results[i].mask for i in idx])}

    good_report = [i for i in report if not labels[i]]
    per_defect = {}
    for d in sorted(set(defects) - {"good"}):
        idx = [i for i in report if defects[i] == d]
        if idx:
            both = np.array(good_report + idx)
            per_defect[d] = {"n": len(idx), "image_auroc": metrics.auroc(labels[both], scores[both]),
                             "recall": float(predicted[idx].mean()),
                             **_pixel_metrics([gts[i] for i in idx], [results[i].anomaly_map for i in idx],
                                              [results[i].mask for i in idx])}
    tuned_set = set(tune.tolist()) if not tune_on_report else set()
    report_metrics = {
        **part(report),
        "warnings": _few_images_warnings(defects, report),
        "optimistic": bool(tune_on_report),
        "threshold_from": threshold,
        "line": line,
        "settings": settings,
        "tuned": part(tune),
        "per_defect": per_defect,
        "split": {"seed": seed, "tune_fraction": tune_fraction,
                  "tune": [str(items[i].path) for i in tune], "report": [str(items[i].path) for i in report]},
        "detector": {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in det.get_params().items()},
        "auto": det.auto_,  # what fit chose for the "auto" parameters, and its evidence
        "images": [{"path": str(it.path), "defect": it.defect, "label": int(it.label), "score": r.score,
                    "is_anomaly": bool(r.is_anomaly), "aligned": bool(r.aligned),
                    "part": "tune" if i in tuned_set else "report"}
                   for i, (it, r) in enumerate(zip(items, results))],
    }
    if save_model is not None:
        report_metrics["saved_model"] = os.fspath(det.tuned(tuned_threshold, **post).save(save_model))
    _write_pictures(out, items, images, gts, results, scores, labels, report, settings, folder)
    report_metrics["pose"] = pose_report.write(det.model_, out)
    registration = det.model_.aligner.registration_
    report_metrics["registration"] = None if registration is None else registration.describe()
    # Strict JSON: a metric that cannot be computed (one class only) is null, not NaN.
    report_metrics = _json_safe(report_metrics)
    with open(out / "metrics.json", "w") as f:
        json.dump(report_metrics, f, indent=1, allow_nan=False)
    _write_html(out, report_metrics, items, folder)
    return report_metrics


def _few_images_warnings(defects: list[str], report: np.ndarray) -> list[str]:
    reported = [defects[i] for i in report]
    return [f"test/{d}: {reported.count(d)} reported image(s), fewer than {FEW_IMAGES}: its figures say little"
            for d in sorted(set(defects)) if reported.count(d) < FEW_IMAGES]


def _json_safe(value):
    """``value`` with numpy scalars as Python numbers and every NaN or infinity as None."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    return value


def _write_pictures(out, items, images, gts, results, scores, labels, report, settings, folder):
    thr = settings["pixel_threshold"]
    vmax = 2 * thr if np.isfinite(thr) and thr > 0 else float(np.nanmax([r.anomaly_map.max() for r in results]))
    for it, im, gt, r in zip(items, images, gts, results):
        caption = f"{'FLAGGED' if r.is_anomaly else 'passed'} {r.score:.2f}{'' if r.aligned else ' unaligned'}"
        pic = overlay(im, r.anomaly_map, vmax=vmax, gt_mask=gt, pred_mask=r.mask, text=caption)
        write_png(out / "overlays" / f"{it.defect}_{Path(it.path).stem}.png", pic)
    finite = np.isfinite(scores[report])
    y, s = labels[report][finite], scores[report][finite]
    name = Path(folder.root).name
    plot_curves(y, s, out, title=name)
    plot_histogram(s[~y], s[y], settings["threshold"], out / "hist.png", title=f"{name}: image scores (reported part)")


# The metrics of metrics.json as the page names them.
METRIC_NAMES = {
    "image_auroc": "Image AUROC (how well scores rank defects above good parts)",
    "average_precision": "Average precision of the image scores",
    "f1": "F1 of the verdicts", "precision": "Precision of the verdicts (flagged parts that are defective)",
    "recall": "Recall of the verdicts (defects flagged)", "accuracy": "Accuracy of the verdicts",
    "pixel_auroc": "Pixel AUROC of the anomaly maps",
    "aupro": "AU-PRO of the maps up to 30% false-positive pixels",
    "aupro_05": "AU-PRO of the maps up to 5% false-positive pixels",
    "pixel_f1": "SegF1 of the masks (F1 of defect pixels)",
    "n_good": "Good images", "n_defect": "Defective images",
}


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _counts(line: dict) -> str:
    """The line's counts in words, e.g. "0 of 10 good parts rejected, 16 of 16 defects caught"."""
    return (f"{line['good_rejected']} of {line['n_good']} good parts rejected, "
            f"{line['defects_caught']} of {line['n_defect']} defects caught")


def line_summary(m: dict) -> str:
    """The line's counts of an evaluation's ``metrics.json`` as the command line prints them (<= 100 columns)."""
    line = m["line"]
    rows = [f"at the model's threshold {line['threshold']:.4g}: {_counts(line)}"]
    rows += [f"  {d:<24}{v['defects_caught']:>4} of {v['n_defect']:<4} caught" for d, v in line["per_defect"].items()]
    return "\n".join(rows)


def _write_html(out: Path, m: dict, items, folder) -> None:
    esc, line = html.escape, m["line"]
    rows = "".join(f"<tr><td class=l>{METRIC_NAMES[k]}</td><td>{_fmt(m['tuned'][k])}</td>"
                   f"<td><b>{_fmt(m[k])}</b></td></tr>" for k in METRIC_NAMES)
    per = "".join(f"<tr><td class=l>{esc(d)}</td><td><b>{line['per_defect'][d]['defects_caught']} of "
                  f"{line['per_defect'][d]['n_defect']}</b></td><td>{v['n']}</td><td>{_fmt(v['image_auroc'])}</td>"
                  f"<td>{_fmt(v['recall'])}</td><td>{_fmt(v['pixel_auroc'])}</td><td>{_fmt(v['aupro'])}</td>"
                  f"<td>{_fmt(v['aupro_05'])}</td></tr>" for d, v in m["per_defect"].items())
    words = {"sigma": "map smoothing (sigma, px)", "score": "image score", "threshold": "image threshold",
             "pixel_threshold": "mask threshold", "morph_kernel": "mask clean-up kernel (px)",
             "threshold_source": "threshold from"}
    settings = "; ".join(f"{words[k]}: {_fmt(v)}" for k, v in m["settings"].items())
    warn = ("<p class=warn><b>Optimistic:</b> tuned on the reported images.</p>" if m["optimistic"] else "")
    if m["auto"]:
        chosen = ", ".join(f"{k} = {_fmt(v)}" for k, v in m["auto"]["chosen"].items())
        fallback = " (too few good images to measure: the defaults)" if m["auto"]["fallback"] else ""
        warn += f"<p>Chosen at fit from good parts alone (\"auto\"): {esc(chosen)}{fallback}</p>"
    if m["warnings"]:
        warn += f"<p class=warn><b>Few images:</b> {'; '.join(esc(w) for w in m['warnings'])}</p>"
    thumbs = "".join(
        f"<figure><a href='{src}'><img src='{src}' width=200></a><figcaption>{esc(it.defect)}<br>"
        f"{'flagged' if im['is_anomaly'] else 'passed'}, score {_fmt(im['score'])}</figcaption></figure>"
        for it, im in zip(items, m["images"])
        for src in [f"overlays/{esc(it.defect)}_{esc(Path(it.path).stem)}.png"])
    style = ("body{font-family:sans-serif;margin:2em;color:#111;background:#fff;max-width:1200px} "
             "table{border-collapse:collapse} td,th{border:1px solid #bbb;padding:4px 10px;text-align:right} "
             "td.l,th.l{text-align:left} .lead{font-size:1.7em;font-weight:bold;margin:.3em 0} "
             ".box{border:2px solid #333;background:#f4f4f4;padding:.8em 1.2em;margin:1em 0} "
             ".warn{color:#a00} figure{display:inline-block;margin:4px;width:200px;vertical-align:top} "
             "figcaption{font-size:15px;color:#111;background:#eee;padding:2px 4px} "
             ".pose img{vertical-align:top;margin:0 1em 1em 0} .pose table{display:inline-table;max-width:640px}")
    name = esc(Path(folder.root).name)
    caught = ", ".join(f"{esc(d)} {v['defects_caught']} of {v['n_defect']}" for d, v in line["per_defect"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>DinoPatch evaluation: {name}</title><style>{style}</style></head><body>
<h1>DinoPatch evaluation: {name}</h1>
<div class=box><p class=lead>{_counts(line)}</p>
<p>At the model's own threshold ({_fmt(line['threshold'])}: {esc(line['threshold_source'])}), on all
{line['n_good'] + line['n_defect']} test images; nothing was tuned on them for these counts.
Caught by defect type: {caught or 'no defective images'}.
SegF1 of the model's own masks ({esc(line['mask_source'])}): {_fmt(line['seg_f1'])}.</p></div>{warn}
<h2>Tuned on part of the test set</h2>
<p>Post-processing and threshold ({esc(m['threshold_from'])}) tuned on {len(m['split']['tune'])} test images,
metrics reported on the other {len(m['split']['report'])}
(stratified by defect type, seed {m['split']['seed']}).<br>Chosen: {settings}.</p>
<table><tr><th class=l>metric</th><th>tuning part</th><th>reported part</th></tr>{rows}</table>
<h2>Per defect type</h2>
<table><tr><th class=l>defect type</th><th>caught at the model's threshold (all images)</th>
<th>reported images</th><th>image AUROC against good</th><th>recall, tuned</th><th>pixel AUROC</th>
<th>AU-PRO to 30%</th><th>AU-PRO to 5%</th></tr>{per}</table>
{pose_report.panel(m['pose'], m['registration'])}
<h2>Curves (reported part)</h2><img src="roc.png"> <img src="pr.png"> <img src="hist.png">
<h2>Every test image</h2><p>Heat: anomaly map; green outline: ground truth; magenta outline: predicted defect
(tuned settings).</p>{thumbs}
</body></html>"""
    # A file name that is not valid UTF-8 keeps its bytes, so the page's links still find its overlay.
    (out / "index.html").write_text(page, encoding="utf-8", errors="surrogateescape")
