"""DeepSpeed's compiled ops, built once per machine by torch's JIT extension builder, safely under several processes.

torch guards a build with a `lock` file in the op's build folder that only the builder removes: a
process killed while compiling (an OOM kill, Ctrl-C, a stopped pod) leaves it behind, and every
later run on the machine waits for it forever, silently. Our processes build under an `fcntl`
lock of their own (released by the kernel when its holder dies), so a `lock` file found while
holding it belongs to no live build of ours: once it is older than any build takes, it is
removed, with a warning, and the op built.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..base.library_output import import_deepspeed

log = logging.getLogger(__name__)

OPS = ("ShareMemCommBuilder",)  # what DeepSpeed compiles when a process group starts on the CPU (used by several ranks)


def extensions_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


@contextmanager
def op_build_guard(names: tuple[str, ...], root: Path | None = None) -> Iterator[None]:
    """While inside, this process alone (of ours) builds the ops `names` under `root`, and no dead builder's `lock` is left.

    A `lock` younger than STALE_SECONDS may be a build by a process that does not take our lock (an
    older version, another program): it is waited for; an older one is taken for a killed build.
    """
    root = root or extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".spectrum-build.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process on this machine is building DeepSpeed's ops (once per machine); waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for name in names:
                for baton in [*root.glob(f"{name}/lock"), *root.glob(f"*/{name}/lock")]:
                    _clear(baton)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


STALE_SECONDS = 900.0  # far longer than an op build takes


def _clear(baton: Path) -> None:
    """Wait for a live build's `lock` to go; remove one older than STALE_SECONDS (its builder died)."""
    waited = False
    while True:
        try:
            age = time.time() - baton.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_SECONDS:
            log.warning("removing %s, left by an op build that was killed; the op is built again", baton)
            baton.unlink(missing_ok=True)
            return
        if not waited:
            log.warning("waiting for the op build that holds %s (a lock older than %d s is taken for a killed build)", baton, STALE_SECONDS)
            waited = True
        time.sleep(2.0)


def skip_ops() -> None:
    """One process: DeepSpeed's CPU communication op would be compiled (~100 s on 2 cores, again in every new venv or
    container) for collectives a single rank never makes. Marked incompatible for this process, DeepSpeed runs without
    it, as it does on a machine that cannot build it; its files are not touched."""
    import_deepspeed()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False


def build_ops() -> None:
    """Build (or load, when built) the ops DeepSpeed will load, before any process group exists (several ranks)."""
    import_deepspeed()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builders = [get_accelerator().create_op_builder(name) for name in OPS]
    builders = [b for b in builders if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False)]
    if not builders:
        return
    with op_build_guard(tuple(b.name for b in builders)):
        for builder in builders:
            builder.load(verbose=False)
