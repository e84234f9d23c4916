"""Third-party output follows ours: one story on the terminal.

transformers and huggingface_hub draw their own progress bars ("Loading weights", "Writing model
shards", downloads) whatever our --progress says; DeepSpeed logs info lines to stdout, where the
stage's result goes. Both are brought in line here, without importing transformers or DeepSpeed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator

HUB_PROGRESS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"  # a user's own setting wins over --progress


def follow_progress(progress: bool | None) -> None:
    """Library progress bars on exactly when ours are (None: when stderr is a terminal).

    huggingface_hub keeps the switch (a small import); transformers reads it when imported and is
    switched directly when it already is.
    """
    enabled = sys.stderr.isatty() if progress is None else progress
    if enabled and os.environ.get(HUB_PROGRESS_ENV):
        return
    from huggingface_hub import utils as hub

    (hub.enable_progress_bars if enabled else hub.disable_progress_bars)()
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()


def import_deepspeed():
    """`import deepspeed`, quietly: on a machine without CUDA its accelerator is named (DeepSpeed would detect the
    same CPU accelerator and print a warning about it on stdout), and its log lines go to stderr."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    with _hidden(UNUSED_BY_DEEPSPEED):
        import deepspeed

    deepspeed_to_stderr()
    return deepspeed


# Imported by DeepSpeed only for its autotuner (which we never run), when installed: mlflow alone costs ~1 s and
# ~100 MiB (fastapi, pydantic, redis…) in every training process. Tracking imports it itself where it is used.
UNUSED_BY_DEEPSPEED = ("mlflow",)


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    """While inside, `import NAME` fails as if NAME were not installed (unless it is already imported)."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, "") is None:
                del sys.modules[name]


# What DeepSpeed says on every start that tells a user nothing: its shared-memory op "built successfully"
# (printed, even when only loaded) and its scheduler asked for a rate before step 0 during initialize.
ROUTINE_DEEPSPEED = ("built successfully", "Attempting to get learning rate from scheduler before it has started")


class _DropRoutine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in ROUTINE_DEEPSPEED)


@contextlib.contextmanager
def deepspeed_start() -> Iterator[None]:
    """Around deepspeed.initialize: what it prints on stdout goes to stderr, its routine lines nowhere."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip() and not any(text in line for text in ROUTINE_DEEPSPEED):
                print(line, file=sys.stderr)


def deepspeed_to_stderr() -> None:
    """DeepSpeed's logger prints to stdout: its lines (warnings and worse) go to stderr, its routine ones nowhere."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropRoutine) for f in logger.filters):
        logger.addFilter(_DropRoutine())
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)
