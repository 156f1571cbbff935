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


_MEASURED_READ = """
import importlib, resource, sys, time
module, name, path = sys.argv[1:]
read = getattr(importlib.import_module(module), name)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# A ceiling, so that a reader that inflates a bomb fails here instead of taking the machine's memory.
with open("/proc/self/statm") as f:
    size = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30), resource.RLIM_INFINITY))
t = time.perf_counter()
try:
    read(path)
    print("LOADED")
except ValueError as e:
    print("VALUEERROR", e)
except Exception as e:
    print("OTHER", type(e).__name__, str(e).strip().splitlines()[-1:])
print("SECONDS", time.perf_counter() - t)
print("PEAK_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


@pytest.fixture
def measured_read():
    """``measured_read("pkg.module.reader", path)``: what the reader says of ``path`` in a fresh process.

    Returns a dict with ``LOADED``, ``VALUEERROR`` (the message) or ``OTHER``,
    and ``SECONDS``; and the growth of the peak resident memory in MB that the
    read cost over the process's baseline after imports.
    """
    import subprocess
    import sys

    def run(reader: str, path):
        module, name = reader.rsplit(".", 1)
        out = subprocess.run([sys.executable, "-c", _MEASURED_READ, module, name, str(path)],
                             capture_output=True, text=True, check=False, timeout=120, cwd=os.path.dirname(path),
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert out.returncode == 0, out.stderr
        said = dict(line.partition(" ")[::2] for line in out.stdout.splitlines())
        return said, float(said["PEAK_MB"])

    return run
