"""Pipeline stages: synthetic screws through the detector (align, post, e2e, stream)."""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from dinopatch import kernels

from ..registry import calls, latency_row, paired_ratio, round_robin, stage, target


def good_frames(n: int, seed: int) -> list[np.ndarray]:
    from dinopatch.synthetic import make_images

    return make_images("screw", "good", n, seed)


def make_detector(args, **overrides):
    from dinopatch.detector import DinoPatch

    params = dict(
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        engine=args.engine,
        batch_size=args.batch,
        progress=False,
    )
    params.update(overrides)
    return DinoPatch(**params)


_FITTED: dict = {}


def _fitted(args):
    """The detector of the pipeline stages, fitted once per run on ``--bank`` good screws."""
    key = (args.backbone, args.weights, args.image_size, args.engine, args.batch, args.bank)
    if key not in _FITTED:
        _FITTED[key] = make_detector(args).fit(good_frames(args.bank, seed=1))
    return _FITTED[key]


@stage("align", groups=("pipeline",))
def bench_align(args) -> list[dict]:
    """Alignment of a 256 px frame into the canonical frame (OpenCV)."""
    from dinopatch.align import Aligner

    frames = good_frames(8, seed=2)
    aligner = Aligner(size=args.image_size).fit(good_frames(8, seed=1))
    times = [t for im in frames for t in calls(lambda im=im: aligner.transform(im), args.repeats)]
    return [latency_row("align", "opencv", times, note=f"256 px frame -> {args.image_size} px")]


@stage("post", groups=("pipeline",))
def bench_post(args) -> list[dict]:
    """Post-processing of one image's distances: upsample, smooth, score, map back, segment."""
    det = _fitted(args)
    raws = det.patch_distances(good_frames(4, seed=2))
    times = [t for raw in raws for t in calls(lambda raw=raw: det.result_from(raw), args.repeats)]
    return [latency_row("post", "opencv", times, note="256 px frame")]


def labelled(n: int, seed: int = 3) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """``(image, defect mask, defective)`` of ``n`` screws of each defect and ``2 n`` good ones."""
    from dinopatch.synthetic import DEFECTS, make_sample

    rng = np.random.default_rng(seed)
    kinds = ("good",) * 2 + DEFECTS["screw"]
    return [(*make_sample("screw", d, rng), d != "good") for d in kinds for _ in range(n)]


def aurocs(test: list, results: list) -> tuple[float, float]:
    """Image and pixel AUROC of predictions ``results`` of :func:`labelled` images ``test``."""
    from dinopatch.metrics import auroc

    labels = np.array([bad for _, _, bad in test])
    masks = np.concatenate([(m > 0).ravel() for _, m, _ in test])
    pixels = np.concatenate([r.anomaly_map.ravel() for r in results])
    return auroc(labels, np.array([r.score for r in results])), auroc(masks, pixels)


def kept(det) -> float:
    """Fraction of the patches a fitted detector's backbone runs on."""
    fg = det.model_.foreground
    return 1.0 if fg is None else fg.fraction


# The reference configuration the defaults are measured against: ONNX Runtime fp32 on every token.
REFERENCE = dict(engine="onnx", foreground=False)


@stage("e2e", groups=("pipeline",))
def bench_e2e(args) -> list[dict]:
    """End-to-end predict of the defaults, the reference configuration and a notebook-style pipeline, in one run.

    On aligned screws, good and each defect: the defaults (``--engine``,
    foreground tokens ``"auto"``), the reference configuration
    (:data:`REFERENCE`: ONNX Runtime fp32, every token), each fitted on
    the same ``--bank`` good screws, and the notebook way (eager torch one
    image at a time, numpy distances) on the defaults' fitted model, at equal
    scores.  With ``--engine auto``, also the engine the static rule of CPU
    flags picks (:func:`~dinopatch.backbone.auto_engine`) on the same fitted
    model, against the measured choice (its candidate table goes to stderr).
    And the defaults with ``overlap`` off (:mod:`dinopatch.overlap`), on the
    frames and on the same frames as PNG files, beside overlap on; their
    scores must be identical.  Predict is timed round-robin; the AUROCs are of
    the same calls.
    """
    from dinopatch import engine_choice
    from dinopatch.backbone import auto_engine

    det = _fitted(args)
    reference = make_detector(args, **REFERENCE).fit(good_frames(args.bank, seed=1))
    # The same fitted model, judged the notebook way.
    notebook = copy.copy(det).set_params(engine="torch", kernel="numpy", batch_size=1)
    test = labelled(1 if args.quick else 4)
    frames = [im for im, _, _ in test]
    folder = tempfile.mkdtemp(prefix="dinopatch-e2e-")
    dets = {"ours": det, "reference": reference, "notebook": notebook, **overlap_peers(det)}
    inputs = dict.fromkeys(("files", "files, in turn"), png_files(frames, folder))  # the others: frames
    record = det.model_.engine_choice
    if record is not None:  # engine "auto": the measured choice against the static rule of CPU flags
        print(engine_choice.table(record), file=sys.stderr)
        dets["static"] = make_detector(args, engine=auto_engine())
        dets["static"].model_ = det.model_  # the same fitted model
    out = {}
    try:
        times = round_robin({k: lambda k=k, d=d: out.__setitem__(k, d.predict(inputs.get(k, frames)))
                             for k, d in dets.items()}, max(1, args.repeats // 2))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    a, b = (np.array([r.score for r in out[k]]) for k in ("ours", "notebook"))
    spread = float(np.ptp(np.concatenate([a, b]))) or 1.0
    dev = float(np.abs(a - b).max()) / spread
    engine = {k: type(dets[k].backbone_for()).__name__ for k in ("ours", "reference")}
    chosen = engine_choice.in_force(det.engine, det.model_)[0]
    n = len(frames)
    speedup = {k: paired_ratio(times, k, "ours") for k in dets if k != "ours"}
    acc = {k: aurocs(test, out[k]) for k in dets if k != "notebook"}

    def quality(k):
        from dinopatch.metrics import line_counts

        c = line_counts([bad for _, _, bad in test], [r.is_anomaly for r in out[k]])
        return (f"at its threshold {c['defects_caught']} of {c['n_defect']} defects caught, {c['good_rejected']} of "
                f"{c['n_good']} good rejected; image AUROC {acc[k][0]:.4f}, pixel AUROC {acc[k][1]:.4f}, "
                f"{kept(dets[k]):.0%} of the tokens; weights {args.weights}")

    rows = [
        latency_row("e2e", f"defaults: predict ({engine['ours']}, kernel {kernels.resolve(det.kernel)}, foreground "
                    f"{det.foreground})", times["ours"], n,
                    note=f"batch_size {det.batch_size}; {quality('ours')}; {speedup['reference']:.2f}x the "
                         f"reference, {speedup['notebook']:.2f}x the notebook; score deviation from the notebook "
                         f"{dev:.1e} of the spread"),
        latency_row("e2e", f"reference: predict ({engine['reference']} {reference.backbone_for().precision}, "
                    f"foreground {reference.foreground})", times["reference"], n,
                    note=quality("reference")),
        latency_row("e2e", "notebook (torch per image, numpy distances)", times["notebook"], n),
    ]
    rows += overlap_rows(times, out, n)
    drop = acc["reference"][0] - acc["ours"][0]
    if "static" in dets:
        flips = next(r["flips"] for r in record["rows"] if r["engine"] == chosen)
        rows += [
            latency_row("e2e", f"static rule: predict ({auto_engine()}, the same fitted model)", times["static"], n,
                        note=f"{quality('static')}; the measured choice ({chosen}) is {speedup['static']:.2f}x "
                             f"this, {flips} golden verdict flips"),
            target("end-to-end predict, measured engine over the static rule's", ">= 1", speedup["static"],
                   lambda v: v >= 1),
            target("image AUROC, static rule minus measured engine", "<= 0.005", acc["static"][0] - acc["ours"][0],
                   lambda v: v <= 0.005)]
    return rows + [
        target("end-to-end predict, defaults over the reference configuration", ">= 3", speedup["reference"],
               lambda v: v >= 3),
        target("image AUROC, reference minus defaults", "<= 0.01", drop, lambda v: v <= 0.01),
        target("end-to-end predict over the notebook pipeline", ">= 1.5", speedup["notebook"], lambda v: v >= 1.5),
        target("end-to-end score deviation / score spread", "<= 1e-3", dev, lambda v: v <= 1e-3),
    ]


def overlap_peers(det) -> dict:
    """The defaults' fitted model with its stages in turn (``overlap`` off), and both on PNG files (read and
    decoded in the run)."""
    serial = copy.copy(det).set_params(overlap=False)  # shares the fitted model and the engines
    return {"in turn": serial, "files": det, "files, in turn": serial}


def png_files(frames: list[np.ndarray], folder: str) -> list[str]:
    import cv2

    paths = [os.path.join(folder, f"{i:03d}.png") for i in range(len(frames))]
    for path, im in zip(paths, frames):
        cv2.imwrite(path, im)
    return paths


def overlap_rows(times: dict, out: dict, n: int) -> list[dict]:
    """Rows of the defaults with their stages in turn (``overlap`` off), beside the same rounds overlapped."""
    rows, worst = [], 0.0
    for on, off, what in (("ours", "in turn", "arrays"), ("files", "files, in turn", "PNG files")):
        per_round = np.asarray(times[off]) / np.asarray(times[on])
        worst = max(worst, max(abs(a.score - b.score) for a, b in zip(out[on], out[off])))
        if on == "files":
            rows.append(latency_row("e2e", "defaults on PNG files: predict", times[on], n))
        rows.append(latency_row(
            "e2e", f"defaults on {what}, overlap off", times[off], n,
            note=f"overlap on is {np.median(per_round):.2f}x this (rounds: "
                 f"{', '.join(f'{r:.2f}' for r in per_round)})"))
        rows.append(target(f"end-to-end predict on {what}, overlap on over off", ">= 1", float(np.median(per_round)),
                           lambda v: v >= 1))
    return rows + [target("largest score difference, overlap on minus off", "== 0", worst, lambda v: v == 0,
                          required=True)]


@stage("stream", groups=("pipeline",))
def bench_stream(args) -> list[dict]:
    """Per-frame latency of :func:`dinopatch.stream.stream` at steady state (batch 1).

    First as fast as frames can be taken (throughput; latency then includes
    the frames queued ahead), with the stages overlapped and in turn
    (``overlap=False``), taking turns twice; then with frames arriving like a
    camera's at 80% of the overlapped throughput (the latency a line sees).
    """
    from dinopatch.stream import stream

    det = _fitted(args)
    n, warm = (12, 3) if args.quick else (40, 5)
    frames = good_frames(8, seed=4)

    def run(period: float, overlap: bool = True):
        def camera():
            t_next = time.perf_counter()
            for i in range(n):
                time.sleep(max(0.0, t_next - time.perf_counter()))
                t_next += period
                yield frames[i % len(frames)]

        t0 = time.perf_counter()
        lat = [f.latency for f in stream(det, camera(), batch_size=1, depth=2, overlap=overlap)]
        return lat[warm:], n / (time.perf_counter() - t0)

    (lat, fps), (lat_off, fps_off) = run(0.0), run(0.0, overlap=False)
    again = run(0.0)[1] / run(0.0, overlap=False)[1]
    rows = [
        latency_row(
            "stream",
            "stream, frames always ready",
            lat,
            note=f"{n} frames, first {warm} warm-up; latency includes the queue",
        ),
        latency_row(
            "stream",
            "stream, frames always ready, stages in turn (overlap=False)",
            lat_off,
            note=f"overlap on gives {fps / fps_off:.2f}x these frames/s ({again:.2f}x in a second turn)",
        ),
    ]
    rows[0]["images_s"], rows[1]["images_s"] = fps, fps_off
    lat, paced = run(1.0 / (0.8 * fps))
    rows.append(
        latency_row(
            "stream",
            f"stream, camera at {0.8 * fps:.2f} frames/s",
            lat,
            note=f"{n} frames, first {warm} warm-up",
        )
    )
    rows[2]["images_s"] = paced
    ratio = rows[2]["ms_p99"] / rows[2]["ms_p50"]
    return rows + [
        target(
            "streaming p99 / p50 latency (camera at 80% of throughput)", "<= 1.5", ratio, lambda v: v <= 1.5
        )
    ]
