"""Pipeline stages: synthetic screws through the detector (align, post, e2e, stream)."""

from __future__ import annotations

import time

import numpy as np

from dinopatch import kernels

from ..registry import calls, latency_row, round_robin, stage, target


def _frames(n: int, seed: int) -> list[np.ndarray]:
    from dinopatch.synthetic import make_images

    return make_images("screw", "good", n, seed)


def _detector(args, **overrides):
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
        _FITTED[key] = _detector(args).fit(_frames(args.bank, seed=1))
    return _FITTED[key]


@stage("align", groups=("pipeline",))
def bench_align(args) -> list[dict]:
    """Alignment of a 256 px frame into the canonical frame (OpenCV)."""
    from dinopatch.align import Aligner

    frames = _frames(8, seed=2)
    aligner = Aligner(size=args.image_size).fit(_frames(8, seed=1))
    times = [t for im in frames for t in calls(lambda im=im: aligner.transform(im), args.repeats)]
    return [latency_row("align", "opencv", times, note=f"256 px frame -> {args.image_size} px")]


@stage("post", groups=("pipeline",))
def bench_post(args) -> list[dict]:
    """Post-processing of one image's distances: upsample, smooth, score, map back, segment."""
    det = _fitted(args)
    raws = det.patch_distances(_frames(4, seed=2))
    times = [t for raw in raws for t in calls(lambda raw=raw: det.result_from(raw), args.repeats)]
    return [latency_row("post", "opencv", times, note="256 px frame")]


@stage("e2e", groups=("pipeline",))
def bench_e2e(args) -> list[dict]:
    """End-to-end predict against a notebook-style pipeline, at equal scores.

    The notebook way: eager torch one image at a time and numpy distances
    (the numpy reference kernel), the same alignment and post-processing.
    """
    det = _fitted(args)
    frames = _frames(args.batch * (1 if args.quick else 2), seed=3)
    notebook = _detector(args, engine="torch", kernel="numpy", batch_size=1)
    notebook._model = det._model  # the same fitted model, judged the notebook way
    times = round_robin(
        {"ours": lambda: det.predict(frames), "notebook": lambda: notebook.predict(frames)},
        max(1, args.repeats // 2),
    )
    ours, theirs = times["ours"], times["notebook"]
    a, b = det.score_images(frames), notebook.score_images(frames)
    spread = float(np.ptp(np.concatenate([a, b]))) or 1.0
    dev = float(np.abs(a - b).max()) / spread
    engine = type(det._get_backbone()).__name__
    n = len(frames)
    speedup = float(np.median(theirs) / np.median(ours))
    rows = [
        latency_row(
            "e2e",
            f"predict ({engine}, kernel {kernels.resolve(det._kernel())})",
            ours,
            n,
            note=f"batch_size {det.batch_size}; score deviation {dev:.1e} of the spread; "
            f"{speedup:.2f}x the notebook",
        ),
        latency_row("e2e", "notebook (torch per image, numpy distances)", theirs, n),
    ]
    rows.append(
        target("end-to-end predict over the notebook pipeline", ">= 1.5", speedup, lambda v: v >= 1.5)
    )
    rows.append(target("end-to-end score deviation / score spread", "<= 1e-3", dev, lambda v: v <= 1e-3))
    return rows


@stage("stream", groups=("pipeline",))
def bench_stream(args) -> list[dict]:
    """Per-frame latency of :func:`dinopatch.stream.stream` at steady state (batch 1).

    First as fast as frames can be taken (throughput; latency then includes
    the frames queued ahead), then with frames arriving like a camera's at
    80% of that throughput (the latency a line sees).
    """
    from dinopatch.stream import stream

    det = _fitted(args)
    n, warm = (12, 3) if args.quick else (40, 5)
    frames = _frames(8, seed=4)

    def run(period: float):
        def camera():
            t_next = time.perf_counter()
            for i in range(n):
                time.sleep(max(0.0, t_next - time.perf_counter()))
                t_next += period
                yield frames[i % len(frames)]

        t0 = time.perf_counter()
        lat = [f.latency for f in stream(det, camera(), batch_size=1, depth=2)]
        return lat[warm:], n / (time.perf_counter() - t0)

    lat, fps = run(0.0)
    rows = [
        latency_row(
            "stream",
            "stream, frames always ready",
            lat,
            note=f"{n} frames, first {warm} warm-up; latency includes the queue",
        )
    ]
    rows[0]["images_s"] = fps
    lat, paced = run(1.0 / (0.8 * fps))
    rows.append(
        latency_row(
            "stream",
            f"stream, camera at {0.8 * fps:.2f} frames/s",
            lat,
            note=f"{n} frames, first {warm} warm-up",
        )
    )
    rows[1]["images_s"] = paced
    ratio = rows[1]["ms_p99"] / rows[1]["ms_p50"]
    return rows + [
        target(
            "streaming p99 / p50 latency (camera at 80% of throughput)", "<= 1.5", ratio, lambda v: v <= 1.5
        )
    ]
