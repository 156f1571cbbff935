"""Parity of every kernel with the numpy reference, and input checks.

Tolerance (DESIGN.md): distances within 1e-4 of the largest distance in the
call; exact matches give exactly 0.  The cpp kernel is run once per
instruction set the CPU has (avx512, avx2, generic), so the AVX2 path is
tested on an AVX-512 machine too.
"""

import numpy as np
import pytest
from conftest import need_cuda

from dinopatch import kernels

COMPILED = [b for b in kernels.available() if b != "numpy"]


# (kernel, instruction set or None); under DINOPATCH_CPU only the instruction sets of its level
CASES = [(b, None) for b in COMPILED if b != "cpp"] + [("cpp", isa) for isa in kernels.isas()]


@pytest.fixture(params=CASES, ids=[f"{b}-{i}" if i else b for b, i in CASES])
def kernel(request):
    name, isa = request.param
    if isa is not None:
        previous = kernels.isa()
        kernels.set_isa(isa)
        yield name
        kernels.set_isa(previous)
    else:
        yield name


def close(got, ref):
    """Within 1e-4 of the largest distance (absolute 1e-6 when all are ~0)."""
    assert got.shape == ref.shape and got.dtype == np.float32
    tol = 1e-4 * max(float(np.nanmax(ref)), 1e-2)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.nanmax(np.abs(got - ref)) <= tol, (np.nanmax(np.abs(got - ref)), tol)


def make(rng, B, L, K, D, scale=1.0):
    q = (rng.standard_normal((B, L, D)) * scale).astype(np.float32)
    b = (rng.standard_normal((L, K, D)) * scale).astype(np.float32)
    return q, b


SHAPES = [  # B, L, K, D
    (1, 1, 1, 1),
    (17, 1, 1, 1),
    (2, 3, 5, 1),
    (1, 4, 7, 383),
    (17, 5, 9, 383),
    (16, 6, 33, 384),
    (3, 2, 1, 16),
    (5, 7, 13, 31),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}K{}D{}".format(*s))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_min_distance_random(kernel, rng, shape, dtype):
    q, b = make(rng, *shape)
    b = b.astype(dtype)
    close(kernels.min_distance(q, b, kernel), kernels.min_distance_numpy(q, b))


@pytest.mark.parametrize("B", [1, 17])
@pytest.mark.parametrize("grid,tolerance", [((3, 4), 1), ((4, 5), 2), ((1, 6), 1), ((2, 2), 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_min_distance_tolerance_and_counts(kernel, rng, B, grid, tolerance, dtype):
    L = grid[0] * grid[1]
    q, b = make(rng, B, L, 6, 19)
    b = b.astype(dtype)
    counts = rng.integers(1, 7, L)
    for c in (None, counts):
        ref = kernels.min_distance_numpy(q, b, counts=c, grid=grid, tolerance=tolerance)
        close(kernels.min_distance(q, b, kernel, counts=c, grid=grid, tolerance=tolerance), ref)


def test_tolerance_reference_by_brute_force(rng):
    q, b = make(rng, 2, 12, 3, 5)
    got = kernels.min_distance(q, b, "numpy", grid=(3, 4), tolerance=1)
    for l in range(12):
        y, x = divmod(l, 4)
        rows = np.concatenate([b[m] for m in range(12)
                               if max(abs(m // 4 - y), abs(m % 4 - x)) <= 1])
        want = np.sqrt(((q[:, l, None] - rows[None]) ** 2).sum(-1)).min(1)
        np.testing.assert_allclose(got[:, l], want, rtol=1e-6)


def test_rows_beyond_counts_are_never_read(kernel, rng):
    q, b = make(rng, 3, 4, 5, 17)
    counts = np.array([1, 2, 5, 3])
    b[0, 1:] = q[0, 0]  # would give 0 if the padding were read
    b[1, 2:] = np.nan
    got = kernels.min_distance(q, b, kernel, counts=counts)
    assert np.isfinite(got).all() and (got[0, 0] > 0)
    close(got, kernels.min_distance_numpy(q, b, counts=counts))


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e4])
@pytest.mark.parametrize("B", [1, 17])
def test_exact_matches_are_zero(kernel, rng, scale, B):
    L, K, D = 5, 9, 384
    q, b = make(rng, B, L, K, D, scale)
    q[0] = b[:, 4]  # every location of the first image matches a row
    got = kernels.min_distance(q, b, kernel)
    assert (got[0] == 0).all()
    close(got, kernels.min_distance_numpy(q, b))


def test_exact_matches_fp16(kernel, rng):
    q, b = make(rng, 2, 3, 4, 40, 1e3)
    b16 = b.astype(np.float16)
    q[1] = b16[:, 2].astype(np.float32)
    got = kernels.min_distance(q, b16, kernel)
    assert (got[1] == 0).all()


def test_duplicates(kernel, rng):
    q, b = make(rng, 4, 3, 8, 24)
    b[:] = b[:, :1]  # every row of a location identical
    q[2] = b[:, 0] + 1e-3
    close(kernels.min_distance(q, b, kernel), kernels.min_distance_numpy(q, b))


def test_nan_query_gives_nan(kernel, rng):
    q, b = make(rng, 2, 3, 4, 20)
    q[1, 2, 7] = np.nan
    got = kernels.min_distance(q, b, kernel, grid=(1, 3), tolerance=1)
    assert np.isnan(got[1, 2]) and np.isfinite(np.delete(got.ravel(), 5)).all()


# The C++ kernel splits a batch across threads when there are fewer than
# 4 locations per thread; the batch tests use enough locations for 16 threads.
WHOLE_BATCH_L = 64


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batches_across_lane_groups(kernel, rng, dtype):
    """The C++ batch kernel packs queries into vector lanes (16, then 8, the rest
    query-major on AVX-512; 8, 4 on AVX2): every split, with exact matches
    across the batch, a NaN in its last query and in one bank row (a running
    minimum alone would drop it), a location of identical rows, and rows that
    do not fill a row block."""
    for B in (2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 20, 24, 25, 31, 32, 33, 40):
        q, b = make(rng, B, WHOLE_BATCH_L, 13, 37)
        b = b.astype(dtype)
        for i in range(0, B, 5):
            q[i, 1] = b[1, 12]  # exact match with the last, odd row
        q[B - 1, 2, 5] = np.nan
        b[0, 6, 0] = np.nan  # every query at location 0 gives NaN
        b[2] = b[2, 3]  # ties: every row a candidate for every query
        ref = kernels.min_distance_numpy(q, b)
        got = kernels.min_distance(q, b, kernel)
        close(got, ref)
        assert (got[::5, 1] == 0).all(), (B, got[::5, 1])


@pytest.mark.parametrize("D", [384, 37])
def test_near_ties_are_resolved_exactly(kernel, rng, D):
    """Rows at distances 1, 1.001, 1.002, ... of a query, in random directions:
    a kernel that screens in low precision (bf16 on AVX-512) cannot order them
    and must refine every candidate exactly; a wrong pick is off by >= 1e-3."""
    B, L, K = 20, WHOLE_BATCH_L, 64
    q = rng.standard_normal((B, L, D)).astype(np.float32)
    step = rng.standard_normal((L, K, D))
    step /= np.linalg.norm(step, axis=-1, keepdims=True)
    tolerance = 1 + 1e-3 * rng.permutation(K)
    b = (q[0, :, None, :] + tolerance[None, :, None] * step).astype(np.float32)
    ref = kernels.min_distance_numpy(q, b)
    got = kernels.min_distance(q, b, kernel)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(got[0], 1.0, atol=1e-4)


def test_non_contiguous_and_other_dtypes(kernel, rng):
    q, b = make(rng, 6, 4, 10, 48)
    qv, bv = q[::2, :, ::2], b[:, ::3, ::2]  # strided views
    assert not qv.flags.c_contiguous and not bv.flags.c_contiguous
    ref = kernels.min_distance_numpy(np.ascontiguousarray(qv), np.ascontiguousarray(bv))
    close(kernels.min_distance(qv, bv, kernel), ref)
    close(kernels.min_distance(qv.astype(np.float64), np.asfortranarray(bv), kernel), ref)


def test_empty_batch(kernel, rng):
    q, b = make(rng, 0, 3, 2, 4)
    assert kernels.min_distance(q, b, kernel).shape == (0, 3)


# --- k-center ----------------------------------------------------------------

@pytest.mark.parametrize("shape,k", [((3, 40, 17), 8), ((1, 1, 5), 1), ((2, 30, 1), 30), ((4, 64, 384), 16)])
def test_kcenter_matches_numpy(kernel, rng, shape, k):
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(kernels.kcenter_greedy(x, k, kernel), kernels.kcenter_greedy_numpy(x, k))


def test_kcenter_ties(kernel, rng):
    """Ties go to the lowest index in every kernel (np.argmin / np.argmax rule).

    With duplicated rows the distances of the copies are computed by the same
    arithmetic, so they tie exactly; once every row is at distance 0 from the
    centres, row 0 is picked again.
    """
    x = np.repeat(rng.standard_normal((2, 3, 8)).astype(np.float32), 4, axis=1)  # 3 points x 4 copies
    got = kernels.kcenter_greedy(x, 6, kernel)
    np.testing.assert_array_equal(got, kernels.kcenter_greedy_numpy(x, 6))
    assert (got[:, 3:] == 0).all()


def test_kcenter_properties(rng):
    x = rng.standard_normal((2, 50, 6)).astype(np.float32)
    idx = kernels.kcenter_greedy(x, 10, "numpy")
    for l in range(2):
        assert len(set(idx[l])) == 10
        first = np.argmin(((x[l] - x[l].mean(0)) ** 2).sum(1))
        assert idx[l, 0] == first


# --- dispatch and input checks -------------------------------------------------

def test_available_and_resolve(monkeypatch):
    found = kernels.available()
    assert found[-1] == "numpy" and set(found) <= set(kernels.KERNELS)
    monkeypatch.delenv("DINOPATCH_KERNEL", raising=False)
    assert kernels.resolve() == found[0] == kernels.resolve("auto")
    monkeypatch.setenv("DINOPATCH_KERNEL", "numpy")
    assert kernels.resolve() == "numpy"
    assert kernels.resolve("cpp" if "cpp" in found else "numpy") in found
    with pytest.raises(ValueError, match="unknown kernel "):
        kernels.resolve("fortran")
    if "cuda" not in found:
        with pytest.raises(ValueError, match="not available"):
            kernels.resolve("cuda")


def test_compiled_extension_is_built():
    # pip install builds dinopatch._C; without it every cpp case above would vanish unseen.
    assert kernels._C is not None and "cpp" in kernels.available(), "dinopatch._C is not built: pip install -e ."


def test_cpp_reports_isas():
    assert kernels.isas()[-1] == "generic" and kernels.isa() in kernels.isas()
    with pytest.raises(ValueError):
        kernels.set_isa("sse9")


@pytest.mark.parametrize("kernel", kernels.available())
def test_min_distance_errors(kernel, rng):
    q, b = make(rng, 2, 6, 3, 5)
    bad = [
        (dict(queries=q[0]), "queries must have 3 dimensions"),
        (dict(queries=q.astype(np.int32)), "float array"),
        (dict(bank=b[:4]), r"disagree on L or D"),
        (dict(bank=b[:, :, :4]), r"disagree on L or D"),
        (dict(bank=b[:, :0]), r"K = 0"),
        (dict(counts=np.array([1, 2, 3])), r"shape \(6,\)"),
        (dict(counts=np.array([1, 2, 3, 4, 0, 1])), r"\[1, K = 3\]"),
        (dict(counts=np.array([1, 2, 3, 4, 4, 1])), r"\[1, K = 3\]"),
        (dict(counts=np.ones(6)), "integer"),
        (dict(grid=(2, 2), tolerance=1), r"grid \(2, 2\) does not match L = 6"),
        (dict(tolerance=1), "needs grid"),
        (dict(grid=(2, 3), tolerance=-1), "tolerance must be >= 0"),
        (dict(grid=(2.5, 2.4), tolerance=1), "two integers"),
    ]
    with pytest.raises(TypeError, match="tolerance must be an integer"):
        kernels.min_distance(q, b, kernel, grid=(2, 3), tolerance=1.5)
    for change, message in bad:
        args = dict(queries=q, bank=b) | change
        qq, bb = args.pop("queries"), args.pop("bank")
        with pytest.raises(ValueError, match=message):
            kernels.min_distance(qq, bb, kernel, **args)


def test_compiled_entry_points_reject_bad_shapes(rng):
    q, b = make(rng, 2, 6, 3, 5)
    with pytest.raises(ValueError):
        kernels._C.min_distance(q, b[:4], None, 4, 1, 0)
    with pytest.raises(ValueError):
        kernels._C.min_distance(q, b, np.array([1, 9, 1, 1, 1, 1]), 6, 1, 0)
    with pytest.raises(ValueError):
        kernels._C.min_distance(q, b, None, 5, 1, 0)
    with pytest.raises(ValueError):
        kernels._C.kcenter_greedy(b, 4)
    # An empty batch straight into the extension: an empty answer, not a division by zero.
    assert kernels._C.min_distance(q[:0], b, None, 6, 1, 0).shape == (0, 6)


@pytest.mark.parametrize("kernel", kernels.available())
def test_kcenter_errors(kernel, rng):
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    for k in (0, 6):
        with pytest.raises(ValueError, match=r"k = \d must be in \[1, N = 5\]"):
            kernels.kcenter_greedy(x, k, kernel)
    with pytest.raises(ValueError, match="3 dimensions"):
        kernels.kcenter_greedy(x[0], 2, kernel)
    x[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        kernels.kcenter_greedy(x, 2, kernel)


# --- CUDA ----------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_is_listed_when_present():
    need_cuda()
    assert kernels.available()[0] == "cuda" and ("cuda", None) in CASES  # every parity test runs on it


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_device_resident_queries(rng, dtype):
    """min_distance_device on device buffers equals the host call; host pointers are refused."""
    need_cuda()
    from dinopatch import _C_cuda

    q, b = make(rng, 5, 12, 33, 200)
    b = b.astype(dtype)
    q[0] = b[:, 3]
    dev = kernels.upload(b)
    qd, out = _C_cuda.DeviceBuffer(q.nbytes), _C_cuda.DeviceBuffer(5 * 12 * 4)
    qd.copy_from_host(q)
    for tolerance in (0, 1):
        ms = _C_cuda.EventTimer().time(lambda: dev.min_distance_device(qd.ptr, out.ptr, 5, 3, 4, tolerance))
        got = np.empty((5, 12), np.float32)
        out.copy_to_host(got)
        assert ms > 0 and (got[0] == 0).all()
        close(got, kernels.min_distance_numpy(q, b, grid=(3, 4), tolerance=tolerance))
        np.testing.assert_array_equal(got, kernels.min_distance(q, dev, "cuda", grid=(3, 4), tolerance=tolerance))
    with pytest.raises(ValueError, match="device pointers"):
        dev.min_distance_device(q.ctypes.data, out.ptr, 5, 3, 4, 0)
    with pytest.raises(ValueError, match="grid"):
        dev.min_distance_device(qd.ptr, out.ptr, 5, 4, 4, 0)
    with pytest.raises(ValueError, match="C-contiguous with"):
        qd.copy_from_host(q[:2])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape,grid,tolerance", [((17, 12, 33, 383), (3, 4), 1), ((32, 64, 200, 768), (8, 8), 0),
                                               ((1, 1, 1, 1), None, 0)])
def test_cuda_parity(rng, dtype, shape, grid, tolerance):
    need_cuda()
    q, b = make(rng, *shape)
    b = b.astype(dtype)
    q[0] = b[:, 0]  # row 0 is valid under any counts: exact matches
    counts = rng.integers(1, shape[2] + 1, shape[1])
    reference = "cpp" if "cpp" in kernels.available() else "numpy"
    for c in (None, counts):
        got = kernels.min_distance(q, b, "cuda", counts=c, grid=grid, tolerance=tolerance)
        assert (got[0] == 0).all()
        close(got, kernels.min_distance(q, b, reference, counts=c, grid=grid, tolerance=tolerance))


@pytest.mark.cuda
def test_cuda_kcenter_parity(rng):
    need_cuda()
    x = rng.standard_normal((5, 300, 384)).astype(np.float32)
    np.testing.assert_array_equal(kernels.kcenter_greedy(x, 40, "cuda"), kernels.kcenter_greedy_numpy(x, 40))


# -- property tests: any small shape, any kernel, the reference's answer ----------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(B=st.integers(0, 40), h=st.integers(1, 4), w=st.integers(1, 4), K=st.integers(1, 6), D=st.integers(1, 40),
       tolerance=st.integers(0, 2), f16=st.booleans(), ragged=st.booleans(), seed=st.integers(0, 2**16),
       per_location=st.booleans())
def test_min_distance_any_shape(B, h, w, K, D, tolerance, f16, ragged, seed, per_location):
    """``per_location``: a tolerance map of tolerances in [0, tolerance + 1] instead of one tolerance."""
    rng = np.random.default_rng(seed)
    L = h * w
    if per_location:
        tolerance = rng.integers(0, tolerance + 2, L).astype(np.int8)
    q = rng.standard_normal((B, L, D), dtype=np.float32)
    bank = rng.standard_normal((L, K, D), dtype=np.float32).astype(np.float16 if f16 else np.float32)
    counts = rng.integers(1, K + 1, L) if ragged else None
    if B:
        q[0, :, :] = bank[:, 0, :]  # exact matches too
    ref = kernels.min_distance_numpy(q, bank, counts, (h, w), tolerance)
    for be in kernels.available():
        got = kernels.min_distance(q, bank, be, counts=counts, grid=(h, w), tolerance=tolerance)
        assert got.shape == (B, L) and got.dtype == np.float32
        if B:
            close(got, ref)
            assert (got[0] == 0).all(), got[0]  # exact matches give exactly 0


@settings(max_examples=40, deadline=None)
@given(qshape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
       bshape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
       dtype=st.sampled_from([np.float32, np.float16, np.float64, np.int32, np.bool_]))
def test_min_distance_bad_shapes_raise_value_error(qshape, bshape, dtype):
    """Any shapes and dtypes: an answer of the right shape or a ValueError, never an abort."""
    q, b = np.ones(qshape, dtype), np.ones(bshape, dtype)
    for be in kernels.available():
        try:
            out = kernels.min_distance(q, b, be)
        except ValueError:
            continue
        assert out.shape == (qshape[0], qshape[1])
