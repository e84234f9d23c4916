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


# --- where files really live (symbolic links followed) ----------------------------------------

HUB_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")  # how the hub cache names a repository's folder


def link_roots(folder: Path) -> tuple[Path, ...]:
    """The folders the files under `folder` may really live in, once symbolic links are followed.

    Normally `folder` itself (resolved). A snapshot of the Hugging Face hub cache
    (`<cache>/models--org--name/snapshots/<commit>`) stores its files as links into its own
    cache repository (`<cache>/models--org--name/blobs/…`), so for one the root is that
    repository folder; nothing further up (other repositories, the rest of the cache) counts.
    """
    root = Path(folder).resolve()
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith(HUB_CACHE_REPO_PREFIXES) and repo != repo.parent:
        return (repo,)
    return (root,)


def require_inside(path: Path, roots: tuple[Path, ...], what: str, advice: str, error: type[Exception] = InputError) -> Path:
    """Where `path` really leads (every symbolic link followed); `error` unless that is inside one of `roots`.

    The message names `what` (e.g. "file x.json of model /m"), the path it points to, the
    folder(s) it had to stay in, and `advice` (what to do).
    """
    try:
        target = Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise error(f"{what} is a symbolic link that cannot be followed ({exc}); {advice}") from exc
    resolved = [Path(root).resolve() for root in roots]
    if not any(target.is_relative_to(root) for root in resolved):
        inside = " or ".join(str(root) for root in resolved)
        raise error(f"{what} points to {target}, outside {inside}; {advice}")
    return target


def check_links(folder: Path, roots: tuple[Path, ...], what: str, advice: str, error: type[Exception] = InputError) -> None:
    """Refuse any symbolic link under `folder` (to a file or a folder) that leads outside `roots` (see require_inside).

    Names starting with '.' are skipped, as all_files skips them. Linked folders are checked but
    not walked into.
    """
    folder = Path(folder)
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in (*folders, *files):
            path = Path(parent) / name
            if not name.startswith(".") and path.is_symlink():
                relative = path.relative_to(folder).as_posix()
                require_inside(path, roots, f"{relative} in {what}", advice, error)
