"""Throughput benchmarks: ``python -m dinopatch.bench [stages...] --quick --repeats N --json FILE``.

A stage is one function registered with :func:`stage`; it takes the parsed
arguments and returns rows (dicts) that are printed as an aligned table and
written to the JSON report with the hardware and library versions.  Adding a
stage is one decorated function::

    @stage("post", groups=("e2e",))
    def post(args):
        ...
        return [{"stage": "post", "method": "opencv", "ms_per_image": ms}]

Rows of stage ``"target"`` (``target`` / ``measured`` / ``met``) are
collected into a separate table of the design targets.  In the kernel
stages, ``rel_err`` is the largest deviation from the exact fp32 result
relative to the largest distance, ``exact_match`` the largest distance
returned for queries equal to a bank row (0 is right), and GFLOP/s counts two
flops per query-row-feature triple for every method (the GEMM count), so
direct-difference and GEMM-style peers compare on the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np

# Importing the package has set OMP_WAIT_POLICY=PASSIVE (see dinopatch.kernels).
from . import kernels

STAGES: dict[str, Callable[[argparse.Namespace], list[dict]]] = {}
GROUPS: dict[str, list[str]] = {}


def stage(name: str, groups: tuple[str, ...] = ()):
    """Register ``fn(args) -> rows`` as stage ``name`` (and in each group)."""
    def register(fn):
        STAGES[name] = fn
        for g in groups:
            GROUPS.setdefault(g, []).append(name)
        return fn
    return register


def calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timeit(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls after one warm-up call."""
    times = calls(fn, repeats)
    return min(times), statistics.median(times)


def memory_bandwidth(repeats: int, nbytes: int = 256 << 20) -> tuple[float, str]:
    """Read bandwidth in bytes/s, and how it was measured.

    All threads read (``_C.stream_read``); a single-threaded numpy sum would
    understate what the kernels can reach.
    """
    x = np.ones(nbytes // 4, dtype=np.float32)
    if kernels._C is not None:
        best, _ = timeit(lambda: kernels._C.stream_read(x), max(repeats, 5))
        return nbytes / best, f"_C.stream_read, {os.cpu_count()} threads, {nbytes >> 20} MiB"
    best, _ = timeit(lambda: x.sum(), max(repeats, 5))
    return nbytes / best, f"numpy sum, 1 thread, {nbytes >> 20} MiB (no _C: understated)"


# --- nearest-distance peers, timed with the same bank ------------------------

def _numpy_gemm(q, b, b_sq):
    """|q|^2 + |b|^2 - 2 q.b with batched BLAS; loses accuracy near zero."""
    qt = q.transpose(1, 0, 2)  # [L, B, D]
    d2 = (qt ** 2).sum(-1)[:, :, None] + b_sq[:, None, :] - 2 * (qt @ b.transpose(0, 2, 1))
    return np.sqrt(np.maximum(d2.min(-1), 0)).T


def _peers(b: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Distance functions of other libraries over the fp32 bank (set-up untimed)."""
    peers = {}
    b_sq = (b ** 2).sum(-1)
    peers["numpy-gemm"] = lambda q: _numpy_gemm(q, b, b_sq)
    try:
        import torch
        tb = torch.from_numpy(b)
        peers["torch.cdist"] = lambda q: torch.cdist(torch.from_numpy(q).transpose(0, 1), tb).amin(-1).T.numpy()
    except ImportError:
        pass
    try:
        import faiss
        indices = []
        for rows in b:
            index = faiss.IndexFlatL2(b.shape[2])
            index.add(rows)
            indices.append(index)

        def faiss_search(q):
            out = np.empty(q.shape[:2], dtype=np.float32)
            for l, index in enumerate(indices):
                d2, _ = index.search(np.ascontiguousarray(q[:, l]), 1)
                out[:, l] = np.sqrt(np.maximum(d2[:, 0], 0))
            return out
        peers["faiss IndexFlatL2"] = faiss_search
    except ImportError:
        pass
    return peers


def _versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("numba", "torch", "faiss"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    if kernels._C is not None:
        out["dinopatch._C isa"] = kernels._C.isa()
    return out


def _hardware() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    cuda = kernels._cuda()
    info["cuda_devices"] = cuda.device_count() if cuda is not None else 0
    return info


def _variants(backend: str) -> list[tuple[str, str | None]]:
    """(row name, instruction set) of a backend: cpp once per SIMD set, default first."""
    if backend != "cpp":
        return [(backend, None)]
    return [(f"cpp[{isa}]", isa) for isa in kernels._C.isas() if isa != "generic"] or [("cpp[generic]", "generic")]


def _with_isa(isa: str | None, fn, *args):
    if isa is None:
        return fn(*args)
    previous = kernels._C.isa()
    kernels._C.set_isa(isa)
    try:
        return fn(*args)
    finally:
        kernels._C.set_isa(previous)


@stage("min_distance", groups=("kernels",))
def bench_min_distance(args) -> list[dict]:
    """Per-location nearest distance, L=1024 K=200 D=384 (L=256 with --quick)."""
    L, K, D = (256 if args.quick else 1024), 200, 384
    rng = np.random.default_rng(0)
    banks = {"fp32": rng.standard_normal((L, K, D), dtype=np.float32)}
    banks["fp16"] = banks["fp32"].astype(np.float16)
    bw, how = memory_bandwidth(args.repeats)
    rows = [{"stage": "min_distance", "method": "memory read", "note": how, "GB_s": bw / 1e9}]
    backends = [b for b in kernels.available() if b != "numpy"]  # numpy: the (slow) reference
    peers = _peers(banks["fp32"])
    best_ms = {}
    for B in (1, 16):
        q = rng.standard_normal((B, L, D), dtype=np.float32)
        exact = kernels.min_distance_numpy(q, banks["fp32"])
        runs = [(method, dt, lambda q, be=be, isa=isa, dt=dt: _with_isa(isa, kernels.min_distance, q, banks[dt], be))
                for be in backends for method, isa in _variants(be) for dt in banks]
        runs += [(name, "fp32", fn) for name, fn in peers.items()]
        for method, dt, fn in runs:
            best, med = timeit(lambda: fn(q), args.repeats)
            got = fn(q)
            q_match = q.copy()
            q_match[0] = banks[dt][:, 0]  # every location of image 0 equals a bank row
            match_err = float(fn(q_match)[0].max())
            nbytes = banks[dt].nbytes
            err = float(np.abs(got - exact).max() / exact.max()) if dt == "fp32" else None
            best_ms[method, dt, B] = best / B * 1e3
            rows.append({
                "stage": "min_distance", "method": method, "dtype": dt, "batch": B,
                "ms_per_image": best / B * 1e3, "ms_median": med / B * 1e3,
                "GB_s": nbytes / (best / B) / 1e9,
                "GFLOP_s": 2.0 * B * L * K * D / best / 1e9,
                "roofline": best / (nbytes / bw),
                "rel_err": err, "exact_match": match_err,
                "note": "numba has no fp16: bank widened per call" if method == "numba" and dt == "fp16" else "",
            })
    if "cpp" in backends:
        c = lambda dt, B: best_ms[_variants("cpp")[0][0], dt, B]  # noqa: E731
        rows.append(_target("batch 1 fp32 time / (bank bytes / bandwidth)", "<= 1.25",
                            c("fp32", 1) / (banks["fp32"].nbytes / bw * 1e3), lambda v: v <= 1.25))
        rows.append(_target("fp16 speed-up over fp32 at batch 1", ">= 1.6",
                            c("fp32", 1) / c("fp16", 1), lambda v: v >= 1.6))
        rows.append(_target("batch 16 speed-up per image over batch 1 (fp32)", ">= 5",
                            c("fp32", 1) / c("fp32", 16), lambda v: v >= 5))
        if ("numba", "fp32", 16) in best_ms:
            rows.append(_target("cpp speed-up over plain parallel numba, batch 16 fp32", ">= 3",
                                best_ms["numba", "fp32", 16] / c("fp32", 16), lambda v: v >= 3))
    return rows


@stage("coreset", groups=("kernels",))
def bench_coreset(args) -> list[dict]:
    """k-center greedy, L=64 N=400 D=384 k=40 (L=16 with --quick)."""
    L, N, D, k = (16 if args.quick else 64), 400, 384, 40
    x = np.random.default_rng(1).standard_normal((L, N, D), dtype=np.float32)
    rows, ms = [], {}
    for be in kernels.available():
        for method, isa in _variants(be):
            reps = 1 if be == "numpy" else args.repeats
            best, med = timeit(lambda: _with_isa(isa, kernels.kcenter_greedy, x, k, be), reps)
            ms[method] = best * 1e3
            rows.append({"stage": "coreset", "method": method, "dtype": "fp32", "batch": L,
                         "ms_per_image": best * 1e3, "ms_median": med * 1e3,
                         "GFLOP_s": 2.0 * L * N * k * D / best / 1e9,
                         "note": f"L={L} N={N} D={D} k={k}; ms per call"})
    for row in rows:
        row["speedup_vs_numpy"] = ms["numpy"] / row["ms_per_image"]
    if "cpp" in kernels.available():
        cpp = _variants("cpp")[0][0]
        rows.append(_target("coreset cpp speed-up over numpy", ">= 10", ms["numpy"] / ms[cpp],
                            lambda v: v >= 10))
    return rows


# --- pipeline stages: synthetic screws through the detector -------------------

def _frames(n: int, seed: int) -> list[np.ndarray]:
    from .synthetic import make_images

    return make_images("screw", "good", n, seed)


def _latency_row(stage_name: str, method: str, seconds: list[float], batch: int = 1, **extra) -> dict:
    ms = np.asarray(seconds) * 1e3 / batch
    return {"stage": stage_name, "method": method, "batch": batch, "ms_per_image": float(np.median(ms)),
            "ms_p50": float(np.percentile(ms, 50)), "ms_p95": float(np.percentile(ms, 95)),
            "ms_p99": float(np.percentile(ms, 99)), "images_s": 1e3 / float(np.median(ms)),
            "peak_rss_mib": _peak_rss_mib(), **extra}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _detector(args, **overrides):
    from .detector import DinoPatch

    params = dict(backbone=args.backbone, weights=args.weights, image_size=args.image_size, engine=args.engine,
                  batch_size=args.batch, progress=False)
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
    from .align import Aligner

    frames = _frames(8, seed=2)
    aligner = Aligner(size=args.image_size).fit(_frames(8, seed=1))
    times = [t for im in frames for t in calls(lambda im=im: aligner.transform(im), args.repeats)]
    return [_latency_row("align", "opencv", times, note=f"256 px frame -> {args.image_size} px")]


@stage("backbone", groups=("pipeline",))
def bench_backbone_stage(args) -> list[dict]:
    """Eager torch against ONNX Runtime fp32 and int8 (see ``export/bench.py``)."""
    from .backbone.bench import bench_backbone

    rows = []
    for r in bench_backbone(quick=args.quick, repeats=args.repeats):
        r["method"] = r.pop("engine")
        r["note"] = f"{r['image_size']} px, {r['threads']} threads, {r['vs_torch']:.2f}x torch"
        rows.append(r)
    return rows


@stage("post", groups=("pipeline",))
def bench_post(args) -> list[dict]:
    """Post-processing of one image's distances: upsample, smooth, score, map back, segment."""
    det = _fitted(args)
    raws = det.patch_distances(_frames(4, seed=2))
    times = [t for raw in raws for t in calls(lambda raw=raw: det.result_from(raw), args.repeats)]
    return [_latency_row("post", "opencv", times, note="256 px frame")]


@stage("e2e", groups=("pipeline",))
def bench_e2e(args) -> list[dict]:
    """End-to-end predict against a notebook-style pipeline, at equal scores.

    The notebook way: eager torch one image at a time and numpy distances
    (the numpy reference kernel), the same alignment and post-processing.
    """
    det = _fitted(args)
    frames = _frames(args.batch * (1 if args.quick else 2), seed=3)
    notebook = _detector(args, engine="torch", kernel="numpy", batch_size=1)
    notebook._model = det._model
    # Round robin, so that a noisy neighbour slows both pipelines alike.
    runs = {"ours": lambda: det.predict(frames), "notebook": lambda: notebook.predict(frames)}
    times = {name: [] for name in runs}
    for i in range(max(1, args.repeats // 2) + 1):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    ours, theirs = times["ours"], times["notebook"]
    a, b = det.score_images(frames), notebook.score_images(frames)
    spread = float(np.ptp(np.concatenate([a, b]))) or 1.0
    dev = float(np.abs(a - b).max()) / spread
    engine = type(det._get_backbone()).__name__
    n = len(frames)
    rows = [_latency_row("e2e", f"predict ({engine}, kernel {kernels.resolve(det._kernel())})", ours, n,
                         note=f"batch_size {det.batch_size}; score deviation {dev:.1e} of the spread"),
            _latency_row("e2e", "notebook (torch per image, numpy distances)", theirs, n)]
    speedup = np.median(theirs) / np.median(ours)
    rows[0]["speedup_vs_notebook"] = float(speedup)
    rows.append(_target("end-to-end predict over the notebook pipeline", ">= 1.5", speedup, lambda v: v >= 1.5))
    rows.append(_target("end-to-end score deviation / score spread", "<= 1e-3", dev, lambda v: v <= 1e-3))
    return rows


@stage("foreground", groups=("pipeline",))
def bench_foreground(args) -> list[dict]:
    """Foreground-only tokens against every token on aligned screws: speed and accuracy, in one run.

    Both detectors are fitted on the same ``--bank`` good screws and judge the
    same test set (good, and each defect); the backbone and end-to-end predict
    are timed in turn, round after round.
    """
    from .metrics import auroc
    from .synthetic import DEFECTS, make_sample

    rng = np.random.default_rng(3)
    n = 3 if args.quick else 6
    test = [(make_sample("screw", d, rng), d != "good") for d in ("good",) * 2 + DEFECTS["screw"] for _ in range(n)]
    frames = [im for (im, _), _ in test]
    dets = {fg: _detector(args, foreground=fg).fit(_frames(args.bank, seed=1)) for fg in (False, True)}
    region = dets[True]._model.foreground
    if region is None:
        raise RuntimeError("no foreground region was fitted")
    batch = np.stack([c for c, _, _ in map(dets[True]._model.aligner.transform, frames[:args.batch])])
    engine = dets[True]._get_backbone()
    runs = {("backbone", False): lambda: engine(batch), ("backbone", True): lambda: engine(batch, region.positions),
            ("e2e", False): lambda: dets[False].predict(frames), ("e2e", True): lambda: dets[True].predict(frames)}
    times, out = {k: [] for k in runs}, {}
    for i in range(max(1, args.repeats // 2) + 1):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            out[k] = fn()
            if i:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
    labels = np.array([bad for _, bad in test])
    masks = np.concatenate([(m > 0).ravel() for (_, m), _ in test])
    rows = []
    for fg in dets:
        results = out["e2e", fg]
        scores = np.array([r.score for r in results])
        pixels = np.concatenate([r.anomaly_map.ravel() for r in results])
        what = f"foreground tokens ({region.fraction:.0%} kept)" if fg else "every token"
        rows.append(_latency_row("foreground", f"backbone, {what}", times["backbone", fg], len(batch)))
        rows.append(_latency_row("foreground", f"predict, {what}", times["e2e", fg], len(frames),
                                 note=f"image AUROC {auroc(labels, scores):.4f}, pixel AUROC "
                                      f"{auroc(masks, pixels):.4f}, weights {args.weights}"))
    speedup = float(np.median(times["e2e", False]) / np.median(times["e2e", True]))
    rows.append(_target("foreground tokens: end-to-end speed-up", "> 1", speedup, lambda v: v > 1))
    return rows


@stage("stream", groups=("pipeline",))
def bench_stream(args) -> list[dict]:
    """Per-frame latency of :func:`dinopatch.stream.stream` at steady state (batch 1).

    First as fast as frames can be taken (throughput; latency then includes
    the frames queued ahead), then with frames arriving like a camera's at
    80% of that throughput (the latency a line sees).
    """
    from .stream import stream

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
    rows = [_latency_row("stream", "stream, frames always ready", lat,
                         note=f"{n} frames, first {warm} warm-up; latency includes the queue")]
    rows[0]["images_s"] = fps
    lat, paced = run(1.0 / (0.8 * fps))
    rows.append(_latency_row("stream", f"stream, camera at {0.8 * fps:.2f} frames/s", lat,
                             note=f"{n} frames, first {warm} warm-up"))
    rows[1]["images_s"] = paced
    ratio = rows[1]["ms_p99"] / rows[1]["ms_p50"]
    return rows + [_target("streaming p99 / p50 latency (camera at 80% of throughput)", "<= 1.5", ratio,
                           lambda v: v <= 1.5)]


def _target(what: str, target: str, value: float, ok: Callable[[float], bool]) -> dict:
    return {"stage": "target", "method": what, "target": target, "measured": value, "met": bool(ok(value))}


# --- report ---------------------------------------------------------------------

COLUMNS = [("stage", "{}"), ("method", "{}"), ("dtype", "{}"), ("batch", "{}"),
           ("ms_per_image", "{:.3f}"), ("ms_median", "{:.3f}"), ("ms_p95", "{:.1f}"), ("ms_p99", "{:.1f}"),
           ("images_s", "{:.2f}"), ("peak_rss_mib", "{:.0f}"), ("speedup_vs_notebook", "{:.2f}"), ("GB_s", "{:.1f}"),
           ("GFLOP_s", "{:.1f}"), ("roofline", "{:.2f}"), ("rel_err", "{:.1e}"), ("exact_match", "{:.1e}"),
           ("speedup_vs_numpy", "{:.1f}"), ("note", "{}")]
TARGET_COLUMNS = [("method", "{}"), ("target", "{}"), ("measured", "{:.2f}"), ("met", "{}")]


def format_table(rows: list[dict], columns) -> str:
    """Aligned text table of the columns any row has."""
    cols = [(c, f) for c, f in columns if any(r.get(c) not in (None, "") for r in rows)]
    cells = [[c for c, _ in cols]]
    for r in rows:
        cells.append([f.format(r[c]) if r.get(c) not in (None, "") else "" for c, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = sorted(STAGES) + sorted(GROUPS)
    p = argparse.ArgumentParser(prog="python -m dinopatch.bench", description=__doc__.split("\n")[0])
    p.add_argument("stages", nargs="*", metavar="stage", help=f"stages or groups: {', '.join(names)} (default all)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (best is reported)")
    p.add_argument("--json", metavar="FILE", help="write hardware, versions and rows here")
    p.add_argument("--backbone", default="dinov2_vits14", help="pipeline stages: backbone name")
    p.add_argument("--image-size", type=int, help="pipeline stages: backbone input (448; 224 with --quick)")
    p.add_argument("--batch", type=int, default=8, help="pipeline stages: images per backbone call")
    p.add_argument("--bank", type=int, default=40, help="pipeline stages: good images in the memory bank")
    p.add_argument("--engine", default="auto", help="pipeline stages: detector engine")
    p.add_argument("--weights", default="random", help="pipeline stages: 'random' or a checkpoint path (accuracy "
                   "figures need weights whose blocks matter: timm's random init leaves them near the identity)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.image_size = args.image_size or (224 if args.quick else 448)
    if args.quick:
        args.bank = min(args.bank, 12)
    chosen = []
    for s in args.stages or sorted(STAGES):
        if s not in STAGES and s not in GROUPS:
            p.error(f"unknown stage {s!r}; choose from {', '.join(names)}")
        chosen += [n for n in GROUPS.get(s, [s]) if n not in chosen]
    report = {"hardware": _hardware(), "versions": _versions(), "args": vars(args), "rows": []}
    for name in chosen:
        report["rows"] += STAGES[name](args)
    report["load_avg_after"] = os.getloadavg()
    rows = [r for r in report["rows"] if r["stage"] != "target"]
    targets = [r for r in report["rows"] if r["stage"] == "target"]
    print(f"{report['hardware'].get('cpu', '?')}, {report['hardware']['cpus']} cpus; "
          f"load {report['hardware']['load_avg'][0]:.2f} -> {report['load_avg_after'][0]:.2f}; {report['versions']}")
    print(format_table(rows, COLUMNS))
    if targets:
        print()
        print(format_table(targets, TARGET_COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
