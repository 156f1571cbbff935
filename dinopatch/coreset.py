"""A coreset bank's evidence: the good parts' tokens it was selected from, kept in the model file beside it.

With ``coreset_ratio < 1`` each location of the bank keeps ``k = ceil(ratio * N)`` of the N good parts' tokens
(greedy k-center, :func:`.kernels.kcenter_greedy`), and at fit each held-out fold's bank kept its own share of the
other parts' tokens.  The bank alone cannot say what a held-out part's distances were: its tokens need not be
rows.  So the model file keeps every good part's token at every location the bank covers, at float16
(:class:`GoodTokens`), as evidence only: predict searches the coreset, never these.  At load:

* each bank row is the token it says it is (a float32 row rounded to float16 is that token exactly), and the rows
  are a greedy k-center trace over all N tokens (:func:`check_trace`);
* each fold's rows (:attr:`.calibration.Threshold.fold_rows`) are a greedy k-center trace over the tokens of the
  parts outside the fold (:func:`fold_rows`);
* :func:`.evidence.held_out_distances` derives every held-out map from these tokens and rows, as fit did.

A trace is checked up to float16 rounding (:data:`ROUNDING`): fit picked among float32 tokens, and where two
candidates lie that close either pick is k-center's.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .bank import MemoryBank, coreset_rows

# How far a k-center pick may fall short of the farthest candidate, as a share of the location's largest token
# norm: float16 moves a token by at most 2^-11 of its norm, a distance by twice that, and 2x slack.
ROUNDING = 2.0 ** -9
_CHUNK_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class GoodTokens:
    """Every good part's token where a coreset bank covers the grid, and which of them the bank's rows are.

    Attributes:
        tokens: float16 ``[L, N, D]``, part ``i``'s token at location ``l`` in ``tokens[l, i]`` (fit order).
        rows: int ``[L, k]``, the part each bank row is, in the bank's row order (k-center's pick order).
    """

    tokens: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, grids: np.ndarray, bank: MemoryBank) -> "GoodTokens | None":
        """The evidence of ``bank``, fitted on token ``grids`` ``[N, h, w, D]``; None where it is no coreset."""
        if bank.coreset is None:
            return None
        n, h, w, d = grids.shape
        stack = grids.reshape(n, h * w, d).transpose(1, 0, 2)
        stack = stack if bank.positions is None else stack[bank.positions]
        return cls(np.ascontiguousarray(stack, np.float32).astype(np.float16), np.asarray(bank.coreset, np.int64))

    def state(self) -> dict[str, np.ndarray]:
        """The model file's arrays."""
        return {"coreset_tokens": self.tokens, "coreset_rows": self.rows.astype(np.int32)}

    @classmethod
    def from_state(cls, arrays: dict, bank: np.ndarray, parts: int, ratio: float) -> "GoodTokens | None":
        """The evidence of a model file's ``bank`` ``[L, k, D]`` of ``parts`` good parts at coreset ``ratio``,
        checked for form; ValueError where it is missing, not wanted or malformed."""
        k = coreset_rows(ratio, parts)
        if bank.shape[1] != k:
            raise ValueError(f"bank of {bank.shape[1]} rows per location, but coreset ratio {ratio:g} of {parts} good "
                             f"parts keeps {k}: the file was edited")
        tokens, rows = arrays.get("coreset_tokens"), arrays.get("coreset_rows")
        if k == parts:
            if tokens is not None or rows is not None:
                raise ValueError("coreset evidence beside a bank that holds every good part's tokens")
            return None
        length, _, dim = bank.shape
        if tokens is None or rows is None:
            raise ValueError(f"a coreset bank ({k} of {parts} parts' tokens) without its evidence (coreset_tokens, "
                             "coreset_rows): refit the model")
        if tokens.dtype != np.float16 or tokens.shape != (length, parts, dim):
            raise ValueError(f"coreset tokens {tokens.dtype}{list(tokens.shape)} are not float16"
                             f"{[length, parts, dim]}")
        if not np.isfinite(tokens).all():
            raise ValueError("coreset tokens hold non-finite values")
        return cls(tokens, _indices("coreset rows", rows, (length, k), parts))

    def check_bank(self, bank: MemoryBank) -> None:
        """ValueError where ``bank``'s rows are not the tokens :attr:`rows` names, or not k-center's picks."""
        named = np.take_along_axis(self.tokens, self.rows[:, :, None], axis=1)
        off = bank.features.astype(np.float16) != named
        if off.any():
            l, j, _ = np.argwhere(off)[0]
            raise ValueError(f"bank row {j} at location {l} is not good part {self.rows[l, j]}'s token: the file "
                             "was edited")
        check_trace(self.tokens, self.rows, "the bank's coreset")


def fold_rows(stored: np.ndarray, held: list[np.ndarray], parts: int, ratio: float,
              tokens: np.ndarray) -> list[np.ndarray] | None:
    """The parts whose tokens each held-out fold's bank kept (``stored``: :attr:`.calibration.Threshold.fold_rows`),
    one int ``[L, k]`` per set of ``held``; None at ratio 1 (every other part).  ValueError where they are not
    the share of the other parts' tokens ``ratio`` keeps, or not k-center's picks among ``tokens`` ``[L, N, D]``."""
    if ratio >= 1:
        if stored.size:
            raise ValueError("held-out folds' coreset rows in a model without a coreset")
        return None
    trains = [np.setdiff1d(np.arange(parts), h) for h in held]
    widths = [coreset_rows(ratio, len(t)) for t in trains]
    stored = _indices("held-out folds' coreset rows", stored, (len(tokens), sum(widths)), parts)
    out, start = [], 0
    for train, width in zip(trains, widths):
        rows = stored[:, start:start + width]
        start += width
        at = np.searchsorted(train, rows)
        if (train[np.minimum(at, len(train) - 1)] != rows).any():
            raise ValueError("a held-out fold's bank holds a token of a part it holds out: the file was edited")
        if width == len(train):
            if (rows != train).any():
                raise ValueError("a held-out fold's bank without a coreset is not its parts in order: the file "
                                 "was edited")
        else:
            check_trace(tokens[:, train], at, "a held-out fold's coreset")
        out.append(rows)
    return out


def check_trace(tokens: np.ndarray, picks: np.ndarray, what: str) -> None:
    """ValueError where ``picks`` ``[L, k]`` (indices into ``tokens`` ``[L, M, D]``) are not, at some location,
    what greedy k-center picks: first the token nearest the mean, then each time the one farthest from those
    picked, up to :data:`ROUNDING`."""
    length, m, dim = tokens.shape
    step = max(1, _CHUNK_BYTES // (8 * m * dim))
    for s in range(0, length, step):
        # float64: the expanded square below is exact enough near zero, where float32's would not be.
        x = tokens[s:s + step].astype(np.float64)
        norms = np.einsum("lmd,lmd->lm", x, x)

        def to(rows):  # [l, D] -> [l, M], each token's distance to its location's row
            dots = np.matmul(x, rows[:, :, None])[..., 0]
            return np.sqrt(np.maximum(norms - 2 * dots + np.einsum("ld,ld->l", rows, rows)[:, None], 0.0))

        p, at = picks[s:s + step], np.arange(len(x))
        tol = ROUNDING * np.sqrt(norms.max(axis=1))
        nearest = to(x.mean(axis=1))
        short = nearest[at, p[:, 0]] - nearest.min(axis=1)
        gap = np.full((len(x), m), np.inf)
        for j in range(1, p.shape[1]):
            gap = np.minimum(gap, to(x[at, p[:, j - 1]]))
            short = np.maximum(short, gap.max(axis=1) - gap[at, p[:, j]])
        bad = np.flatnonzero(short > tol)
        if bad.size:
            l = int(bad[0])
            raise ValueError(f"{what} at location {s + l} is not what greedy k-center picks: a pick falls "
                             f"{short[l]:.3g} short of the farthest token (rounding allows {tol[l]:.3g}): the file "
                             "was edited")


def _indices(name: str, value: np.ndarray, shape: tuple, parts: int) -> np.ndarray:
    if value.dtype not in (np.int32, np.int64) or value.shape != shape:
        raise ValueError(f"{name} {value.dtype}{list(value.shape)} are not int{list(shape)}")
    if value.size and not 0 <= value.min() <= value.max() < parts:
        raise ValueError(f"{name} name parts outside 0..{parts - 1}")
    return value.astype(np.int64)
