"""Safe saves: a file is replaced whole or not at all.

The content is written to a unique temporary ``.<name>.tmp-XXXXXXXX`` in the
target folder, flushed to disk and renamed over the target, so a reader sees
the old file or the new one, never a mix, also with several processes saving
to one path. On any failure, ``KeyboardInterrupt`` included, the temporary is
removed and the target is left as it was. A process killed outright (SIGKILL,
power loss) leaves its temporary behind; the next save to the same path
removes those that no live process holds a lock on and that are older than a
minute (POSIX only; elsewhere they stay).
"""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

try:  # advisory locks mark a temporary that a live process is still writing
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temporaries are not swept
    fcntl = None

_STALE_TMP_S = 60.0


def write(path: str | os.PathLike, fill: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically: ``fill(f)`` writes the content to an open binary file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with open(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            fill(f)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, _file_mode(path))
            os.replace(tmp, path)  # while the lock is held: a sweeper never sees this temporary unlocked
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _file_mode(path: Path) -> int:
    """The mode a plain ``open`` would give ``path``: mkstemp's 0600 would hide the model from other users."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o7777
    umask = 0o022
    with contextlib.suppress(OSError, ValueError, StopIteration):
        # Read, not os.umask(): setting it to read it races with other threads creating files.
        status = Path("/proc/self/status").read_text()
        umask = int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; not every platform lets a folder be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sweep_stale(path: Path) -> None:
    """Remove temporaries of ``path`` left by killed saves: unlocked and over a minute old."""
    if fcntl is None:
        return
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime < _STALE_TMP_S:
                continue  # perhaps a live save between mkstemp and its lock
            with open(tmp, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its writer is alive
                tmp.unlink()
