"""One run at a time per work folder: two identical runs on one machine share the folder named by their cache key.

The first run (rank 0 of its launch) holds an exclusive `fcntl` lock on `.<key>.lock` beside the
folder from its cache decision until its commit (which removes the folder). A second identical
run waits, saying so, and then finds the committed run and reuses it (or, with --force, trains in
a fresh folder). The lock is the kernel's: a killed holder releases it at once.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def work_folder_lock(root: Path, key: str) -> Iterator[None]:
    """Hold the lock of the work folder `root / key` while inside."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(
                "another run with the same inputs and parameters is training on this machine (work folder %s); "
                "waiting for it to finish, then its committed run is reused",
                root / key,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
