"""Which image files a command reads: files under folders, where they are rooted, and clean training sets.

Folders are searched recursively, in sorted order, without following links
and without hidden files (a ``._part.png`` left by another system is not a
part).  Ground-truth masks are never scored as parts, and a training set that
mixes in test images or masks is refused, not fitted on.
"""
from __future__ import annotations

import os
from pathlib import Path

from .data import IMAGE_SUFFIXES, MVTecFolder

MVTEC_LAYOUT = ("the MVTec AD layout: train/good/<images>, test/good/<images>, test/<defect>/<images>, "
                "ground_truth/<defect>/<name>_mask.png")


def is_mvtec_root(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds ``train/good`` as an MVTec AD category does."""
    return (Path(folder) / "train" / "good").is_dir()


def _walk(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _expand(items: list[str]) -> list[tuple[Path, Path | None]]:
    """``(file, the folder it was found under)`` per image; ``None`` for a file given by name."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += [(f, p) for f in _walk(p)]
        elif p.is_file():
            out.append((p, None))
        else:
            raise ValueError(f"{item}: no such file or folder")
    return out


def prediction_files(items: list[str]) -> tuple[list[Path], int]:
    """The images to score, in input order, each once.

    Files under a ``ground_truth`` folder below a given folder are masks, not
    parts: they are left out.  A file given by name is taken whatever it holds
    (reading it may fail; that is recorded per input).

    Returns:
        the files, and how many masks were left out.
    """
    files, seen, masks = [], set(), 0
    for f, folder in _expand(items):
        if folder is not None and "ground_truth" in f.relative_to(folder).parts[:-1]:
            masks += 1
            continue
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            files.append(f)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(items)}")
    return files, masks


def training_files(items: list[str]) -> tuple[list[Path], list[str]]:
    """The good images to fit on.

    A folder in the MVTec AD layout gives its ``train/good``.  Anything else is
    searched as it is, and refused if it holds test images or masks: a
    ``test`` or ``ground_truth`` folder below it, ``*_mask`` files, or the
    layout of a test folder itself (``good/`` beside defect folders).

    Returns:
        the files, and one note per MVTec folder saying what was taken from it.
    """
    files, notes = [], []
    rest = []
    for item in items:
        if Path(item).is_dir() and is_mvtec_root(item):
            paths = MVTecFolder(item).train_paths()
            notes.append(f"{item} is in the MVTec AD layout: fitting on its train/good ({len(paths)} images)")
            files += paths
        else:
            rest.append(item)
    for item in rest:
        _refuse_test_folder(Path(item))
    for f, folder in _expand(rest):
        below = f.relative_to(folder).parts[:-1] if folder is not None else ()
        if {"test", "ground_truth"} & set(below) or f.stem.endswith("_mask") \
                or f.parent.name == "ground_truth":
            raise ValueError(f"{f}: a test image or mask in the training set; fit on good parts only: give a "
                             f"train/good folder, or a folder in {MVTEC_LAYOUT}")
        files.append(f)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(items)}")
    return files, notes


def _refuse_test_folder(folder: Path) -> None:
    """A folder holding ``good/`` beside defect folders is an MVTec ``test`` folder: never training data."""
    if not folder.is_dir():
        return
    subs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if "good" in subs and len(subs) > 1:
        others = ", ".join(f"{d}/" for d in subs if d != "good")
        raise ValueError(f"{folder}: good/ beside {others} is the layout of a test folder (a test image or mask "
                         f"in the training set); fit on good parts only: give a train/good folder, or a folder "
                         f"in {MVTEC_LAYOUT}")


def common_root(files: list[Path]) -> Path:
    """The deepest folder that holds every file."""
    return Path(os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]))


def relative_name(file: Path, root: Path, suffix: str) -> Path:
    """``file``'s path below ``root`` with ``suffix`` appended: distinct files get distinct names.

    The suffix is appended, not substituted, so ``a.png`` and ``a.jpg`` in one
    folder give ``a.png.png`` and ``a.jpg.png``.
    """
    rel = Path(os.path.relpath(os.path.abspath(file), root))
    return rel.with_name(rel.name + suffix)
