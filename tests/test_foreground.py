"""Foreground-only tokens: the backbone on a subset of patches, and the detector built on it.

The reference for a subset of patches is independent of the gather in
:meth:`TorchBackbone.forward_tensor`: timm's own forward with an attention
mask that hides the dropped patches from every query gives, at the kept
patches, what running only those patches gives.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import BLOCKS_MATTER  # noqa: E402
from dinopatch.backbone import TorchBackbone, check_positions, preprocess  # noqa: E402
from dinopatch.backbone.onnx_export import token_error  # noqa: E402

NAME, SIZE = "dinov2_vits14", 112  # an 8x8 grid


def _images(batch: int, seed: int = 1) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (batch, 12, 12, 3), dtype=np.uint8)
    return np.stack([cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for im in small])


@pytest.fixture(scope="module")
def reference() -> TorchBackbone:
    return TorchBackbone(NAME, BLOCKS_MATTER, SIZE, layers=2)


def _masked_reference(backbone: TorchBackbone, images: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Tokens at ``positions`` from timm's full forward, the other patches masked out as keys."""
    m = backbone.model
    x = torch.from_numpy(preprocess(images, SIZE, backbone.spec.mean, backbone.spec.std))
    n = m.num_prefix_tokens + 64
    keys = torch.zeros(n, dtype=torch.bool)
    keys[:m.num_prefix_tokens] = True
    keys[m.num_prefix_tokens + torch.from_numpy(positions)] = True
    with torch.inference_mode():
        feats = m.forward_intermediates(x, indices=backbone.layers, norm=True, output_fmt="NLC",
                                        intermediates_only=True, attn_mask=keys.expand(1, 1, n, n))
    return torch.stack(feats).mean(0)[:, positions].numpy()


POSITIONS = np.array([9, 10, 11, 17, 18, 19, 20, 27, 28, 36, 44, 45, 46, 54])


def test_torch_subset_matches_masked_attention(reference):
    x = _images(2)
    got = reference(x, POSITIONS)
    ref = _masked_reference(reference, x, POSITIONS)
    assert got.shape == (2, len(POSITIONS), 384)
    assert token_error(got, ref) <= 1e-5
    # The subset is not the full grid's tokens at those places: attention saw fewer patches.
    assert token_error(got, reference(x).reshape(2, 64, -1)[:, POSITIONS]) > 1e-2


def test_torch_every_position_is_the_full_path(reference):
    x = _images(2)
    np.testing.assert_array_equal(reference(x, np.arange(64)), reference(x).reshape(2, 64, -1))


@pytest.mark.parametrize("bad", [[], [3, 3], [5, 2], [-1, 4], [64], [[1, 2]], [1.0, 2.0]])
def test_bad_positions_are_refused(reference, bad):
    with pytest.raises(ValueError, match="positions"):
        reference(_images(1), np.array(bad))
    with pytest.raises(ValueError, match="positions"):
        check_positions(np.array(bad), (8, 8))


def test_onnx_subset_matches_torch(reference, tmp_path):
    pytest.importorskip("onnxruntime")
    from dinopatch.backbone import OnnxBackbone
    from dinopatch.backbone.onnx_export import export_backbone

    engine = OnnxBackbone(path=export_backbone(reference, tmp_path / "l2.onnx"), layers=2)
    x = _images(3)
    for positions in (POSITIONS, np.arange(64), np.array([63])):
        got, ref = engine(x, positions), reference(x, positions)
        assert got.shape == ref.shape == (3, len(positions), 384)
        assert token_error(got, ref) <= 1e-4
    assert token_error(engine(x), reference(x)) <= 1e-4  # the full grid, [B, h, w, D]
    with pytest.raises(ValueError, match="positions"):
        engine(x, np.array([64]))
