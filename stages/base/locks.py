"""Exclusive locks between processes of one machine on a shared local folder (work folders, the cache).

The lock is the kernel's (`fcntl.flock`): a killed holder releases it at once, so nothing is left
to clean up. A process that has to wait says so once (a warning), then waits.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("stages.locks")


@contextmanager
def exclusive_lock(lock_file: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if missing) while inside; `waiting` is warned if another holds it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.warning("%s", waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
