"""Atomic publication of local output files: readers see the whole file or nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InputError, OutputExistsError


def ensure_writable(path: Path, overwrite: bool) -> None:
    """Check, before any work, that `path` can be written: not a folder, not taken, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output or pass --overwrite to replace it")
    ensure_writable_folder(path.parent, f"the folder of output {path}")


def ensure_writable_folder(folder: Path, what: str) -> None:
    """Probe the nearest existing folder at or above `folder` with a temporary file (catches read-only mounts too)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError(f"{what} is not writable ({existing}: {exc.strerror}); choose a writable location") from exc


def ensure_distinct(outputs: dict[str, str | Path | None]) -> None:
    """Refuse two options naming the same output file (one would silently replace the other)."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).absolute().resolve()
        if resolved in seen:
            raise InputError(f"{seen[resolved]} and {option} both name {path}; give each output its own file")
        seen[resolved] = option


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
