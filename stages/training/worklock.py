"""One run at a time per work folder: two identical runs on one machine share the folder named by their cache key.

The first run (rank 0 of its launch) holds an exclusive `fcntl` lock on `.<key>.lock` beside the
folder from its cache decision until its commit (which removes the folder). A second identical
run waits, saying so, and then finds the committed run and reuses it (or, with --force, trains in
a fresh folder). The lock is the kernel's: a killed holder releases it at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..base.locks import exclusive_lock


@contextmanager
def work_folder_lock(root: Path, key: str) -> Iterator[None]:
    """Hold the lock of the work folder `root / key` while inside."""
    waiting = (
        f"another run with the same inputs and parameters is training on this machine (work folder {root / key}); "
        "waiting for it to finish, then its committed run is reused"
    )
    with exclusive_lock(root / f".{key}.lock", waiting):
        yield
