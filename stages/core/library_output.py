"""Third-party output follows ours: one story on the terminal.

transformers and huggingface_hub draw their own progress bars ("Loading weights", "Writing model
shards", downloads) whatever our --progress says; DeepSpeed logs info lines to stdout, where the
stage's result goes. Both are brought in line here, without importing transformers or DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import sys

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


def deepspeed_to_stderr() -> None:
    """DeepSpeed's logger prints to stdout: its lines (warnings and worse) go to stderr."""
    logger = logging.getLogger("DeepSpeed")
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)
