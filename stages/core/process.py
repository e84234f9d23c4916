"""A stage in a process of its own: exactly the command line its container runs, `python -m stages.<stage> …`.

The arguments come from the config and context (cli.command_line); the child writes the
manifest it committed or reused, and whether it reused it, to a file (`--record`, core.record):
the only way the caller learns the outcome. The child starts as a fresh single process: the caller's own DeepSpeed rendezvous
variables (which name a port the caller's process group holds) are not passed on, nor is $MLFLOW_TRACKING_URI
when the caller does not track (its context decides, not the environment).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from dataclasses import replace

from ..base.errors import SpectrumError
from ..tracking.target import TRACKING_URI_ENV
from .cli import command_line
from .record import read_record
from .stage import Stage, StageConfig, StageContext, StageResult

_ERROR_TAIL_BYTES = 16384  # the child's error line is its last; what precedes it need not be kept
_STOP_SECONDS = 30
RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class StageProcessError(SpectrumError):
    """The stage's process failed; what it committed before stays committed and is reused next time."""

    exit_code = 4


def run_in_own_process(stage: Stage, config: StageConfig, context: StageContext, label: str) -> StageResult:
    """Run the stage as a child process; its stdout becomes the result's lines, its stderr passes through."""
    if context.progress is None:  # the child's stderr is a pipe to this process: it decides for the child as for itself
        context = replace(context, progress=sys.stderr.isatty())
    with context.scratch(f"{label}-record") as folder:
        record = folder / "manifest.json"
        command = [sys.executable, "-m", stage.module, *command_line(stage, config, context, record)]
        # The caller decided about tracking (its context): a child must not turn it on from $MLFLOW_TRACKING_URI.
        dropped = RENDEZVOUS_VARIABLES + (() if context.tracking else (TRACKING_URI_ENV,))
        environment = {k: v for k, v in os.environ.items() if k not in dropped}
        returncode, stdout, error = _run_passing_stderr(command, environment)
        if returncode != 0 or not record.is_file():
            said = f": {error}" if error else ""
            raise StageProcessError(
                f"the {stage.name} stage ({label}) failed in its own process (exit {returncode}){said}; what it committed is "
                f"reused when it runs again. Command: {' '.join(command)}"
            )
        manifest, cached = read_record(record)
    return StageResult(stage.name, tuple(stdout.splitlines()), manifest, cached)


def _run_passing_stderr(command: list[str], environment: dict[str, str]) -> tuple[int, str, str | None]:
    """Run `command`: its exit code, its stdout, and the last `error: …` line of its stderr, which passes through as it comes.

    The child's error line (cli.execute prints exactly one) is what its caller, the notification and
    the flow's state should say, not only "it failed". stderr is relayed as bytes (progress bars'
    carriage returns and undecodable library output pass untouched); only its tail is kept. A
    caller stopped while waiting (Ctrl-C, SIGTERM, any error) stops the child too.
    """
    tail = bytearray()

    def relay(stream) -> None:
        out = getattr(sys.stderr, "buffer", None)
        while chunk := stream.read1(65536):  # what is there now, up to 64 KiB: a bar shows as it is drawn
            if out is not None:
                sys.stderr.flush()
                out.write(chunk)
                out.flush()
            else:  # a replaced sys.stderr (a test's capture) takes text
                sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            tail.extend(chunk)
            del tail[:-_ERROR_TAIL_BYTES]

    child = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = threading.Thread(target=relay, args=(child.stderr,), daemon=True)
    reader.start()
    try:
        stdout = child.stdout.read().decode("utf-8", errors="replace")
        returncode = child.wait()
    except BaseException:
        child.terminate()
        try:
            child.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    finally:
        reader.join(timeout=_STOP_SECONDS)
        child.stdout.close()
        child.stderr.close()
    lines = re.split(r"[\r\n]+", tail.decode("utf-8", errors="replace"))
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return returncode, stdout, errors[-1] if errors else None
