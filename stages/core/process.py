"""A stage in a process of its own: exactly the command line its container runs, `python -m stages.<stage> …`.

The arguments come from the config and context (cli.command_line); the child writes the
manifest it committed or reused, and whether it reused it, to a file (`--record`, core.record):
the only way the caller learns the outcome. The child starts as a fresh single process: the caller's own DeepSpeed rendezvous
variables (which name a port the caller's process group holds) are not passed on, nor is $MLFLOW_TRACKING_URI
when the caller does not track (its context decides, not the environment).
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..base.errors import SpectrumError
from ..tracking.target import TRACKING_URI_ENV
from .cli import command_line
from .record import read_record
from .stage import Stage, StageConfig, StageContext, StageResult

RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class StageProcessError(SpectrumError):
    """The stage's process failed; what it committed before stays committed and is reused next time."""

    exit_code = 4


def run_in_own_process(stage: Stage, config: StageConfig, context: StageContext, label: str) -> StageResult:
    """Run the stage as a child process; its stdout becomes the result's lines, its stderr passes through."""
    with context.scratch(f"{label}-record") as folder:
        record = folder / "manifest.json"
        command = [sys.executable, "-m", stage.module, *command_line(stage, config, context, record)]
        # The caller decided about tracking (its context): a child must not turn it on from $MLFLOW_TRACKING_URI.
        dropped = RENDEZVOUS_VARIABLES + (() if context.tracking else (TRACKING_URI_ENV,))
        environment = {k: v for k, v in os.environ.items() if k not in dropped}
        done = subprocess.run(command, check=False, env=environment, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0 or not record.is_file():
            raise StageProcessError(
                f"the {stage.name} stage ({label}) failed in its own process (exit {done.returncode}); what it committed is "
                f"reused when it runs again. Command: {' '.join(command)}"
            )
        manifest, cached = read_record(record)
    return StageResult(stage.name, tuple(done.stdout.splitlines()), manifest, cached)
