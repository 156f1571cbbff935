"""Throughput benchmarks: ``python -m dinopatch.bench [stages...] --quick --repeats N --json FILE``.

A stage is one function registered with :func:`stage`; it takes the parsed
arguments and returns rows (dicts) that are printed as an aligned table and
written to the JSON report with the hardware and library versions.  Adding a
stage is one decorated function::

    @stage("post", groups=("e2e",))
    def post(args):
        ...
        return [{"stage": "post", "method": "opencv", "ms_per_image": ms}]

Rows may carry ``target`` / ``measured`` / ``met`` keys: those are collected
into a separate table of the design targets.
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

# OpenMP in the kernels, torch and BLAS all spin by default and fight over
# the cores of this machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from . import kernels  # noqa: E402

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


def timeit(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
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
        exact = kernels.min_distance(q, banks["fp32"], backends[0] if backends else "numpy")
        runs = [(be, dt, lambda q, be=be, dt=dt: kernels.min_distance(q, banks[dt], be))
                for be in backends for dt in banks]
        runs += [(name, "fp32", fn) for name, fn in peers.items()]
        for method, dt, fn in runs:
            best, med = timeit(lambda: fn(q), args.repeats)
            got = fn(q)
            nbytes = banks[dt].nbytes
            err = float(np.abs(got - exact).max() / exact.max()) if dt == "fp32" else None
            best_ms[method, dt, B] = best / B * 1e3
            rows.append({
                "stage": "min_distance", "method": method, "dtype": dt, "batch": B,
                "ms_per_image": best / B * 1e3, "ms_median": med / B * 1e3,
                "GB_s": nbytes / (best / B) / 1e9,
                "GFLOP_s": 2.0 * B * L * K * D / best / 1e9,
                "roofline": best / (nbytes / bw),
                "rel_err": err,
                "note": "numba has no fp16: bank widened per call" if method == "numba" and dt == "fp16" else "",
            })
    if "cpp" in backends:
        c = lambda dt, B: best_ms["cpp", dt, B]  # noqa: E731
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
        reps = 1 if be == "numpy" else args.repeats
        best, med = timeit(lambda: kernels.kcenter_greedy(x, k, be), reps)
        ms[be] = best * 1e3
        rows.append({"stage": "coreset", "method": be, "dtype": "fp32", "batch": L,
                     "ms_per_image": best * 1e3, "ms_median": med * 1e3,
                     "GFLOP_s": 3.0 * L * N * k * D / best / 1e9,
                     "note": f"L={L} N={N} D={D} k={k}; ms per call"})
    for row in rows:
        row["speedup_vs_numpy"] = ms["numpy"] / row["ms_per_image"]
    if "cpp" in ms:
        rows.append(_target("coreset cpp speed-up over numpy", ">= 10", ms["numpy"] / ms["cpp"],
                            lambda v: v >= 10))
    return rows


def _target(what: str, target: str, value: float, ok: Callable[[float], bool]) -> dict:
    return {"stage": "target", "method": what, "target": target, "measured": value, "met": bool(ok(value))}


# --- report ---------------------------------------------------------------------

COLUMNS = [("stage", "{}"), ("method", "{}"), ("dtype", "{}"), ("batch", "{}"),
           ("ms_per_image", "{:.3f}"), ("ms_median", "{:.3f}"), ("GB_s", "{:.1f}"),
           ("GFLOP_s", "{:.1f}"), ("roofline", "{:.2f}"), ("rel_err", "{:.1e}"),
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
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
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
