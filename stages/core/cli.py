"""Command-line plumbing: every stage's options come from its config dataclass (stages.core.stage).

`spectrum <command>` and `python -m stages.<stage>` both call `add_stage_arguments` and
`run_from_args`, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..base import settings
from ..base.errors import OS_ERROR_EXIT, InputError, SpectrumError, describe_os_error, recorded_failure
from ..store import ArtifactStore, StageRef, open_store
from ..store.scrub import redact
from ..tracking import DEFAULT_EXPERIMENT, target_from_settings
from ..tracking.target import EXPERIMENT_ENV, TRACKING_URI_ENV
from .record import write_record
from .stage import Option, Stage, StageConfig, StageContext, options_of

Action = Callable[[argparse.Namespace], str]
_CLEARED = "__cleared"


def add_store_location_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=settings.default_store(),
        help=f"artifact store: a folder, file:///path or s3://bucket/prefix (default: ${settings.STORE_ENV})",
    )
    parser.add_argument(
        "--s3-endpoint-url",
        help=f"S3-compatible endpoint, e.g. http://127.0.0.1:8333 (default: ${settings.S3_ENDPOINT_ENV}, else AWS settings)",
    )


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every stage has: where it publishes and how it runs."""
    add_store_location_arguments(parser)
    parser.add_argument("--run-id", help="run to record this stage under (default: a new run id)")
    parser.add_argument(
        "--step", metavar="QUALIFIER", help="record the stage as the step <stage>.QUALIFIER of the run (a second scan, say)"
    )
    parser.add_argument("--force", action="store_true", help="run even when a committed run has the same inputs and parameters")
    parser.add_argument(
        "--work-dir", help=f"where outputs are built before they are stored (default: ${settings.WORK_DIR_ENV} or ~/.cache/spectrum/work)"
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: when on a terminal)"
    )
    parser.add_argument(
        "--record", metavar="FILE", help="write the outcome to FILE (JSON: the manifest committed or reused, and whether it was reused)"
    )
    add_tracking_arguments(parser)


def add_tracking_arguments(parser: argparse.ArgumentParser, parent: bool = True) -> None:
    """Where the stage is logged in MLflow: off unless a tracking URI is given (here or in $MLFLOW_TRACKING_URI)."""
    parser.add_argument(
        "--mlflow-tracking-uri",
        metavar="URI",
        help=f"log the stage to this MLflow server (default: ${TRACKING_URI_ENV}; none: not tracked)",
    )
    parser.add_argument(
        "--mlflow-experiment", metavar="NAME", help=f"MLflow experiment (default: ${EXPERIMENT_ENV}, else {DEFAULT_EXPERIMENT})"
    )
    if parent:
        parser.add_argument("--mlflow-parent-run", metavar="ID", help="nest the stage's MLflow run in this one (a pipeline run's)")
        parser.add_argument("--mlflow-unavailable", metavar="WHY", help=argparse.SUPPRESS)  # the pipeline found the tracker down


def add_stage_arguments(parser: argparse.ArgumentParser, stage: Stage) -> None:
    """The stage's own options (from its config dataclass), then the context options."""
    add_config_arguments(parser, stage.config)
    add_context_arguments(parser)


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[StageConfig]) -> None:
    """The options of a config dataclass (a stage's, or a flow's that runs stages, like compare)."""
    hints = typing.get_type_hints(config_class)
    for config_field, spec in options_of(config_class):
        _add_option(parser, config_field, spec, hints[config_field.name])


def _add_option(parser: argparse.ArgumentParser, config_field: dataclasses.Field, spec: Option, hint: Any) -> None:
    kind, is_list = _value_type(hint)
    dest = config_field.name
    kwargs: dict[str, Any] = {"help": spec.help}
    if spec.choices:
        kwargs["choices"] = spec.choices
    if spec.metavar:
        kwargs["metavar"] = spec.metavar
    if kind is bool:
        kwargs["action"] = "store_true"
    elif is_list:
        kwargs.update(action="append", type=kind)
    elif kind is not str and kind is not StageRef:  # an upstream run stays text until the config parses it (StageRef.parse)
        kwargs["type"] = kind
    if spec.positional:
        required = config_field.default is dataclasses.MISSING and config_field.default_factory is dataclasses.MISSING
        parser.add_argument(dest, nargs=None if required else "?", **kwargs)
        return
    flags = spec.flags or (f"--{dest.replace('_', '-')}",)
    parser.add_argument(*flags, dest=dest, default=None, **kwargs)
    if spec.negative:
        flag, negative_help = spec.negative
        parser.add_argument(flag, dest=dest + _CLEARED, action="store_true", help=negative_help)


def _value_type(hint: Any) -> tuple[type, bool]:
    """(element type, is a list) of `X`, `X | None`, `list[X]`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def config_from_args(config_class: type[StageConfig], args: argparse.Namespace) -> StageConfig:
    """The config the command line describes; options left out keep the dataclass defaults."""
    values: dict[str, Any] = {}
    for config_field, spec in options_of(config_class):
        value = getattr(args, config_field.name)
        if spec.negative and getattr(args, config_field.name + _CLEARED):
            if value:
                flag = spec.flags[0] if spec.flags else f"--{config_field.name.replace('_', '-')}"
                raise InputError(f"{flag} and {spec.negative[0]} contradict each other; pass one")
            value = False if isinstance(config_field.default, bool) else []
        if value is not None:
            values[config_field.name] = value
    return config_class(**values)


def store_from_args(args: argparse.Namespace, writable: bool = True) -> ArtifactStore | None:
    return open_store(args.store, endpoint_url=args.s3_endpoint_url, writable=writable) if args.store else None


def require_store(args: argparse.Namespace, writable: bool = True) -> ArtifactStore:
    store = store_from_args(args, writable=writable)
    if store is None:
        raise InputError(f"no artifact store: pass --store (a folder, file:///path or s3://bucket/prefix) or set ${settings.STORE_ENV}")
    return store


def context_from_args(args: argparse.Namespace) -> StageContext:
    if not args.store:
        given = [flag for flag, value in (("--run-id", args.run_id), ("--step", args.step), ("--force", args.force)) if value]
        if given:
            raise InputError(f"{' and '.join(given)} apply to runs in an artifact store: pass --store (or set ${settings.STORE_ENV})")
    return StageContext(
        store=store_from_args(args),
        run_id=args.run_id,
        step=args.step,
        force=args.force,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        progress=args.progress,
        tracking=target_from_settings(args.mlflow_tracking_uri, args.mlflow_experiment, args.mlflow_parent_run, args.mlflow_unavailable),
    )


def run_from_args(stage: Stage, args: argparse.Namespace) -> str:
    """Run the stage the parsed command line describes; returns what to print."""
    config = config_from_args(stage.config, args)
    result = stage.run(config, context_from_args(args))
    if args.record and result.manifest is not None:
        write_record(Path(args.record), result)
    return result.message


def command_line(stage: Stage, config: StageConfig, context: StageContext, record: Path | None = None) -> list[str]:
    """The arguments of `python -m stages.<stage>` that run `config` in `context`: what a container or subprocess runs.

    The inverse of the parser: parsing them gives back an equal config and context.
    """
    positional, flags = [], []
    for config_field, spec in options_of(type(config)):
        value = getattr(config, config_field.name)
        default = config_field.default_factory() if config_field.default_factory is not dataclasses.MISSING else config_field.default
        flag = spec.flags[0] if spec.flags else f"--{config_field.name.replace('_', '-')}"
        if spec.positional:
            positional += [] if value is None else [str(value)]
        elif isinstance(value, bool):
            flags += [flag] if value and not default else [spec.negative[0]] if not value and default else []
        elif isinstance(value, list):
            flags += [spec.negative[0]] if not value and spec.negative and default != value else []
            flags += [item for v in value for item in (flag, str(v))]
        elif value is not None:
            flags += [flag, repr(value) if isinstance(value, float) else str(value)]
    if context.store is not None:
        flags += ["--store", context.store.root_uri]
        endpoint = getattr(context.store, "endpoint_url", None)
        flags += ["--s3-endpoint-url", endpoint] if endpoint else []
    flags += ["--run-id", context.run_id] if context.run_id else []
    flags += ["--step", context.step] if context.step else []
    flags += ["--force"] if context.force else []
    flags += ["--work-dir", str(context.work_dir)] if context.work_dir else []
    flags += [] if context.progress is None else ["--progress" if context.progress else "--no-progress"]
    flags += ["--record", str(record)] if record else []
    if context.tracking is not None:
        flags += ["--mlflow-tracking-uri", context.tracking.tracking_uri, "--mlflow-experiment", context.tracking.experiment]
        flags += ["--mlflow-parent-run", context.tracking.parent_run_id] if context.tracking.parent_run_id else []
        flags += ["--mlflow-unavailable", context.tracking.unavailable] if context.tracking.unavailable else []
    return [*positional, *flags]


class Terminated(KeyboardInterrupt):
    """SIGTERM, the way Prefect, Docker and Kubernetes stop a process: handled exactly like Ctrl-C."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated in the main thread, so a stage records its failure and keeps partial work."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _StderrHandler(logging.Handler):
    """`warning: …` lines on the current sys.stderr, with URL credentials redacted."""

    def emit(self, record: logging.LogRecord) -> None:
        print(redact(f"{record.levelname.lower()}: {record.getMessage()}"), file=sys.stderr)


def configure_logging() -> None:
    """Warnings of the stages and flows (a skipped manifest, a retry, a tracker or webhook down) reach the user on stderr."""
    for name in ("stages", "flows"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            logger.addHandler(_StderrHandler(logging.WARNING))
        logger.setLevel(logging.WARNING)


def execute(action: Action, args: argparse.Namespace) -> int:
    """Run an action; every failure the user can act on becomes one `error:` line on stderr and an exit code.

    SIGTERM is treated like Ctrl-C (the stage records a failed manifest, partial work is kept
    for resuming); credentials in URLs are never printed; a message is cut to MAX_ERROR_CHARS.
    """
    configure_logging()
    try:
        with sigterm_as_interrupt():
            message = action(args)
    except SpectrumError as exc:
        print(f"error: {bounded(redact(str(exc)))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        recorded = recorded_failure(exc)
        what = f"the {recorded} was recorded as failed; " if recorded else "nothing was recorded as failed (no stage had started); "
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"{how}: {what}partial results are kept and the next run resumes them", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except OSError as exc:
        print(f"error: {bounded(redact(describe_os_error(exc)))}", file=sys.stderr)
        return OS_ERROR_EXIT
    if message:
        print(redact(message))
    return 0


MAX_ERROR_CHARS = 4000


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """At most `limit` characters of a message, saying how much was left out (an input can make messages huge)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters left out)"


def stage_parser(stage: Stage, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`parser` (or a new one, as `python -m stages.<stage>`) set up for the stage."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog=f"python -m {stage.module}", description=stage.description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    add_stage_arguments(parser, stage)
    parser.set_defaults(action=lambda args: run_from_args(stage, args))
    return parser


def stage_main(stage: Stage, argv: list[str] | None = None) -> int:
    """The container entrypoint of a stage: `python -m stages.<stage> ...`."""
    args = stage_parser(stage).parse_args(argv)
    return execute(args.action, args)
