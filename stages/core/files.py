"""Atomic publication of local output files: readers see the whole file or nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputExistsError


def ensure_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output or pass --overwrite to replace it")


def write_atomic(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it in one step."""
    ensure_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def all_files(folder: Path) -> list[str]:
    """Relative '/'-separated paths of every file under `folder`, skipping names that start with '.'."""
    found = []
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        relative = Path(parent).relative_to(folder)
        found.extend((relative / name).as_posix() for name in files if not name.startswith("."))
    return sorted(found)
