"""The shared test backbone is one whose blocks matter, so pipeline tests can see attention and MLP bugs."""
import numpy as np
import pytest
from conftest import BLOCKS_MATTER, screws

torch = pytest.importorskip("torch")


def _tokens(backbone, images):
    return backbone(np.stack(images)).reshape(len(images), -1, backbone.spec.embed_dim)


def _skip(backbone, which):
    for i in which:
        backbone.model.blocks[i] = torch.nn.Identity()


def _cosine(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_fixture_blocks_change_the_tokens():
    from dinopatch.backbone import TorchBackbone

    images = [np.ascontiguousarray(im[8:120, 8:120]) for im in screws("good", 2, seed=5)]
    full = TorchBackbone(weights=BLOCKS_MATTER, image_size=112)
    with_blocks = _tokens(full, images)
    # The same weights with every block skipped: only patch embedding and the final norm remain.
    skipped = TorchBackbone(weights=BLOCKS_MATTER, image_size=112)
    _skip(skipped, range(len(skipped.model.blocks)))
    without = _tokens(skipped, images)
    assert _cosine(with_blocks, without) < 0.9
    # And one block more or less is seen too: the last block alone moves the tokens.
    last_off = TorchBackbone(weights=BLOCKS_MATTER, image_size=112)
    _skip(last_off, [len(last_off.model.blocks) - 1])
    assert _cosine(with_blocks, _tokens(last_off, images)) < 0.99


def test_default_random_init_is_why():
    # The contrast that motivates the fixture: timm's random init barely uses its blocks.
    from dinopatch.backbone import TorchBackbone

    images = [np.zeros((112, 112, 3), np.uint8) + 40, np.full((112, 112, 3), 200, np.uint8)]
    full = TorchBackbone(weights="random", image_size=112)
    skipped = TorchBackbone(weights="random", image_size=112)
    _skip(skipped, range(len(skipped.model.blocks)))
    assert _cosine(_tokens(full, images), _tokens(skipped, images)) > 0.999


def test_random_blocks_are_the_fixture_weights_and_one_command_writes_them(tmp_path, capsys):
    from dinopatch.backbone import TorchBackbone
    from dinopatch.cli import main

    images = np.stack([np.ascontiguousarray(im[8:120, 8:120]) for im in screws("good", 1, seed=5)])
    named = TorchBackbone(weights="random-blocks", image_size=112)
    from_file = TorchBackbone(weights=BLOCKS_MATTER, image_size=112)
    assert named.fingerprint == from_file.fingerprint
    np.testing.assert_array_equal(named(images), from_file(images))
    assert named.fingerprint != TorchBackbone(weights="random", image_size=112).fingerprint
    out = tmp_path / "rb.safetensors"
    assert main(["weights", "--random-blocks", "-o", str(out)]) == 0
    assert out.read_bytes() == open(BLOCKS_MATTER, "rb").read() and "blocks matter" in capsys.readouterr().out
    assert main(["weights", "--random-blocks", "-o", str(out)]) == 2  # never replaced without --force
