"""DINOv3 backbones (patch 16, register tokens, rotary positions): the torch engine's region path, the
ONNX export against torch, checkpoints, and the pipeline, on random weights whose blocks matter."""
import numpy as np
import pytest
import timm

if not timm.list_models("vit_small_patch16_dinov3"):
    pytest.skip(f"timm {timm.__version__} has no DINOv3 (needs >= 1.0.20)", allow_module_level=True)

from conftest import SEED_SETTINGS, screws  # noqa: E402

from dinopatch import DinoPatch  # noqa: E402
from dinopatch.backbone import OnnxBackbone, TorchBackbone, get_spec  # noqa: E402
from dinopatch.backbone.onnx_export import export_backbone, token_cosine, token_error  # noqa: E402
from dinopatch.backbone.weights import write_blocks_matter_checkpoint  # noqa: E402

NAME, SIZE = "dinov3_vits16", 112


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_blocks_matter_checkpoint(get_spec(NAME), tmp_path_factory.mktemp("w") / "dinov3.safetensors")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return TorchBackbone(NAME, str(checkpoint), SIZE)


@pytest.fixture
def frames():
    return np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)


def test_spec_and_blocks_matter(reference, checkpoint, frames):
    spec = get_spec(NAME)
    assert spec.patch_size == 16 and spec.hub_tag == "vit_small_patch16_dinov3.lvd1689m"
    assert reference.grid == (7, 7) and reference.model.num_prefix_tokens == 5  # class + 4 registers
    assert reference.fingerprint == TorchBackbone(NAME, "random-blocks", SIZE).fingerprint
    gammas = [p for n, p in reference.model.named_parameters() if n.endswith(("gamma_1", "gamma_2"))]
    assert gammas and all(bool((g == 1).all()) for g in gammas)
    # the blocks change the tokens: without them the output would be the patch embedding's
    timm_random = TorchBackbone(NAME, "random", SIZE)
    assert token_cosine(reference(frames), timm_random(frames)) < 0.99


def test_region_path_matches_every_patch(reference, frames):
    full = reference(frames)
    every = reference(frames, np.arange(49))
    np.testing.assert_allclose(every.reshape(full.shape), full, rtol=1e-5, atol=1e-5)
    part = reference(frames, np.arange(0, 49, 3))
    assert part.shape == (2, 17, 384)  # attention among the kept patches only: differs from the full grid
    assert not np.allclose(part, full.reshape(2, 49, -1)[:, ::3], atol=1e-3)


def test_export_matches_torch(reference, frames, tmp_path):
    path = export_backbone(reference, tmp_path / "dinov3.onnx")
    onnx = OnnxBackbone(path=str(path), fingerprint=reference.fingerprint)
    assert onnx.grid == (7, 7)
    for positions in (None, np.arange(0, 49, 2)):
        got, ref = onnx(frames, positions), reference(frames, positions)
        assert got.shape == ref.shape and token_error(got, ref) < 1e-4


def test_fit_and_predict(checkpoint):
    good = screws("good", 4, 0)
    det = DinoPatch(backbone=NAME, weights=str(checkpoint), image_size=SIZE, engine="torch", progress=False,
                    **SEED_SETTINGS).fit(good)
    bad = screws("extra_object", 2, 1)
    scores = [r.score for r in det.predict(good[:1] + bad)]
    assert np.isfinite(scores).all() and det.model_.golden.frames.shape[1:] == (SIZE, SIZE, 3)
