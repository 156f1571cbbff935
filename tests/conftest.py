import os

# Spinning thread pools (OpenMP in the kernels, torch, ONNX Runtime) fight over
# the 2 cores of CI; set before any of them starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)
