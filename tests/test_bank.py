"""MemoryBank: its device copy on the cuda kernel, copies and pickles.

No GPU here: a stand-in for ``dinopatch._C_cuda`` counts uploads and computes
with the numpy reference, so the real code paths of ``bank.py`` and
``kernels.py`` run up to the compiled call.
"""

import copy
import gc
import pickle
import threading
import time
import types
import weakref

import numpy as np
import pytest

from dinopatch import kernels
from dinopatch.bank import MemoryBank


class FakeDeviceBank:
    """Stands in for ``_C_cuda.DeviceBank``: a slow upload, counted."""

    uploads = 0
    during_upload = None  # called inside the constructor when set

    def __init__(self, bank, f16, counts):
        if FakeDeviceBank.during_upload is not None:
            FakeDeviceBank.during_upload()
        time.sleep(0.05)  # wide enough for racing threads to all miss a cache without a lock
        FakeDeviceBank.uploads += 1
        self.rows = (bank.view(np.float16) if f16 else bank).copy()  # a device copy holds no reference
        self.counts = counts
        self.shape = self.rows.shape
        self.f16 = f16

    def min_distance(self, q, h, w, tolerance):
        return kernels.min_distance_numpy(q, self.rows, self.counts, (h, w), tolerance)


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeDeviceBank.uploads = 0
    FakeDeviceBank.during_upload = None
    monkeypatch.setattr(
        kernels, "_cuda", lambda: types.SimpleNamespace(DeviceBank=FakeDeviceBank, device_count=lambda: 1)
    )
    yield FakeDeviceBank
    FakeDeviceBank.during_upload = None


def _bank(rng, tolerance=1, dtype=np.float32):
    return MemoryBank(rng.standard_normal((12, 5, 16)).astype(dtype), (3, 4), tolerance)


def _tokens(rng, n=3):
    return rng.standard_normal((n, 3, 4, 16)).astype(np.float32)


def _reference(bank, tokens):
    q = tokens.reshape(len(tokens), -1, bank.dim)
    return kernels.min_distance_numpy(q, bank.features, grid=bank.grid, tolerance=bank.tolerance).reshape(
        tokens.shape[:3]
    )


def test_concurrent_first_use_uploads_once(fake_cuda, rng):
    bank, tokens = _bank(rng), _tokens(rng)
    start = threading.Barrier(6)
    results, errors = [None] * 6, []

    def predict(i):
        try:
            start.wait()
            results[i] = bank.distances(tokens, kernel="cuda")
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=predict, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and fake_cuda.uploads == 1
    for r in results:
        np.testing.assert_allclose(r, _reference(bank, tokens), rtol=1e-6)
    bank.distances(tokens, kernel="cuda")
    assert fake_cuda.uploads == 1


def test_host_backends_never_upload(fake_cuda, rng):
    bank, tokens = _bank(rng), _tokens(rng)
    for kernel in [b for b in kernels.available() if b != "cuda"]:
        np.testing.assert_allclose(
            bank.distances(tokens, kernel=kernel), _reference(bank, tokens), rtol=1e-4
        )
    assert fake_cuda.uploads == 0 and bank._device is None


def test_device_copy_dies_with_the_bank_and_collection_never_deadlocks(fake_cuda, rng):
    """A garbage collection inside one bank's upload frees another bank's device
    copy; nothing in that path takes a lock (the old global cache's finalizer did,
    and a collection inside its locked region deadlocked the thread on itself)."""
    old, tokens = _bank(rng), _tokens(rng)
    old.distances(tokens, kernel="cuda")
    copy_of_old = weakref.ref(old._device)
    old.cycle = old  # only the collector frees it
    del old
    fake_cuda.during_upload = gc.collect
    new = _bank(rng)
    worker = threading.Thread(target=new.distances, args=(tokens, "cuda"), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "collection inside an upload deadlocked"
    assert copy_of_old() is None and fake_cuda.uploads == 2 and new._device is not None


def test_copies_and_pickles_carry_host_rows_only(fake_cuda, rng):
    bank, tokens = _bank(rng, dtype=np.float16), _tokens(rng)
    want = bank.distances(tokens, kernel="cuda")
    for other in (pickle.loads(pickle.dumps(bank)), copy.deepcopy(bank)):
        assert other._device is None and other.features.dtype == np.float16
        np.testing.assert_array_equal(other.features, bank.features)
        np.testing.assert_array_equal(other.distances(tokens, kernel="cuda"), want)
        with pytest.raises(ValueError, match="read-only"):
            other.features[0, 0, 0] = 1
    assert fake_cuda.uploads == 3


def test_features_read_only_through_the_bank_only(rng):
    rows = rng.standard_normal((12, 5, 16)).astype(np.float32)
    bank = MemoryBank(rows, (3, 4))
    with pytest.raises(ValueError, match="read-only"):
        bank.features[0, 0, 0] = 1.0
    rows[0, 0, 0] = 1.0  # the caller's own array is untouched by the bank
    assert rows.flags.writeable


def test_host_array_on_cuda_uploads_per_call_and_upload_once(fake_cuda, rng):
    q = rng.standard_normal((2, 12, 16)).astype(np.float32)
    b = rng.standard_normal((12, 5, 16)).astype(np.float32)
    counts = rng.integers(1, 6, 12)
    ref = kernels.min_distance_numpy(q, b, counts, (3, 4), 1)
    for _ in range(2):
        np.testing.assert_allclose(
            kernels.min_distance(q, b, "cuda", counts=counts, grid=(3, 4), tolerance=1), ref, rtol=1e-6
        )
    assert fake_cuda.uploads == 2
    dev = kernels.upload(b, counts)
    for _ in range(2):
        np.testing.assert_allclose(kernels.min_distance(q, dev, grid=(3, 4), tolerance=1), ref, rtol=1e-6)
    assert fake_cuda.uploads == 3


def test_uploaded_bank_misuse_is_a_clear_error(fake_cuda, rng):
    b = rng.standard_normal((6, 3, 8)).astype(np.float32)
    q = rng.standard_normal((2, 6, 8)).astype(np.float32)
    dev = kernels.upload(b)
    bad = [
        (dict(counts=np.full(6, 2)), "counts given to upload"),
        (dict(kernel="numpy"), "on the GPU"),
        (dict(queries=q[:, :4]), "disagree on L or D"),
        (dict(queries=q[..., :5]), "disagree on L or D"),
    ]
    for change, message in bad:
        args = dict(queries=q, kernel="cuda") | change
        with pytest.raises(ValueError, match=message):
            kernels.min_distance(args.pop("queries"), dev, **args)
    for bank, message in ((b[:, :0], "no rows"), (b[0], "3 dimensions"), (b.astype(int), "float array")):
        with pytest.raises(ValueError, match=message):
            kernels.upload(bank)
    with pytest.raises(ValueError, match=r"\[1, K = 3\]"):
        kernels.upload(b, np.full(6, 4))
    assert fake_cuda.uploads == 1


def test_upload_without_cuda_names_the_backends(monkeypatch, rng):
    monkeypatch.setattr(kernels, "_cuda", lambda: None)
    with pytest.raises(ValueError, match="'cuda' is not available"):
        kernels.upload(rng.standard_normal((2, 3, 4)).astype(np.float32))


def test_features_cannot_be_replaced(rng):
    bank = _bank(rng)
    with pytest.raises(AttributeError):
        bank.features = np.zeros_like(bank.features)


# -- a tolerance map: a tolerance per grid location ---------------------------------------------


def _region_reference(features, positions, grid, tolerances, tokens):
    """Brute force: a covered location's nearest row among covered locations within its own tolerance."""
    h, w = grid
    q = tokens.reshape(len(tokens), h * w, -1).astype(np.float64)
    out = np.full(q.shape[:2], np.nan)
    for i, l in enumerate(positions):
        near = [j for j, m in enumerate(positions)
                if max(abs(m // w - l // w), abs(m % w - l % w)) <= tolerances[l]]
        rows = features[near].reshape(-1, q.shape[2]).astype(np.float64)
        out[:, l] = np.sqrt(((q[:, l, None] - rows[None]) ** 2).sum(-1)).min(1)
    return out.reshape(tokens.shape[:3])


def test_map_bank_every_backend_and_the_device_copy(fake_cuda, rng):
    tolerances = rng.integers(0, 3, 12).astype(np.int8)
    bank, tokens = _bank(rng, tolerance=tolerances), _tokens(rng)
    assert bank.max_tolerance == tolerances.max() and "map of 0..2" in repr(bank)
    for kernel in kernels.available() + ["cuda"]:
        np.testing.assert_allclose(bank.distances(tokens, kernel=kernel), _reference(bank, tokens), rtol=1e-4,
                                   atol=1e-5)
    assert fake_cuda.uploads == 1
    zeros = _bank(np.random.default_rng(0), tolerance=np.zeros(12, np.int32))
    plain = _bank(np.random.default_rng(0), tolerance=0)
    for kernel in kernels.available():
        np.testing.assert_array_equal(zeros.distances(tokens, kernel), plain.distances(tokens, kernel))


@pytest.mark.parametrize("match", ["local", "local+global", "global"])
def test_region_bank_with_a_map(fake_cuda, rng, match):
    grid, positions = (4, 5), np.array([1, 2, 3, 6, 7, 8, 11, 12, 17, 18])
    tokens = rng.standard_normal((6, 4, 5, 16)).astype(np.float32)
    tolerances = rng.integers(0, 3, 20).astype(np.int8)
    bank = MemoryBank.fit(tokens[:4], tolerance=tolerances, positions=positions, match=match)
    local = _region_reference(bank.features, positions, grid, tolerances, tokens[4:])
    glob = MemoryBank.fit(tokens[:4], positions=positions, match="global").distances(tokens[4:], "numpy")
    want = {"local": local, "global": glob, "local+global": 0.5 * (local + glob)}[match]
    for kernel in kernels.available() + ["cuda"]:
        np.testing.assert_allclose(bank.distances(tokens[4:], kernel), want, rtol=1e-4, atol=1e-5)


def test_bad_maps_are_refused_and_a_map_stays_read_only(rng):
    features = rng.standard_normal((12, 5, 16)).astype(np.float32)
    for tolerances in (np.zeros(11, np.int8), np.full(12, -1), np.zeros(12, bool), np.zeros(12, np.float32),
                  np.full(12, 300)):
        with pytest.raises(ValueError, match="tolerance map"):
            MemoryBank(features, (3, 4), tolerances)
    tolerances = np.ones(12, np.int32)
    bank = MemoryBank(features, (3, 4), tolerances)
    tolerances[:] = 2  # the caller's array is copied
    assert bank.tolerance.dtype == np.int8 and not bank.tolerance.flags.writeable and bank.max_tolerance == 1
    back = pickle.loads(pickle.dumps(bank))
    assert not back.tolerance.flags.writeable and (back.tolerance == 1).all()
