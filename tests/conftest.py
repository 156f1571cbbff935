import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

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
    from dinopatch.synthetic import make_images

    return make_images("screw", defect, n, seed, size=128)


@pytest.fixture(scope="session")
def screw_detector():
    """A detector fitted on ten good synthetic screws; tests must not change it."""
    from dinopatch import DinoPatch

    return DinoPatch(**FAST).fit(screws("good", 10, seed=1))


def set_layerscale(model, value: float) -> None:
    """Every LayerScale gamma of a timm ViT (``blocks.*.ls1.gamma``, ``ls2.gamma``) set to ``value``."""
    for name, p in model.named_parameters():
        if name.endswith(("ls1.gamma", "ls2.gamma")):
            p.data.fill_(value)


def layerscale_one_checkpoint(folder, name: str, size: int):
    """A random checkpoint of ``name`` with every LayerScale gamma at 1, so that every block matters.

    DINOv2 initialises LayerScale at 1e-5, which leaves a random model nearly
    the identity past the patch embedding and would hide errors in attention
    and MLP (``test_onnx.test_every_block_matters`` shows the difference).
    """
    from safetensors.torch import save_file

    from dinopatch.backbone import build_model, get_spec

    model = build_model(get_spec(name), "random", size, seed=0)
    set_layerscale(model, 1.0)
    path = folder / f"{name}_{size}_gamma1.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def textures(batch: int, side: int = 200, seed: int = 1) -> np.ndarray:
    """Smooth random textures, not at the backbone size, so the resize is exercised too."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (batch, side // 10, side // 10, 3), dtype=np.uint8)
    return np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_LINEAR) for im in small])


_BLOCK = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
"""


def run_without(blocked: tuple[str, ...], code: str, cwd) -> None:
    """Run ``code`` in a fresh interpreter where the top-level packages ``blocked`` cannot be imported."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    script = (_BLOCK.format(blocked=tuple(blocked)) + textwrap.dedent(code)
              + f"\nassert not set({tuple(blocked)!r}) & set(sys.modules), 'a blocked package was imported'\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
