"""The per-location memory bank of nominal patch features.

Tokens of the nominal images are stacked per location, ``[L, N, D]``, and each
location's stack is shrunk to ``k = ceil(coreset_ratio * N)`` rows by greedy k-center
selection.  A query token is scored by its distance to the nearest row at its
own location, or at any location within ``tolerance`` grid steps (the spatial
tolerance that absorbs residual misalignment): one number of steps for every
location, or a tolerance map with one per location (:mod:`.tolerance`).

A bank may cover only some locations of the grid (``positions``, the part's
region with foreground tokens): the neighbourhood of a kept location is then
clipped to kept locations, as it is clipped at the grid's edges.  The kernels
take a full grid, so the dropped locations are given one row each, a sentinel
:data:`SENTINEL` in every feature, far beyond any token: a query nearer to it
than to every nominal row is beyond ``SENTINEL * sqrt(D) - |q|`` of all of them.

With ``match="global"`` a query is scored by its distance to the whole bank
instead (the rows of every location, shrunk by k-center to at most
:data:`GLOBAL_ROWS`); ``"local+global"`` averages the two terms, so a patch
unlike anything nominal scores on both and a patch that is nominal somewhere
but not at its own place still scores on the local one.

On the ``cuda`` kernel the bank keeps its own copy on the GPU, uploaded on
first use and freed with the bank (like a faiss GPU index over its C++ core);
a region bank with a tolerance uploads its padded full grid with its row counts.
Query tokens already on the GPU are read there, without a trip to the host.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from . import kernels
from .old_names import accepts_old_names, old_attribute

SENTINEL = 1e4  # in every feature of a dropped location's row; representable in float16
MATCHES = ("local", "global", "local+global")
# Rows of the global bank: every query token is compared with all of them, so
# their number bounds the cost per token (8192 rows x 384 dims: 3 MFLOP a token).
GLOBAL_ROWS = 8192


class MemoryBank:
    """Nominal features per location.

    Args:
        features: ``[L, K, D]`` float32 or float16 bank rows.
        grid: ``(h, w)`` token grid, ``h * w == L``.
        tolerance: spatial tolerance in grid steps (0: own location only): an integer, or an integer
            array ``[h * w]`` with one per grid location (a tolerance map; kept as read-only int8).
            Old name: ``radius``.
        positions: flat grid indices of the locations the rows are of (default: every one).
        match: one of :data:`MATCHES`.
        global_features: ``[G, D]`` rows of the whole bank, of ``features``' dtype; needed unless
            ``match="local"``.

    ``features``, ``positions`` and ``global_features`` are read-only through the bank (neither
    their values nor the attributes can be changed): the padded grid and the
    device copy are made once, so a changed bank would leave them stale.
    """

    radius = old_attribute("tolerance", "radius")

    @accepts_old_names("radius")
    def __init__(self, features: np.ndarray, grid: tuple[int, int], tolerance: int = 0, positions=None,
                 match: str = "local", global_features: np.ndarray | None = None):
        from .backbone import check_positions

        features = np.asarray(features)
        # Read-only like the rows (the padded grid and the device copy are made from both once).
        self._positions = None if positions is None else check_positions(positions, grid).copy()
        if self._positions is not None:
            self._positions.flags.writeable = False
        n = grid[0] * grid[1] if positions is None else len(self.positions)
        if features.ndim != 3 or features.shape[0] != n:
            raise ValueError(f"bank features {features.shape} do not match grid {grid} and {n} positions "
                             f"([{n}, K, D] expected)")
        if features.dtype not in (np.float32, np.float16):
            raise ValueError(f"bank features must be float32 or float16, got {features.dtype}")
        # A read-only view: the caller's own array stays writable.
        self._features = np.ascontiguousarray(features).view()
        self._features.flags.writeable = False
        self.grid = (int(grid[0]), int(grid[1]))
        self.tolerance = _tolerance(tolerance, self.grid)
        self.match, self._global = match, _global_rows(match, global_features, self._features)
        self._full = None  # the sentinel-padded full grid, made on first use
        self._device = None
        # [L, K] the fitted tokens each row is, in k-center's pick order; None where every token is a row
        # (see :meth:`fit`): a coreset's evidence (:mod:`.coreset`).
        self.coreset = None
        self._device_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Copies and pickles (Ray, joblib) carry the host rows only; the copy
        # uploads its own device bank when it first needs one.
        state = self.__dict__.copy()
        state["_device"] = state["_device_lock"] = state["_full"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for array in (self._features, self._positions, self._global,
                      self.tolerance if isinstance(self.tolerance, np.ndarray) else None):
            if array is not None:
                array.flags.writeable = False
        self._device_lock = threading.Lock()

    def device_bank(self):
        """The bank on the GPU (``dinopatch._C_cuda.DeviceBank``), uploaded once.

        A region bank with a tolerance is uploaded as its padded full grid with
        its row counts (see :meth:`_padded`).  Threads predicting at once share
        one upload.  The device memory is freed when the bank is.
        """
        device = self._device
        if device is None:
            with self._device_lock:
                if self._device is None:
                    padded = self.positions is not None and self.max_tolerance
                    self._device = kernels.upload(*self._padded()) if padded else kernels.upload(self.features)
                device = self._device
        return device

    @classmethod
    @accepts_old_names("ratio", "radius", "backend")
    def fit(cls, tokens: np.ndarray, *, coreset_ratio: float = 1.0, tolerance: int | np.ndarray = 0,
            dtype=np.float32, kernel: str | None = None, positions=None, match: str = "local") -> "MemoryBank":
        """Build a bank from nominal tokens ``[N, h, w, D]``.

        Args:
            tokens: patch tokens of the nominal images.
            coreset_ratio: fraction of the N rows kept per location by k-center greedy
                (1.0 keeps all; old name: ``ratio``).
            tolerance: spatial tolerance in grid steps, one or ``[h * w]`` (see the class; old name: ``radius``).
            dtype: storage type, float32 or float16 (half the bytes to read per
                image; distances are still accumulated in float32).
            kernel: the distance kernel of the coreset selection (old name: ``backend``).
            positions: keep only these flat grid locations.
            match: one of :data:`MATCHES`; the global rows are the k-center coreset of all kept rows,
                at most :data:`GLOBAL_ROWS`.

        The bank's :attr:`coreset` says which of the N tokens each row is, where k < N.
        """
        if tokens.ndim != 4 or len(tokens) == 0:
            raise ValueError(f"tokens must be [N, h, w, D] with N >= 1, got {tokens.shape}")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        n, h, w, d = tokens.shape
        stack = tokens.reshape(n, h * w, d).transpose(1, 0, 2)
        stack = np.ascontiguousarray(stack if positions is None else stack[positions], dtype=np.float32)
        k = coreset_rows(coreset_ratio, n)
        idx = None
        if k < n:
            idx = kernels.kcenter_greedy(stack, k, kernel)
            stack = np.take_along_axis(stack, idx[:, :, None], axis=1)
        rows = None
        if match != "local":
            rows = stack.reshape(1, -1, d)
            if rows.shape[1] > GLOBAL_ROWS:
                rows = rows[:, kernels.kcenter_greedy(rows, GLOBAL_ROWS, kernel)[0]]
            rows = rows[0].astype(dtype)
        bank = cls(stack.astype(dtype), (h, w), tolerance, positions, match, rows)
        bank.coreset = idx
        return bank

    @accepts_old_names("backend")
    def distances(self, tokens: np.ndarray, kernel: str | None = None) -> np.ndarray:
        """Nearest-neighbour distance of query tokens ``[B, h, w, D]`` -> ``[B, h, w]`` (host float32).

        NaN at locations the bank does not cover (see ``positions``).  With the
        ``cuda`` kernel the tokens may also be float32 in CUDA memory (a CUDA
        torch tensor): they are read there, without a copy to the host.
        """
        b, h, w, d = tokens.shape
        if (h, w) != self.grid or d != self.dim:
            raise ValueError(f"query tokens {tokens.shape} do not match bank grid {self.grid} and dim {self.dim}")
        kernel = kernels.resolve(kernel)
        local = self._local(tokens, kernel) if self.match != "global" else None
        if self.match == "local":
            return local
        # Every token is a one-location query against one location that holds all the global rows.
        q = self._covered(tokens.reshape(b, h * w, d)).reshape(-1, 1, d)
        far = np.full((b, h * w), np.nan, np.float32)
        far[:, slice(None) if self.positions is None else self.positions] = kernels.min_distance(
            q, self._global[None], kernel).reshape(b, -1)
        far = far.reshape(b, h, w)
        return far if local is None else 0.5 * (local + far)

    def _local(self, tokens: np.ndarray, kernel: str) -> np.ndarray:
        b, h, w, d = tokens.shape
        q = tokens.reshape(b, h * w, d)
        cuda = kernel == "cuda"
        if self.positions is None:
            extra = dict(grid=self.grid, tolerance=self.tolerance) if self.max_tolerance else {}
            bank = self.device_bank() if cuda else self.features
            return kernels.min_distance(q, bank, kernel, **extra).reshape(b, h, w)
        out = np.full((b, h * w), np.nan, np.float32)
        if self.max_tolerance:
            full, counts = self._padded()
            bank, counts = (self.device_bank(), None) if cuda else (full, counts)
            out[:, self.positions] = kernels.min_distance(q, bank, kernel, counts=counts, grid=self.grid,
                                                          tolerance=self.tolerance)[:, self.positions]
        else:
            bank = self.device_bank() if cuda else self.features
            out[:, self.positions] = kernels.min_distance(self._covered(q), bank, kernel)
        return out.reshape(b, h, w)

    def _covered(self, q):
        """Queries ``[B, L, D]`` at the locations the bank covers (host arrays or device tokens)."""
        if self.positions is None:
            return q
        # A list index: torch and CuPy gather device tokens with it (a read-only numpy index makes torch warn).
        return q[:, self.positions if isinstance(q, np.ndarray) else self.positions.tolist()]

    def _padded(self) -> tuple[np.ndarray, np.ndarray]:
        """The full-grid bank (a :data:`SENTINEL` row at dropped locations) and its row counts."""
        if self._full is None:
            l, (k, d) = self.grid[0] * self.grid[1], self.features.shape[1:]
            full = np.zeros((l, k, d), self.features.dtype)
            full[:, 0] = SENTINEL
            full[self.positions] = self.features
            counts = np.ones(l, np.int64)
            counts[self.positions] = k
            self._full = (full, counts)
        return self._full

    @property
    def features(self) -> np.ndarray:
        """``[L, K, D]`` rows, read-only (the device copy is made from them once)."""
        return self._features

    @property
    def positions(self) -> np.ndarray | None:
        """Flat grid indices of the locations covered, read-only; None: every one."""
        return self._positions

    @property
    def global_features(self) -> np.ndarray | None:
        """``[G, D]`` rows of the whole bank, read-only; None with ``match="local"``."""
        return self._global

    @property
    def max_tolerance(self) -> int:
        """The widest tolerance, in grid steps (the tolerance itself when there is one for every location)."""
        return int(self.tolerance.max(initial=0)) if isinstance(self.tolerance, np.ndarray) else self.tolerance

    max_radius = old_attribute("max_tolerance", "max_radius")

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    @property
    def size(self) -> int:
        """Rows per location."""
        return self.features.shape[1]

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + (0 if self._global is None else self._global.nbytes)

    def __repr__(self) -> str:
        l, k, d = self.features.shape
        where = "" if self.positions is None else f", {l} of {self.grid[0] * self.grid[1]} locations"
        tolerance = f"map of 0..{self.max_tolerance}" if isinstance(self.tolerance, np.ndarray) else self.tolerance
        return (f"MemoryBank(grid={self.grid}{where}, rows={k}, dim={d}, tolerance={tolerance}, "
                f"match={self.match}, dtype={self.features.dtype}, {self.nbytes / 2**20:.1f} MiB)")


def coreset_rows(coreset_ratio: float, n: int) -> int:
    """Rows per location a bank of ``n`` tokens per location keeps at ``coreset_ratio``."""
    return max(1, math.ceil(coreset_ratio * n))


def _tolerance(tolerance, grid: tuple[int, int]) -> int | np.ndarray:
    """One tolerance as an int, or a tolerance map as a read-only int8 ``[h * w]``; ValueError otherwise."""
    if isinstance(tolerance, np.ndarray) and tolerance.ndim:
        L = grid[0] * grid[1]
        if tolerance.shape != (L,) or tolerance.dtype == bool or not np.issubdtype(tolerance.dtype, np.integer) \
                or (L and not 0 <= tolerance.min() <= tolerance.max() <= 127):
            raise ValueError(f"a tolerance map must be {L} integers in [0, 127] (one per grid location), "
                             f"got {tolerance.dtype}{list(tolerance.shape)}")
        tolerance = tolerance.astype(np.int8)
        tolerance.flags.writeable = False
        return tolerance
    if int(tolerance) < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    return int(tolerance)


def _global_rows(match: str, rows, features: np.ndarray) -> np.ndarray | None:
    """The checked, read-only global rows a ``match`` needs (None for ``"local"``)."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    if match == "local":
        return None
    if rows is None:
        raise ValueError(f"match={match!r} needs the global rows")
    rows = np.asarray(rows)
    if rows.ndim != 2 or len(rows) == 0 or rows.shape[1] != features.shape[2] or rows.dtype != features.dtype:
        raise ValueError(f"global rows {rows.dtype}{list(rows.shape)} do not fit the bank "
                         f"({features.dtype}[G, {features.shape[2]}] expected)")
    rows = np.ascontiguousarray(rows).view()
    rows.flags.writeable = False
    return rows
