"""A tolerance map (a tolerance per location) in every kernel, against the numpy reference.

Tolerance as in test_kernels.py (DESIGN.md): within 1e-4 of the largest
distance in the call, exact matches exactly 0.  A map and one tolerance go
through the same code in every kernel, so where they mean the same thing
(a constant map, a map of zeros) the answers must be bitwise equal.
"""
import numpy as np
import pytest
from conftest import need_cuda
from test_kernels import close, kernel, make  # noqa: F401  (kernel: the per-kernel, per-ISA fixture)

from dinopatch import kernels


def random_map(rng, L, top=2, dtype=np.int8):
    return rng.integers(0, top + 1, L).astype(dtype)


def test_reference_map_by_brute_force(rng):
    """The numpy reference with a map is the brute-force minimum over each location's own neighbourhood."""
    q, b = make(rng, 3, 20, 4, 7)
    tolerances = random_map(rng, 20)
    got = kernels.min_distance(q, b, "numpy", grid=(4, 5), tolerance=tolerances)
    for l in range(20):
        y, x = divmod(l, 5)
        rows = np.concatenate([b[m] for m in range(20) if max(abs(m // 5 - y), abs(m % 5 - x)) <= tolerances[l]])
        want = np.sqrt(((q[:, l, None].astype(np.float64) - rows[None]) ** 2).sum(-1)).min(1)
        np.testing.assert_allclose(got[:, l], want, rtol=1e-6)


@pytest.mark.parametrize("B", [1, 17])
@pytest.mark.parametrize("grid", [(3, 4), (5, 5), (1, 6), (6, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_map_parity_with_counts_and_exact_zeros(kernel, rng, B, grid, dtype):  # noqa: F811
    L = grid[0] * grid[1]
    q, b = make(rng, B, L, 6, 37)
    b = b.astype(dtype)
    q[0] = b[:, 0]  # row 0 is valid under any counts: image 0 matches exactly everywhere
    tolerances = random_map(rng, L)
    for c in (None, rng.integers(1, 7, L)):
        got = kernels.min_distance(q, b, kernel, counts=c, grid=grid, tolerance=tolerances)
        close(got, kernels.min_distance_numpy(q, b, counts=c, grid=grid, tolerance=tolerances))
        assert (got[0] == 0).all(), got[0]


@pytest.mark.parametrize("r", [0, 1, 2])
def test_constant_map_equals_one_tolerance(kernel, rng, r):  # noqa: F811
    """Scalar r == constant map r, bitwise; zeros everywhere == today's tolerance-0 call without a grid."""
    q, b = make(rng, 9, 20, 5, 33)
    for dtype in (np.int8, np.int32, np.int64, np.uint8):
        got = kernels.min_distance(q, b, kernel, grid=(4, 5), tolerance=np.full(20, r, dtype))
        np.testing.assert_array_equal(got, kernels.min_distance(q, b, kernel, grid=(4, 5), tolerance=r))
    if r == 0:
        np.testing.assert_array_equal(kernels.min_distance(q, b, kernel, tolerance=np.zeros(20, np.int8)),
                                      kernels.min_distance(q, b, kernel))


def test_single_location_and_tolerance_beyond_the_grid(kernel, rng):  # noqa: F811
    q, b = make(rng, 4, 1, 3, 17)
    for r in (0, 2):
        close(kernels.min_distance(q, b, kernel, grid=(1, 1), tolerance=np.array([r], np.int8)),
              kernels.min_distance_numpy(q, b))
    # A tolerance past the grid means "every location", as one tolerance does.
    q, b = make(rng, 2, 6, 3, 9)
    far = kernels.min_distance(q, b, kernel, grid=(2, 3), tolerance=np.full(6, 120, np.int32))
    np.testing.assert_array_equal(far, kernels.min_distance(q, b, kernel, grid=(2, 3), tolerance=3))


def test_map_errors(kernel, rng):  # noqa: F811
    q, b = make(rng, 2, 6, 3, 4)
    bad = [
        (np.zeros(5, np.int8), r"shape \(6,\)"),
        (np.zeros((2, 3), np.int8), "tolerance must be an integer"),
        (np.zeros(6, bool), "integer array"),
        (np.zeros(6, np.float32), "integer array"),
        (np.array([0, 1, -1, 0, 0, 0], np.int8), ">= 0"),
    ]
    for tolerance, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            kernels.min_distance(q, b, kernel, grid=(2, 3), tolerance=tolerance)
    with pytest.raises(ValueError, match="needs grid"):
        kernels.min_distance(q, b, kernel, tolerance=np.ones(6, np.int8))


def test_compiled_entry_points_check_the_map(rng):
    """A direct call of dinopatch._C cannot read past a short map or take a negative tolerance (the compiled core
    names it a radius map)."""
    if kernels._C is None:
        pytest.skip("dinopatch._C is not built here")
    q, b = make(rng, 2, 6, 3, 4)
    for tolerance in (np.zeros(5, np.int32), np.array([0, 0, 0, 0, 0, -1]), np.zeros(6, np.float32)):
        with pytest.raises(ValueError, match="radius map"):
            kernels._C.min_distance(q, b, None, 2, 3, tolerance)
    got = kernels._C.min_distance(q, b, None, 2, 3, np.array([0, 1, 2, 0, 1, 2], np.int8))
    close(got, kernels.min_distance_numpy(q, b, grid=(2, 3), tolerance=np.array([0, 1, 2, 0, 1, 2])))


@pytest.mark.cuda
def test_cuda_map_parity(rng):
    """Host bank and uploaded bank, fp32 and fp16, ragged too: the reference's answer, exact zeros, and a
    constant map equal to one tolerance."""
    need_cuda()
    q, b32 = make(rng, 17, 48, 33, 383)
    tolerances, counts = random_map(rng, 48), rng.integers(1, 34, 48)
    for b in (b32, b32.astype(np.float16)):
        q[0] = b[:, 0]
        for c in (None, counts):
            ref = kernels.min_distance_numpy(q, b, counts=c, grid=(6, 8), tolerance=tolerances)
            for bank, bank_counts in ((b, c), (kernels.upload(b, c), None)):
                def run(tolerance, bank=bank, bank_counts=bank_counts):
                    return kernels.min_distance(q, bank, "cuda", counts=bank_counts, grid=(6, 8), tolerance=tolerance)

                got = run(tolerances)
                close(got, ref)
                assert (got[0] == 0).all()
                np.testing.assert_array_equal(run(np.ones(48, np.int8)), run(1))
