import atexit
import os
import shutil
import tempfile

# Tests never read or write the user's export cache: what they find there
# would differ from a fresh CI machine.
os.environ["DINOPATCH_CACHE"] = tempfile.mkdtemp(prefix="dinopatch-test-cache-")
atexit.register(shutil.rmtree, os.environ["DINOPATCH_CACHE"], True)

# Spinning thread pools (OpenMP in the kernels, torch, ONNX Runtime) fight over
# the 2 cores of CI; set before any of them starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# 112 px input: an 8x8 token grid, seconds to fit on 2 cores.
FAST = dict(backbone="dinov2_vits14", weights="random", image_size=112, engine="torch", progress=False)


def screws(defect: str, n: int, seed: int) -> list[np.ndarray]:
    from dinopatch.data import make_images

    return make_images("screw", defect, n, seed, size=128)


@pytest.fixture(scope="session")
def screw_detector():
    """A detector fitted on ten good synthetic screws; tests must not change it."""
    from dinopatch import DinoPatch

    return DinoPatch(**FAST).fit(screws("good", 10, seed=1))


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory):
    """``(model file, .onnx export)``: six good screws at 112 px, the backbone exported for torch-free engines."""
    from dinopatch import DinoPatch
    from dinopatch.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx-model")
    det = DinoPatch(**FAST).fit(screws("good", 6, seed=1))
    onnx = export_onnx(det.backbone, det.weights, det.image_size, out=folder / "backbone.onnx", seed=det.seed)
    return det.save(folder / "screw.npz"), onnx
