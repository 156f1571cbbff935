"""Outputs are never replaced without --force, and --force never reaches past them."""
import pytest

from dinopatch.outputs import claim, refuse_overlap


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


def test_force_never_removes_a_folder_holding_what_the_command_does_not_write(tmp_path):
    (tmp_path / "overlays" / "cam1").mkdir(parents=True)
    (tmp_path / "overlays" / "cam1" / "a.png.png").write_bytes(b"old overlay")
    (tmp_path / "overlays" / "cam1" / "part.jpg").write_bytes(b"a user's photo")
    with pytest.raises(ValueError, match=r"part.jpg, which this command does not write"):
        claim([tmp_path / "overlays"], force=True, folders_ok=True)
    assert (tmp_path / "overlays" / "cam1" / "part.jpg").exists()


@pytest.mark.parametrize("out, given", [
    ("line", "line/maps"),            # the output holds the input: --force would delete the images
    ("line/maps/out", "line/maps"),   # the output inside the input
    ("line", "line/maps/0.png"),      # a file given by name inside the output
    ("link/out", "line"),             # a link that resolves inside the input
    ("link2", "line/maps"),           # a link that resolves to a folder holding the input
])
def test_an_output_that_overlaps_an_input_is_refused(tmp_path, out, given):
    (tmp_path / "line" / "maps").mkdir(parents=True)
    (tmp_path / "line" / "maps" / "0.png").write_bytes(b"part")
    (tmp_path / "link").symlink_to(tmp_path / "line")
    (tmp_path / "link2").symlink_to(tmp_path / "line")
    with pytest.raises(ValueError, match="inside the"):
        refuse_overlap(tmp_path / out, [tmp_path / given])
    refuse_overlap(tmp_path / "elsewhere", [tmp_path / given])  # apart: accepted
