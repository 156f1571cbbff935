"""Direct calls of the compiled kernels: hostile arguments raise, never crash the process."""
import os
import subprocess
import sys

import numpy as np
import pytest

from dinopatch import kernels

_C = pytest.importorskip("dinopatch._C", reason="the C++ extension is not built")

I64 = 2**63 - 1


def _wrapping_w(h: int, L: int) -> int:
    """The ``w`` for which ``h * w`` wraps around int64 to exactly ``L`` (``h`` odd), or 0."""
    w = L * pow(h, -1, 2**64) % 2**64
    return w if w <= I64 else 0


def test_wrapping_grid_is_refused():
    """h * w that overflows to L would have the kernel walk rows far past the bank."""
    L, h = 4, 5
    w = _wrapping_w(h, L)
    assert w and (h * w) % 2**64 == L
    q, b = np.zeros((1, L, 3), np.float32), np.zeros((L, 2, 3), np.float32)
    with pytest.raises(ValueError, match="overflows"):
        _C.min_distance(q, b, None, h, w, 0)
    with pytest.raises(ValueError, match="overflows"):
        _C.min_distance_f16(q, b.astype(np.float16).view(np.uint16), None, h, w, 1)
    with pytest.raises(ValueError, match="does not match"):
        kernels.min_distance(q, b, "cpp", grid=(h, w), tolerance=1)


@pytest.mark.parametrize("tolerance", [3, 4, 1000, 2**31, 2**62, I64])
@pytest.mark.parametrize("kernel", [b for b in ("cpp", "numba") if b in kernels.available()])
def test_tolerance_beyond_the_grid_equals_numpy(kernel, tolerance):
    """Past the grid every location is a neighbour: cpp and numba equal numpy, with no inf."""
    rng = np.random.default_rng(0)
    h, w, K, D = 3, 4, 2, 8
    q = rng.standard_normal((2, h * w, D)).astype(np.float32)
    b = rng.standard_normal((h * w, K, D)).astype(np.float32)
    want = kernels.min_distance_numpy(q, b, grid=(h, w), tolerance=tolerance)
    np.testing.assert_array_equal(want, kernels.min_distance_numpy(q, b, grid=(h, w), tolerance=max(h, w)))
    got = kernels.min_distance(q, b, kernel, grid=(h, w), tolerance=tolerance)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * want.max())
    if kernel == "cpp":  # the binding clamps too, for callers that skip dinopatch.kernels
        np.testing.assert_allclose(_C.min_distance(q, b, None, h, w, tolerance), want, rtol=1e-5,
                                   atol=1e-5 * want.max())


_FUZZ = r"""
import faulthandler, sys
import numpy as np
from hypothesis import given, settings, HealthCheck, strategies as st
from dinopatch import _C, _bench_C
from dinopatch.kernels import min_distance_numpy

faulthandler.enable()
RAN = {"min_distance": 0, "kcenter_greedy": 0}
I64 = 2**63 - 1
EXTREME = [-2**63, -2**31, -1, 0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 + 1, 2**62, I64, 2**63, 2**64 + 3]
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.uint16, np.uint8, np.bool_, np.complex64, object]


@st.composite
def arrays(draw, shape, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["c", "strided", "transposed", "broadcast"]))
    n = int(np.prod(shape))
    if layout == "strided":
        a = np.arange(2 * n, dtype=np.float64)[::2].reshape(shape)
    elif layout == "broadcast":
        a = np.broadcast_to(np.float64(draw(st.floats(-3, 3))), shape)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 99)))
        a = rng.standard_normal(shape[::-1]).T if layout == "transposed" else rng.standard_normal(shape)
    return a.astype(dtype) if dtype is not object else a.astype(object)


@st.composite
def calls(draw):
    # Half the calls are valid (any tolerance >= 0, any numeric dtype and layout) and must equal numpy;
    # the other half break one or more rules at once and must raise.
    hostile = draw(st.booleans())
    maybe = (lambda strategy, valid: draw(strategy) if hostile and draw(st.booleans()) else valid)
    B, K, D = draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    L = h * w
    shapes = st.sampled_from([0, 1, L + 1, max(L - 1, 0)])  # small sizes: memory stays small
    q = draw(arrays((B, maybe(shapes, L), D), DTYPES if hostile else DTYPES[:-2]))
    bank = draw(arrays((L, maybe(st.integers(0, 5), K), maybe(st.integers(0, 6), D)),
                       DTYPES if hostile else DTYPES[:-2]))
    kind = maybe(st.sampled_from(["extreme", "wrapping", "mismatch"]), "fits")
    if kind == "extreme":
        h, w = draw(st.sampled_from(EXTREME)), draw(st.sampled_from([w, *EXTREME]))
    elif kind == "wrapping":
        hh = draw(st.sampled_from([3, 5, 7, 11, 2**31 + 1]))
        ww = L * pow(hh, -1, 2**64) % 2**64
        h, w = (hh, ww) if ww <= I64 else (h + 1, w)
    elif kind == "mismatch":
        h = h + 1
    tolerance = maybe(st.sampled_from([-1, -2**63, 2**63, 2**64 + 3]),
                   draw(st.sampled_from([0, 1, 2, 5, 2**31, 2**62, I64])))
    counts = draw(st.sampled_from([None, "full", "ones", "list"]))
    counts = (None if counts is None else np.full(L, K, np.int64) if counts == "full" else
              np.ones(L, np.int64) if counts == "ones" else [1] * L)
    counts = maybe(st.one_of(arrays((draw(shapes),), [np.int64, np.int32, np.float64, np.uint64]),
                             st.sampled_from(EXTREME).map(lambda v: np.full(L, v, object).astype(np.int64)
                                                          if -2**63 <= v <= I64 else [v] * L)), counts)
    return q, bank, counts, h, w, tolerance


@settings(max_examples=int(sys.argv[1]), deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(calls(), st.booleans())
def min_distance(call, f16):
    q, bank, counts, h, w, tolerance = call
    print("min_distance", q.dtype, q.shape, q.strides, bank.dtype, bank.shape, bank.strides,
          None if counts is None else np.asarray(counts)[:4], h, w, tolerance, f16, flush=True)
    try:
        if f16:
            bits = bank if bank.dtype == object else bank.astype(np.float16).view(np.uint16)
            out = _C.min_distance_f16(q, bits, counts, h, w, tolerance)
        else:
            out = _C.min_distance(q, bank, counts, h, w, tolerance)
    except (ValueError, TypeError, OverflowError, RuntimeError):
        return
    RAN["min_distance"] += 1
    # It ran: then the arguments were valid, and the answer must be the reference's.
    qf = np.asarray(q, np.float32)
    bf = np.asarray(bank.astype(np.float16) if f16 else bank, np.float32)
    c = None if counts is None else np.asarray(counts, np.int64)
    want = min_distance_numpy(qf, bf, counts=c, grid=(h, w), tolerance=tolerance)
    ok = np.isclose(out, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.nanmax(want, initial=0))),
                    equal_nan=True)
    assert out.shape == want.shape and ok.all(), (out, want)


@settings(max_examples=int(sys.argv[1]) // 2, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 3), st.integers(0, 5), st.integers(0, 4), st.data())
def kcenter(L, N, D, data):
    x = data.draw(arrays((L, N, D)))
    k = data.draw(st.one_of(st.integers(-1, N + 1), st.sampled_from(EXTREME)))
    print("kcenter_greedy", x.dtype, x.shape, x.strides, k, flush=True)
    try:
        idx = _C.kcenter_greedy(x, k)
    except (ValueError, TypeError, OverflowError, RuntimeError):
        return
    RAN["kcenter_greedy"] += 1
    assert idx.shape == (L, k) and ((idx >= 0) & (idx < N)).all()


@settings(max_examples=int(sys.argv[1]) // 4, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def others(data):
    x = data.draw(arrays((data.draw(st.integers(0, 5)), data.draw(st.integers(0, 3)))))
    name = data.draw(st.one_of(st.text(max_size=8), st.sampled_from(_C.isas())))
    print("stream_read / set_isa", x.dtype, x.shape, repr(name), flush=True)
    try:
        _bench_C.stream_read(x)  # the bench's bandwidth probe, bound outside the kernels' tables
    except (ValueError, TypeError):
        pass
    try:
        _C.set_isa(name)
    except ValueError:
        pass
    assert _C.isa() in _C.isas()


min_distance()
kcenter()
others()
print("RAN", RAN["min_distance"], RAN["kcenter_greedy"])
print("DONE", flush=True)
"""


def test_direct_calls_never_crash():
    """Random shapes, dtypes, strides, grids, tolerances and counts, extremes included, in a child process:
    it must finish normally; calls that run must equal numpy."""
    out = subprocess.run([sys.executable, "-c", _FUZZ, "300"], capture_output=True, text=True, check=False,
                         timeout=600, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    tail = (out.stdout[-3000:] + out.stderr[-3000:])
    assert out.returncode == 0 and out.stdout.rstrip().endswith("DONE"), f"exit {out.returncode}:\n{tail}"
    ran = [int(n) for n in out.stdout.splitlines()[-2].split()[1:]]
    assert min(ran) >= 20, f"only {ran} calls got past the checks: the fuzz barely reaches the kernels"
