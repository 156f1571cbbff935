"""Outputs are never replaced without --force, and --force never reaches past them."""
import pytest

from dinopatch.outputs import claim


def test_existing_outputs_are_refused_then_removed_with_force(tmp_path):
    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / "old.png").write_bytes(b"old")
    (tmp_path / "scores.csv").write_text("old")
    outputs = [tmp_path / "predictions.jsonl", tmp_path / "scores.csv", tmp_path / "overlays"]
    with pytest.raises(ValueError, match=r"scores.csv exists \(and 1 more .*--force"):
        claim(outputs, force=False, folders_ok=True)
    assert (tmp_path / "overlays" / "old.png").exists()
    claim(outputs, force=True, folders_ok=True)
    assert not any(p.exists() for p in outputs)
    claim(outputs, force=False)  # nothing left to refuse


def test_a_folder_where_a_file_goes_is_refused_even_with_force(tmp_path):
    (tmp_path / "model.npz").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        claim([tmp_path / "model.npz"], force=True)
    assert (tmp_path / "model.npz").is_dir()


def test_force_removes_a_link_not_what_it_points_to(tmp_path):
    kept = tmp_path / "elsewhere"
    kept.mkdir()
    (kept / "precious.png").write_bytes(b"keep")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "overlays").symlink_to(kept)
    claim([tmp_path / "out" / "overlays"], force=True, folders_ok=True)
    assert not (tmp_path / "out" / "overlays").exists() and (kept / "precious.png").exists()
