"""Outputs a command writes: an existing one is never replaced unless the user says so (``--force``), and an
output never reaches an input.

``--force`` removes only what a command writes: its named files, and folders of
overlays and maps that hold nothing but such pictures (``.png``, ``.npy``); a
folder holding anything else is refused, so files a user put there survive.
Input and output are compared as resolved paths (links followed), so a link
cannot lead an output into an input.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

# What the commands write into their output folders (overlays, maps).
WRITTEN_SUFFIXES = (".png", ".npy")


def claim(paths: list[Path], force: bool, *, folders_ok: bool = False) -> None:
    """Refuse outputs that exist unless ``force``; with it, remove them (folders only if ``folders_ok``)."""
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if not existing:
        return
    folders = [p for p in existing if p.is_dir() and not p.is_symlink()]
    if folders and not folders_ok:
        raise ValueError(f"{folders[0]} is a folder; give a file name")
    if not force:
        more = f" (and {len(existing) - 1} more of this command's outputs)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]} exists{more}; pass --force to replace")
    for folder in folders:
        _only_written(folder)
    for p in existing:
        if p in folders:
            shutil.rmtree(p)  # old overlays must not stay beside new ones
        else:
            p.unlink()


def _only_written(folder: Path) -> None:
    """Refuse to remove ``folder`` if it holds anything a command does not write there."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p.is_symlink() or (p.is_file() and p.suffix.lower() not in WRITTEN_SUFFIXES):
                raise ValueError(f"{folder} holds {p}, which this command does not write: --force removes only "
                                 "the command's own outputs; move it away or choose another -o")


def refuse_overlap(out: Path, inputs: list[str | os.PathLike], *, inside_ok: bool = False) -> None:
    """Refuse an output that is, contains or (unless ``inside_ok``) lies inside an input; links are followed."""
    o = Path(os.path.realpath(out))
    for item in inputs:
        i = Path(os.path.realpath(item))
        if o == i:
            raise ValueError(f"the output {out} is the input {item}: replacing it would lose the input; choose "
                             "another output")
        if i.is_relative_to(o):
            raise ValueError(f"the input {item} is inside the output {out}: replacing the output would delete "
                             "it; choose another -o")
        if not inside_ok and i.is_dir() and o.is_relative_to(i):
            raise ValueError(f"the output {out} is inside the input folder {item}: a later run would read its "
                             "outputs as parts; choose another -o")


def output_folder(out: Path) -> None:
    """Refuse an output folder that is a file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; -o/--output names a folder")
