"""Outputs a command writes: an existing one is never replaced unless the user says so (``--force``)."""
from __future__ import annotations

import shutil
from pathlib import Path


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
    for p in existing:
        if p in folders:
            shutil.rmtree(p)  # old overlays must not stay beside new ones
        else:
            p.unlink()


def output_folder(out: Path) -> None:
    """Refuse an output folder that is a file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; -o/--output names a folder")
