"""Which files the commands read, and the names their outputs get."""
from pathlib import Path

import pytest

from dinopatch.inputs import common_root, prediction_files, relative_name, training_files


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_prediction_files_in_order_each_once_without_masks_or_hidden_files(tmp_path):
    touch(tmp_path, "b/x.png", "a/x.png", "a/y.JPG", "a/.z.png", ".hidden/q.png", "notes.txt",
          "ground_truth/crack/000_mask.png", "test/crack/000.png")
    files, masks = prediction_files([str(tmp_path), str(tmp_path / "a" / "x.png")])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/x.png", "a/y.JPG", "b/x.png",
                                                                  "test/crack/000.png"]
    assert masks == 1


def test_prediction_files_take_a_named_file_whatever_it_is(tmp_path):
    touch(tmp_path, "notes.txt")
    assert prediction_files([str(tmp_path / "notes.txt")])[0] == [tmp_path / "notes.txt"]


@pytest.mark.parametrize("items, match", [(["missing"], "no such file or folder"), ([""], "no images")])
def test_prediction_files_refuse_nothing_to_read(tmp_path, items, match):
    with pytest.raises(ValueError, match=match):
        prediction_files([str(tmp_path / i) if i else str(tmp_path) for i in items])


def test_an_mvtec_root_trains_on_train_good_only(tmp_path):
    touch(tmp_path, "train/good/0.png", "train/good/1.png", "test/good/0.png", "test/crack/0.png",
          "ground_truth/crack/0_mask.png")
    files, notes = training_files([str(tmp_path)])
    assert files == [tmp_path / "train/good/0.png", tmp_path / "train/good/1.png"]
    assert len(notes) == 1 and "train/good (2 images)" in notes[0]


@pytest.mark.parametrize("names, given", [
    (["cat/train/good/0.png", "cat/test/crack/0.png"], ""),        # a folder above MVTec roots
    (["good/0.png", "test/0.png"], ""),                             # test images mixed in
    (["good/0.png", "good/0_mask.png"], ""),                         # masks mixed in
    (["ground_truth/crack/0_mask.png"], "ground_truth/crack"),      # a mask folder given
    (["test/good/0.png", "test/crack/0.png"], "test"),              # a test folder itself
    (["parts/good/0.png", "parts/scratch/0.png"], "parts"),         # its layout under another name
])
def test_training_sets_with_test_images_or_masks_are_refused(tmp_path, names, given):
    touch(tmp_path, *names)
    with pytest.raises(ValueError, match="test image or mask in the training set"):
        training_files([str(tmp_path / given)])


def test_output_names_never_collide(tmp_path):
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "x.jpg"]
    root = common_root(files)
    assert root == tmp_path
    names = [relative_name(f, root, ".png").as_posix() for f in files]
    assert names == ["a/x.png.png", "b/x.png.png", "a/x.jpg.png"]
    assert relative_name(tmp_path / "a" / "x.png", tmp_path / "a", ".npy") == Path("x.png.npy")


def test_a_test_folder_itself_is_refused_naming_its_layout(tmp_path):
    touch(tmp_path, "test/good/0.png", "test/crack/0.png", "test/hole/0.png")
    with pytest.raises(ValueError, match=r"good/ beside crack/, hole/ is the layout of a test folder"):
        training_files([str(tmp_path / "test")])
