"""Kernel stages: memory bandwidth, per-location nearest distance, k-center coreset."""

from __future__ import annotations

import operator
from functools import lru_cache, partial

import numpy as np

from dinopatch import kernels

from ..peers import distance_peers
from ..registry import paired_ratio, round_robin, stage, target, timeit


@lru_cache(maxsize=None)
def memory_bandwidth(repeats: int, nbytes: int = 256 << 20) -> tuple[float, str]:
    """Read bandwidth in bytes/s (best of ``repeats``), and how it was measured.

    ``dinopatch._bench_C.stream_read``: every thread sums its slice with 64
    independent vector lanes, so loads, not adds, set the pace, and the total
    is returned, so no load can be dropped.
    """
    x = np.ones(nbytes // 4, dtype=np.float32)
    try:
        from dinopatch import _bench_C
    except ImportError:  # a checkout built before the probe existed
        best, _ = timeit(lambda: x.sum(), max(repeats, 5))
        return nbytes / best, f"numpy sum, 1 thread, {nbytes >> 20} MiB (no _bench_C: understated)"
    best, _ = timeit(lambda: _bench_C.stream_read(x), max(repeats, 5))
    return nbytes / best, f"_bench_C.stream_read, {_bench_C.threads()} threads, {nbytes >> 20} MiB"


@stage("bandwidth", groups=("kernels",))
def bench_bandwidth(args) -> list[dict]:
    """Memory read bandwidth: the roofline of the batch-1 distance kernel."""
    bw, how = memory_bandwidth(args.repeats)
    return [{"stage": "bandwidth", "method": "memory read", "GB_s": bw / 1e9, "note": how}]


def variants(kernel: str) -> list[tuple[str, str | None]]:
    """(row name, instruction set) of a kernel: cpp once per SIMD set, default first."""
    if kernel != "cpp":
        return [(kernel, None)]
    return [(f"cpp[{isa}]", isa) for isa in kernels.isas() if isa != "generic"] or [
        ("cpp[generic]", "generic")
    ]


def with_isa(isa: str | None, fn, *args):
    """``fn(*args)`` with the cpp kernel on instruction set ``isa`` (None: as it is)."""
    if isa is None:
        return fn(*args)
    previous = kernels.isa()
    kernels.set_isa(isa)
    try:
        return fn(*args)
    finally:
        kernels.set_isa(previous)


def kernel_size(args, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """``--size`` or ``default``; a quarter of the locations with ``--quick``."""
    L, K, D = args.size or default
    return (max(1, L // 4) if args.quick and not args.size else L), K, D


@stage("min_distance", groups=("kernels",))
def bench_min_distance(args) -> list[dict]:
    """Per-location nearest distance, L=1024 K=200 D=384 (L=256 with --quick), batches 1 and 16; and the
    tolerance map's overhead (:func:`tolerance_map_targets`)."""
    L, K, D = kernel_size(args, (1024, 200, 384))
    rng = np.random.default_rng(0)
    banks = {"fp32": rng.standard_normal((L, K, D), dtype=np.float32)}
    banks["fp16"] = banks["fp32"].astype(np.float16)
    bw, _ = memory_bandwidth(args.repeats)
    names = [b for b in kernels.available() if b not in ("numpy", "cuda")]  # numpy: the slow reference
    peers = distance_peers(banks["fp32"])
    rows, best_ms = [], {}
    for B in (1, 16):
        q = rng.standard_normal((B, L, D), dtype=np.float32)
        exact = kernels.min_distance_numpy(q, banks["fp32"])
        runs = [
            (
                method,
                dt,
                lambda q, be=be, isa=isa, dt=dt: with_isa(isa, kernels.min_distance, q, banks[dt], be),
            )
            for be in names
            for method, isa in variants(be)
            for dt in banks
        ]
        runs += [(name, "fp32", fn) for name, fn in peers.items()]
        # In turn, round after round: a noisy neighbour slows every method alike.
        times = round_robin({(m, dt): (lambda fn=fn: fn(q)) for m, dt, fn in runs}, args.repeats)
        for method, dt, fn in runs:
            best, med = min(times[method, dt]), float(np.median(times[method, dt]))
            q_match = q.copy()
            q_match[0] = banks[dt][:, 0]  # every location of image 0 equals a bank row
            nbytes = banks[dt].nbytes
            best_ms[method, dt, B] = best / B * 1e3
            rows.append(
                {
                    "stage": "min_distance",
                    "method": method,
                    "dtype": dt,
                    "batch": B,
                    "ms_per_image": best / B * 1e3,
                    "ms_median": med / B * 1e3,
                    "GB_s": nbytes / (best / B) / 1e9,
                    "GFLOP_s": 2.0 * B * L * K * D / best / 1e9,
                    "roofline": best / (nbytes / bw),  # the bank is read once per call
                    "rel_err": float(np.abs(fn(q) - exact).max() / exact.max()) if dt == "fp32" else None,
                    "exact_match": float(fn(q_match)[0].max()),
                    "note": "numba has no fp16: bank widened per call"
                    if method == "numba" and dt == "fp16"
                    else "",
                }
            )
    return rows + _targets(best_ms, banks["fp32"].nbytes / bw * 1e3, names) + tolerance_map_targets(
        args, banks["fp32"], names)


_COMPARE = {"<=": operator.le, ">=": operator.ge}


def _targets(best_ms: dict, roofline_ms: float, names: list[str]) -> list[dict]:
    """The design targets of the distance kernels, from ms per image by (method, dtype, batch).

    Each is a ratio of two of those times (or of one and the roofline's ms);
    a target whose methods did not run is left out.
    """
    plain = "numba plain loop"
    wanted = []
    if "cpp" in names:
        cpp = variants("cpp")[0][0]
        wanted += [
            ("cpp batch 1 fp32 time / (bank bytes / bandwidth)", "<= 1.25", (cpp, "fp32", 1), roofline_ms),
            ("cpp fp16 speed-up over fp32 at batch 1", ">= 1.6", (cpp, "fp32", 1), (cpp, "fp16", 1)),
            ("cpp batch 16 speed-up per image over batch 1 (fp32)", ">= 5", (cpp, "fp32", 1), (cpp, "fp32", 16)),
            ("cpp batch 1 fp32 time / plain numba loop's", "<= 1", (cpp, "fp32", 1), (plain, "fp32", 1)),
            ("cpp speed-up over the plain numba loop, batch 16 fp32", ">= 3", (plain, "fp32", 16),
             (cpp, "fp32", 16)),
        ]
    if "numba" in names:
        wanted += [(f"numba fallback time / plain numba loop's, batch {B} fp32", "<= 1", ("numba", "fp32", B),
                    (plain, "fp32", B)) for B in (1, 16)]
    rows = []
    for what, goal, num, den in wanted:
        num, den = (best_ms.get(k) if isinstance(k, tuple) else k for k in (num, den))
        if num is not None and den is not None:
            op, bound = goal.split()
            rows.append(target(what, goal, num / den, lambda v, op=_COMPARE[op], b=float(bound): op(v, b)))
    return rows


def tolerance_map_targets(args, bank: np.ndarray, names: list[str]) -> list[dict]:
    """A tolerance per location beside one tolerance of the same reach (2), round-robin, batches 1 and 8.

    ``bank``'s first 40 rows per location on the squarest grid of its L locations: ``single r=2`` and
    ``map all 2`` do the same work, so their ratio is the map's overhead (the target: at most 10%), taken
    as the median of each round's pair (:func:`paired_ratio`); a fit-like map (:func:`realistic_map`)
    and tolerance 0 are timed beside them for scale.  The times go in the target rows' text.
    """
    L, _, D = bank.shape
    h = max(d for d in range(1, int(L**0.5) + 1) if L % d == 0)
    grid, bank = (h, L // h), np.ascontiguousarray(bank[:, :40])
    tolerances = {"single r=2": 2, "map all 2": np.full(L, 2, np.int8), "map 0/1/2": realistic_map(grid),
             "single r=0": 0}
    rng, rows = np.random.default_rng(3), []
    for be in names:
        method, isa = variants(be)[0]
        for B in (1, 8):
            q = rng.standard_normal((B, L, D), dtype=np.float32)
            fns = {name: partial(with_isa, isa, partial(kernels.min_distance, grid=grid, tolerance=r), q, bank, be)
                   for name, r in tolerances.items()}
            times = round_robin(fns, args.repeats)
            ms = ", ".join(f"{name} {np.median(t) / B * 1e3:.3g}" for name, t in times.items())
            what = (f"{method} batch {B}, {grid[0]}x{grid[1]} grid K={bank.shape[1]} D={D}: map all 2 / single r=2 "
                    f"time (ms per image, median: {ms})")
            rows.append(target(what, "<= 1.10", paired_ratio(times, "map all 2", "single r=2"), lambda v: v <= 1.10))
    return rows


def realistic_map(grid: tuple[int, int]) -> np.ndarray:
    """A tolerance map like a fit's: 0 on most of the part, 1 on two outline columns, 2 on a thin arm."""
    h, w = grid
    tmap = np.zeros(grid, np.int8)
    tmap[h // 4:3 * h // 4, w // 4] = tmap[h // 4:3 * h // 4, 3 * w // 4] = 1
    tmap[h // 2, w // 4:3 * w // 4] = 2
    return tmap.ravel()


@stage("coreset", groups=("kernels",))
def bench_coreset(args) -> list[dict]:
    """k-center greedy, L=64 N=400 D=384 k=40 (L=16 with --quick)."""
    L, N, D, k = (16 if args.quick else 64), 400, 384, 40
    x = np.random.default_rng(1).standard_normal((L, N, D), dtype=np.float32)
    rows, ms = [], {}
    for be in [b for b in kernels.available() if b != "cuda"]:
        for method, isa in variants(be):
            reps = 1 if be == "numpy" else args.repeats
            best, med = timeit(lambda: with_isa(isa, kernels.kcenter_greedy, x, k, be), reps)
            ms[method] = best * 1e3
            rows.append(
                {
                    "stage": "coreset",
                    "method": method,
                    "dtype": "fp32",
                    "batch": L,
                    "ms_per_image": best * 1e3,
                    "ms_median": med * 1e3,
                    "GFLOP_s": 2.0 * L * N * k * D / best / 1e9,
                    "note": f"L={L} N={N} D={D} k={k}; ms per call",
                }
            )
    for row in rows:
        row["speedup_vs_numpy"] = ms["numpy"] / row["ms_per_image"]
    if "cpp" in kernels.available():
        rows.append(
            target(
                "coreset cpp speed-up over numpy",
                ">= 10",
                ms["numpy"] / ms[variants("cpp")[0][0]],
                lambda v: v >= 10,
            )
        )
    return rows
