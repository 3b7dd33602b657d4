"""Atomic file replacement shared by the data cache, checkpoints and plots.

A training run can be killed at any moment; a half-written checkpoint or token cache that later
loads as if it were whole is worse than none. Every file the trainer produces is therefore
written to a temporary file in the destination's own folder (so the final rename never crosses
a filesystem), fsynced, and moved into place with `os.replace`, which is atomic on POSIX and
Windows. A reader sees either the old file or the new one, never a mix. A process killed
mid-write (SIGKILL, power loss) leaves its temporary file behind; `remove_stale_temps` deletes
those for one destination when the next run starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a closed file's data to disk (needed before the rename that publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Persist a rename: the directory entry lives in the folder, not in the file."""
    if os.name != "posix":  # Windows cannot open a directory; its rename is durable on its own
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit publish it as `path`.

    The caller writes (and closes) the temporary file inside the block. On any exception the
    temporary file is removed and `path` is left exactly as it was.
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise IsADirectoryError(f"{dest}: is a directory, expected a file path to write")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=temp_prefix(dest), suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(folder)


def temp_prefix(path: str | os.PathLike[str]) -> str:
    """The name prefix of every temporary file `atomic_path(path)` creates."""
    return TEMP_PREFIX + Path(path).name + "."


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries left beside `path` by a killed writer; returns what was removed.

    Only call it when no other process may be writing `path` at the same time (the trainer
    owns its run folder), since a live writer's temporary file looks the same.
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        return []
    prefix = temp_prefix(dest)
    removed = []
    for entry in folder.iterdir():
        if entry.name.startswith(prefix) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return sorted(removed)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the final path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)
