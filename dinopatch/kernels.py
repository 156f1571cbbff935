"""Per-location nearest-neighbour distance and k-center coreset selection.

Every kernel shares one signature and is checked against the numpy
reference in ``tests/test_kernels.py``:

    min_distance(queries [B, L, D] f32, bank [L, K, D] f32|f16) -> [B, L] f32
    kcenter_greedy(x [L, N, D] f32, k) -> [L, k] int64

``min_distance`` also takes the spatial tolerance of the bank (``grid=(h, w)``
and ``tolerance``: a query at location l is compared with the rows of every
location within ``tolerance`` grid steps, Chebyshev distance, clipped at the
edges; ``tolerance`` is one integer, or an integer array of L values, a
tolerance map with a number of steps per location, taken by every kernel) and ragged
banks (``counts[l]`` valid rows at location l; the rows beyond are padding and
never read).

Kernels, fastest first: ``cuda`` (dinopatch._C_cuda, when a GPU is present),
``cpp`` (dinopatch._C), ``numba``, ``numpy``.  ``kernel=None`` or ``"auto"``
takes the first available; the environment variable ``DINOPATCH_KERNEL``
overrides that choice.  ``cpp`` picks AVX-512 with BF16, AVX-512, AVX2 or
portable loops at run time (``_C.isa()``, ``_C.set_isa()``); the BF16 loops
screen batches of 16 with bf16 dot products and a rigorous error bound, then
compute every candidate's distance exactly, so all give the same answers.
``cuda`` uploads a host bank for each call; :func:`upload` copies a bank to
the GPU once for many calls (:class:`dinopatch.bank.MemoryBank` keeps one).
``cuda`` also takes queries already in CUDA memory (a CUDA torch tensor, a
CuPy array: anything with ``__dlpack__``) and reads them in place, with no
trip through the host: they must be C-contiguous float32 on the bank's device.
They are taken with ``__dlpack__(stream=1)``, which makes the producer's
current stream finish writing them before the legacy default stream, where the
kernel runs; the call returns once the kernel is done (host results).
``numba`` has no float16 and widens an fp16 bank to float32 per call.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import numpy as np

from . import cpu
from .old_names import accepts_old_names, warn

KERNELS = ("cuda", "cpp", "numba", "numpy")
_ISAS = ("avx512bf16", "avx512", "avx2", "generic")  # every instruction set of dinopatch._C, best first
_DLPACK_CUDA = (2, 13)  # DLPack's device types of CUDA memory: device, managed

# Spinning OpenMP threads steal the cores that the backbone's thread pools and
# other processes need, so a small call waits for them far longer than it
# computes; passive threads sleep instead.  libgomp reads this when _C first
# loads it.  Set it to ACTIVE on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from . import _C
except ImportError:  # a source checkout that was never built
    _C = None


@lru_cache(maxsize=None)
def _cuda():
    """dinopatch._C_cuda when it was built and a GPU is present, else None."""
    try:
        from . import _C_cuda
    except ImportError:  # built without CUDA, or no CUDA runtime on this machine
        return None
    return _C_cuda if _C_cuda.device_count() > 0 else None


@lru_cache(maxsize=None)
def _numba():
    from . import _numba_kernels  # lazy: importing numba takes about a second
    return _numba_kernels


def isa() -> str | None:
    """The SIMD instruction set the cpp kernel runs on; None where ``dinopatch._C`` is not built."""
    return None if _C is None else _C.isa()


def isas() -> list[str]:
    """Instruction sets the cpp kernel can run on here, best first (``"generic"`` last); [] where not built.

    Under ``DINOPATCH_CPU`` (:mod:`.cpu`) only those the level has.
    """
    if _C is None:
        return []
    cap = cpu.kernel_isa()
    return [n for n in _C.isas() if cap is None or _ISAS.index(n) >= _ISAS.index(cap)]


def set_isa(name: str) -> None:
    """Run the cpp kernel on instruction set ``name`` (one of :func:`isas`); benchmarks compare them."""
    if _C is None:
        raise ValueError("the cpp kernel (dinopatch._C) is not built here: pip install -e .")
    if name in _C.isas() and name not in isas():
        raise ValueError(f"instruction set {name!r} is beyond {cpu.VARIABLE}={cpu.level()}; here: {isas()}")
    _C.set_isa(name)


if _C is not None and cpu.kernel_isa() is not None:  # as on a CPU of that level: its best instruction set
    _C.set_isa(isas()[0])


def cuda_runtime():
    """``dinopatch._C_cuda`` (device buffers, event timers, ``synchronize``) where a GPU is present, else None."""
    return _cuda()


def available() -> list[str]:
    """Backends usable in this process, fastest first."""
    found = []
    if _cuda() is not None:
        found.append("cuda")
    if _C is not None:
        found.append("cpp")
    if importlib.util.find_spec("numba") is not None:
        found.append("numba")
    found.append("numpy")
    return found


@accepts_old_names("backend")
def resolve(kernel: str | None = None) -> str:
    """The kernel a call with ``kernel=`` would use."""
    if kernel in (None, "auto"):
        kernel = os.environ.get("DINOPATCH_KERNEL") or available()[0]
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
    if kernel not in available():
        raise ValueError(f"kernel {kernel!r} is not available here; available: {available()}")
    return kernel


def _as_float(name: str, a, ndim: int, keep_f16: bool = False) -> np.ndarray:
    """``a`` as a C-contiguous float32 array (float16 kept when ``keep_f16``)."""
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype} (shape {a.shape})")
    dtype = np.float16 if keep_f16 and a.dtype == np.float16 else np.float32
    return np.ascontiguousarray(a, dtype=dtype)


def _check_counts(counts, L: int, K: int) -> np.ndarray | None:
    if counts is None:
        return None
    c = np.asarray(counts)
    if c.shape != (L,) or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"counts must be an integer array of shape ({L},), got {c.dtype} {c.shape}")
    if L and (c.min() < 1 or c.max() > K):
        raise ValueError(f"counts must lie in [1, K = {K}], got range [{c.min()}, {c.max()}]")
    return np.ascontiguousarray(c, dtype=np.int64)


def _check_tolerance(tolerance, L: int) -> int | np.ndarray:
    """One tolerance as an int, or a tolerance map of ``L`` values; ValueError/TypeError on anything else."""
    if isinstance(tolerance, np.ndarray) and tolerance.ndim == 1:
        if tolerance.dtype == bool or not np.issubdtype(tolerance.dtype, np.integer) or tolerance.shape != (L,):
            raise ValueError(f"a tolerance map must be an integer array of shape ({L},), got {tolerance.dtype} "
                             f"{tolerance.shape}")
        if L and tolerance.min() < 0:
            raise ValueError(f"a tolerance map must hold values >= 0, got minimum {tolerance.min()}")
        return tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, np.integer)):
        raise TypeError(f"tolerance must be an integer number of grid steps or an [L] integer array, "
                        f"got {tolerance!r:.80}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    return int(tolerance)


def _check_grid(grid, tolerance, L: int) -> tuple[int, int, int | np.ndarray]:
    """``(h, w, tolerance)``: an int, or an int32 map ``[L]``; 0 means own location only."""
    tolerance = _check_tolerance(tolerance, L)
    largest = int(tolerance.max(initial=0)) if isinstance(tolerance, np.ndarray) else tolerance
    if grid is None:
        if largest:
            raise ValueError(f"tolerance = {largest} needs grid=(h, w) with h * w = L = {L}")
        return L, 1, 0
    if len(grid) != 2 or not all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in grid):
        raise ValueError(f"grid must be two integers (h, w), got {tuple(grid)}")
    h, w = int(grid[0]), int(grid[1])
    if h * w != L or min(h, w) < 1:
        raise ValueError(f"grid {tuple(grid)} does not match L = {L} locations (h * w = L expected)")
    # Past the grid every location is a neighbour already; clamped, y + tolerance cannot overflow in a kernel.
    if isinstance(tolerance, np.ndarray):
        return h, w, np.minimum(tolerance, max(h, w)).astype(np.int32)
    return h, w, min(tolerance, max(h, w))


def _is_uploaded(bank) -> bool:
    cuda = _cuda()
    return cuda is not None and isinstance(bank, cuda.DeviceBank)


def on_cuda(a) -> bool:
    """Whether ``a`` is an array in CUDA memory that DLPack can hand over (a CUDA torch tensor, a CuPy array)."""
    device = getattr(a, "__dlpack_device__", None)
    return device is not None and not isinstance(a, np.ndarray) and device()[0] in _DLPACK_CUDA


def upload(bank, counts=None):
    """Copy a bank to the GPU once, for many :func:`min_distance` calls.

    Args:
        bank: ``[L, K, D]`` float rows; float16 is kept as storage.
        counts: optional ``[L]`` valid rows per location, fixed with the copy.

    Returns:
        a ``dinopatch._C_cuda.DeviceBank`` to pass as ``min_distance``'s bank
        (kernel ``"cuda"``); its device memory is freed when it is collected.
        Changing ``bank`` afterwards does not change the copy.
    """
    cuda = _cuda()
    if cuda is None:
        raise ValueError(f"kernel 'cuda' is not available here; available: {available()}")
    b = _as_float("bank", bank, 3, keep_f16=True)
    if 0 in b.shape[1:]:
        raise ValueError(f"bank {b.shape} has no rows per location or no feature dimension")
    c = _check_counts(counts, b.shape[0], b.shape[1])
    f16 = b.dtype == np.float16
    return cuda.DeviceBank(b.view(np.uint16) if f16 else b, f16, c)


@accepts_old_names("backend", "radius")
def min_distance(queries, bank, kernel: str | None = None, *, counts=None, grid=None,
                 tolerance: int | np.ndarray = 0) -> np.ndarray:
    """Distance from each query to the nearest bank row at its location.

    Args:
        queries: ``[B, L, D]`` float features, one row per image and location;
            on kernel ``"cuda"`` also float32 in CUDA memory (see the module).
        bank: ``[L, K, D]`` float nominal features, ``K`` per location; float16
            is kept as storage (half the bytes to read), other floats become
            float32.  Accumulation is float32 or better in every kernel.  Or a
            bank on the GPU from :func:`upload` (kernel ``"cuda"``); a host
            bank on ``"cuda"`` is uploaded for this call only.
        kernel: one of :data:`KERNELS`, or None/"auto" (old name: ``backend``).
        counts: optional ``[L]`` integers in ``[1, K]``: valid rows per location
            (an uploaded bank has its counts from :func:`upload`).
        grid: ``(h, w)`` token grid with ``h * w == L``; needed when ``tolerance > 0``.
        tolerance: spatial tolerance in grid steps (Chebyshev neighbourhood,
            clipped at the grid edges): one integer for every location, or an
            integer array ``[L]`` (int8, int32, ...) with one per location (old name: ``radius``).

    Returns:
        ``[B, L]`` float32 Euclidean distances; NaN where the query has a NaN.
    """
    on_gpu = on_cuda(queries)
    q = queries if on_gpu else _as_float("queries", queries, 3)
    if on_gpu and len(q.shape) != 3:
        raise ValueError(f"queries must have 3 dimensions, got shape {tuple(q.shape)}")
    uploaded = _is_uploaded(bank)
    b = None if uploaded else _as_float("bank", bank, 3, keep_f16=True)
    L, K, D = tuple(bank.shape) if uploaded else b.shape
    if q.shape[1] != L or q.shape[2] != D:
        raise ValueError(f"queries {tuple(q.shape)} [B,L,D] and bank {(L, K, D)} [L,K,D] disagree on L or D")
    if K == 0:
        raise ValueError(f"bank {(L, K, D)} has no rows per location (K = 0)")
    if D == 0:
        raise ValueError(f"queries {tuple(q.shape)} and bank {(L, K, D)} have no feature dimension (D = 0)")
    if uploaded and counts is not None:
        raise ValueError("an uploaded bank has the counts given to upload(); pass counts=None")
    c = _check_counts(counts, L, K)
    h, w, r = _check_grid(grid, tolerance, L)
    kernel = resolve(kernel)
    if uploaded and kernel != "cuda":
        raise ValueError(f"the bank is on the GPU (kernels.upload); kernel {kernel!r} needs a host array")
    if on_gpu and kernel != "cuda":
        raise ValueError(f"the queries are in GPU memory; kernel {kernel!r} needs host arrays (or use 'cuda')")
    if q.shape[0] == 0 or L == 0:
        return np.empty(tuple(q.shape[:2]), dtype=np.float32)
    if kernel == "cuda":
        device = bank if uploaded else upload(b, c)
        if on_gpu:  # read in place: stream 1 asks the producer to finish writing them first (see the module)
            return device.min_distance_dlpack(q.__dlpack__(stream=1), h, w, r)
        return device.min_distance(q, h, w, r)
    if kernel == "cpp":
        if b.dtype == np.float16:
            return _C.min_distance_f16(q, b.view(np.uint16), c, h, w, r)
        return _C.min_distance(q, b, c, h, w, r)
    if kernel == "numba":
        full = np.full(L, K, dtype=np.int64) if c is None else c
        steps = r if isinstance(r, np.ndarray) else np.full(L, r, np.int32)  # one compiled signature
        return _numba().min_distance(q, b.astype(np.float32, copy=False), full, h, w, steps)
    return min_distance_numpy(q, b, counts=c, grid=(h, w), tolerance=r)


@accepts_old_names("backend")
def kcenter_greedy(x, k: int, kernel: str | None = None) -> np.ndarray:
    """Greedy k-center selection, independently at each location.

    The first centre is the row nearest the location's mean; each next one is
    the row farthest from all centres chosen so far (running minimum, O(N)
    memory per location).

    Args:
        x: ``[L, N, D]`` float features.
        k: centres per location, ``1 <= k <= N``.
        kernel: one of :data:`KERNELS`, or None/"auto" (old name: ``backend``).

    Returns:
        ``[L, k]`` int64 row indices into ``x[l]``.
    """
    a = _as_float("x", x, 3)
    k = int(k)
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k = {k} must be in [1, N = {a.shape[1]}] for x of shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"x {a.shape} holds NaN or infinite values; k-center needs finite features")
    kernel = resolve(kernel)
    if a.shape[0] == 0:
        return np.empty((0, k), dtype=np.int64)
    if kernel == "cuda":
        return _cuda().kcenter_greedy(a, k)
    if kernel == "cpp":
        return _C.kcenter_greedy(a, k)
    if kernel == "numba":
        return _numba().kcenter_greedy(a, k)
    return kcenter_greedy_numpy(a, k)


def neighbourhood(l: int, grid: tuple[int, int], tolerance: int) -> np.ndarray:
    """Locations within ``tolerance`` Chebyshev steps of location ``l`` on ``grid``."""
    h, w = grid
    y, x = divmod(l, w)
    ys = np.arange(max(0, y - tolerance), min(h, y + tolerance + 1))
    xs = np.arange(max(0, x - tolerance), min(w, x + tolerance + 1))
    return (ys[:, None] * w + xs[None, :]).ravel()


@accepts_old_names("radius")
def min_distance_numpy(q: np.ndarray, b: np.ndarray, counts: np.ndarray | None = None,
                       grid: tuple[int, int] | None = None, tolerance: int | np.ndarray = 0) -> np.ndarray:
    """Reference: direct differences per location, float64 accumulation (``tolerance``: int or ``[L]`` map)."""
    B, L, D = q.shape
    K = b.shape[1]
    grid = grid or (L, 1)
    steps = np.broadcast_to(np.asarray(tolerance, np.int64), (L,))
    out = np.empty((B, L), dtype=np.float32)
    for l in range(L):
        rows = np.concatenate([b[m, : (K if counts is None else counts[m])]
                               for m in neighbourhood(l, grid, int(steps[l]))]).astype(np.float64)
        # Chunk the queries so the [chunk, rows, D] difference stays small.
        step = max(1, (1 << 22) // (len(rows) * D))
        for s in range(0, B, step):
            diff = q[s:s + step, l, None, :].astype(np.float64) - rows[None]
            out[s:s + step, l] = np.sqrt(np.einsum("bkd,bkd->bk", diff, diff).min(axis=1))
    return out


def kcenter_greedy_numpy(x: np.ndarray, k: int) -> np.ndarray:
    """Reference k-center greedy, float64 distances."""
    L, N, _ = x.shape
    out = np.empty((L, k), dtype=np.int64)
    for l in range(L):
        xl = x[l].astype(np.float64)
        c = int(np.argmin(((xl - xl.mean(axis=0)) ** 2).sum(axis=1)))
        mind = np.full(N, np.inf)
        for j in range(k):
            out[l, j] = c
            mind = np.minimum(mind, ((xl - xl[c]) ** 2).sum(axis=1))
            c = int(np.argmax(mind))
    return out


def __getattr__(name: str):
    if name == "BACKENDS":  # the old name of KERNELS, for one release
        warn("BACKENDS", "KERNELS", "dinopatch.kernels")
        return KERNELS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
