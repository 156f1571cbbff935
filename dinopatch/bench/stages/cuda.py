"""The GPU check (group ``cuda``, run by ``benchmarks/gpu_check.sh``): kernel timings and checks.

``--kernel cuda`` (default) times ``dinopatch._C_cuda`` on device-resident
queries: the call (launch to synchronised result, as a caller holding device
buffers sees it) and the kernel alone (CUDA events), at L=3136 K=200 D=768
(ViT-B/14 at 784 px), batches 1 and 32, tolerance 0 and 1, fp32 and fp16 banks,
against the GPU's peak (``--peak-gbs``, the H200's 4800) and a measured
device-to-device copy.  It checks (target rows with ``required``) parity with
the CPU at full size, exact zeros for queries equal to bank rows, and k-center
indices identical to the CPU's.  With no CUDA device it fails at once.

``--kernel cpp`` runs the same stages on the CPU kernel (a dry run at small
sizes in CI, so the GPU check cannot rot): host arrays, wall-clock time only,
the numpy reference, the measured read bandwidth as the peak.
"""

from __future__ import annotations

import time

import numpy as np

from dinopatch import kernels

from ..registry import stage, target
from .kernels import kernel_size, memory_bandwidth


class CudaRunner:
    """Times ``dinopatch._C_cuda`` with device-resident queries and CUDA events."""

    name = "cuda"

    def __init__(self, peak_gbs: float):
        self.cuda = kernels.cuda_runtime()
        if self.cuda is None:
            raise RuntimeError(
                f"the CUDA runtime sees no device (kernels available: {kernels.available()}); "
                "is the driver loaded and the GPU visible (nvidia-smi, CUDA_VISIBLE_DEVICES)?"
            )
        self.peak = peak_gbs * 1e9
        self.peak_note = f"{self.cuda.device_name(0)}, peak {peak_gbs:.0f} GB/s as given"
        self.reference = "cpp" if "cpp" in kernels.available() else "numpy"

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        """Bytes read per second by a device-to-device copy (each byte also written)."""
        src, dst = self.cuda.DeviceBuffer(nbytes), self.cuda.DeviceBuffer(nbytes)
        timer = self.cuda.EventTimer()
        dst.copy_from_device(src)
        best = min(timer.time(lambda: dst.copy_from_device(src)) for _ in range(repeats)) / 1e3
        return nbytes / best

    def timer(self, bank: np.ndarray, q: np.ndarray, h: int, w: int, tolerance: int):
        """``(call, kernel)``: functions giving seconds of one call and of its kernel alone."""
        dev = kernels.upload(bank)
        qd, out = self.cuda.DeviceBuffer(q.nbytes), self.cuda.DeviceBuffer(q.shape[0] * q.shape[1] * 4)
        qd.copy_from_host(q)
        events = self.cuda.EventTimer()
        run = lambda: dev.min_distance_device(qd.ptr, out.ptr, q.shape[0], h, w, tolerance)  # noqa: E731

        def call() -> float:
            t0 = time.perf_counter()
            run()
            self.cuda.synchronize()
            return time.perf_counter() - t0

        return call, lambda: events.time(run) / 1e3

    def min_distance(self, q, bank, **kw):
        return kernels.min_distance(q, bank, "cuda", **kw)

    def kcenter(self, x, k):
        return kernels.kcenter_greedy(x, k, "cuda")


class CpuRunner:
    """The same stages on a CPU kernel (the CI dry run): wall-clock time only."""

    def __init__(self, name: str, repeats: int):
        self.name = kernels.resolve(name)
        bw, how = memory_bandwidth(repeats)
        self.peak, self.peak_note = bw, f"CPU dry run; peak = measured read ({how})"
        self.reference = "numpy"

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        src, dst = np.ones(nbytes // 4, np.float32), np.empty(nbytes // 4, np.float32)
        np.copyto(dst, src)
        best = min(_seconds(lambda: np.copyto(dst, src)) for _ in range(repeats))
        return nbytes / best

    def timer(self, bank, q, h, w, tolerance):
        call = lambda: _seconds(lambda: self.min_distance(q, bank, grid=(h, w), tolerance=tolerance))  # noqa: E731
        return call, None

    def min_distance(self, q, bank, **kw):
        return kernels.min_distance(q, bank, self.name, **kw)

    def kcenter(self, x, k):
        return kernels.kcenter_greedy(x, k, self.name)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_RUNNERS: dict = {}


def runner(args):
    """The runner of ``--kernel``, made once per run (the first stage fails loudly without a GPU)."""
    key = (args.kernel, args.peak_gbs)
    if key not in _RUNNERS:
        _RUNNERS[key] = (
            CudaRunner(args.peak_gbs) if args.kernel == "cuda" else CpuRunner(args.kernel, args.repeats)
        )
    return _RUNNERS[key]


def _size(args):
    L, K, D = kernel_size(args, (3136, 200, 768))
    side = int(round(L**0.5))
    grid = (side, side) if side * side == L else (L, 1)
    return L, K, D, grid


_COPY: dict = {}


def _copy_bandwidth(args) -> float:
    """Copy bandwidth (bytes/s) of an fp32 bank's size, measured once per run."""
    key = (args.kernel, _size(args), args.repeats)
    if key not in _COPY:
        L, K, D, _ = _size(args)
        _COPY[key] = runner(args).copy_bandwidth(L * K * D * 4, max(args.repeats, 3))
    return _COPY[key]


def _pairs(h: int, w: int, tolerance: int) -> int:
    """(location, neighbouring location) pairs of a tolerance on an h x w grid."""

    def along(n):
        return sum(min(n, i + tolerance + 1) - max(0, i - tolerance) for i in range(n))

    return along(h) * along(w)


@stage("cuda_bandwidth", groups=("cuda",))
def bench_cuda_bandwidth(args) -> list[dict]:
    """Device-to-device copy bandwidth beside the given peak."""
    run = runner(args)
    L, K, D, _ = _size(args)
    bw = _copy_bandwidth(args)
    return [
        {
            "stage": "cuda_bandwidth",
            "method": f"{run.name} copy",
            "GB_s": bw / 1e9,
            "of_peak": bw / run.peak,
            "note": f"{L * K * D * 4 / 2**20:.1f} MiB read and written; {run.peak_note}",
        }
    ]


@stage("cuda_min_distance", groups=("cuda",))
def bench_cuda_min_distance(args) -> list[dict]:
    """Call and kernel time per (bank dtype, batch, tolerance); parity and exact zeros at full size."""
    run = runner(args)
    L, K, D, (h, w) = _size(args)
    batch = 4 if args.quick else 32
    copy = _copy_bandwidth(args)
    rng = np.random.default_rng(0)
    bank32 = rng.standard_normal((L, K, D), dtype=np.float32)
    q = rng.standard_normal((batch, L, D), dtype=np.float32)
    rows, checks = [], []
    for dt, bank in (("fp32", bank32), ("fp16", bank32.astype(np.float16))):
        for tolerance in (0, 1):
            for b in (1, batch):
                call, kernel = run.timer(bank, np.ascontiguousarray(q[:b]), h, w, tolerance)
                call()
                t_call = min(call() for _ in range(args.repeats))
                t_kernel = min(kernel() for _ in range(args.repeats)) if kernel else None
                t = t_kernel or t_call
                rows.append(
                    {
                        "stage": "cuda_min_distance",
                        "method": run.name,
                        "dtype": dt,
                        "batch": b,
                        "radius": tolerance,  # the documented row key (docs/benchmarks.md)
                        "ms_call": t_call * 1e3,
                        "ms_kernel": None if t_kernel is None else t_kernel * 1e3,
                        "ms_per_image": t / b * 1e3,
                        "GB_s": bank.nbytes / t / 1e9,
                        "of_peak": bank.nbytes / t / run.peak,
                        "of_copy": bank.nbytes / t / copy,
                        "GFLOP_s": 2.0 * b * _pairs(h, w, tolerance) * K * D / t / 1e9,
                        "note": f"L={L} K={K} D={D} grid {h}x{w}; GB/s = bank bytes / "
                        f"{'kernel' if t_kernel else 'call'} time (read once per call)",
                    }
                )
        checks += _parity(run, q[:2], bank, dt, (h, w))
    return rows + checks


def _parity(run, q: np.ndarray, bank: np.ndarray, dt: str, grid) -> list[dict]:
    """Target rows: max deviation from the reference / largest distance, and exact matches."""
    q = q.copy()
    q[0] = bank[:, 0]  # every location of image 0 equals a bank row
    rows = []
    for tolerance in (0, 1):
        got = run.min_distance(q, bank, grid=grid, tolerance=tolerance)
        ref = kernels.min_distance(q, bank, run.reference, grid=grid, tolerance=tolerance)
        err = float(np.abs(got - ref).max() / ref.max())
        rows.append(
            target(
                f"{run.name} {dt} tolerance {tolerance} vs {run.reference}: max error / max distance",
                "<= 1e-4",
                err,
                lambda v: v <= 1e-4,
                required=True,
            )
        )
        rows.append(
            target(
                f"{run.name} {dt} tolerance {tolerance}: largest distance of exact matches",
                "== 0",
                float(got[0].max()),
                lambda v: v == 0,
                required=True,
            )
        )
    return rows


@stage("cuda_kcenter", groups=("cuda",))
def bench_cuda_kcenter(args) -> list[dict]:
    """k-center greedy, L=64 N=400 (L=8 with --quick) k=40 at the stage's D: time and identical indices."""
    run = runner(args)
    D = _size(args)[2]
    x = np.random.default_rng(1).standard_normal((8 if args.quick else 64, 400, D), dtype=np.float32)
    got = run.kcenter(x, 40)
    t = min(_seconds(lambda: run.kcenter(x, 40)) for _ in range(args.repeats))
    reference = "cpp" if run.name == "cuda" and "cpp" in kernels.available() else "numpy"
    t0 = time.perf_counter()
    want = kernels.kcenter_greedy(x, 40, reference)
    t_ref = time.perf_counter() - t0
    same = float(np.mean(got == want))
    check = target(
        f"{run.name} k-center indices equal to {reference}'s (fraction)",
        "== 1",
        same,
        lambda v: v == 1,
        required=True,
    )
    return [
        {
            "stage": "cuda_kcenter",
            "method": run.name,
            "ms_call": t * 1e3,
            "note": f"L={x.shape[0]} N=400 D={D} k=40; {reference} took {t_ref * 1e3:.1f} ms",
        },
        check,
    ]
