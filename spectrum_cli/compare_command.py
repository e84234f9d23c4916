"""`spectrum compare MODEL --data DROP`: the compare flow (flows/compare.py), its options those of stages.compare.CompareConfig."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.prefect_api import launch_temporary_server, start_prefect
from stages import compare
from stages.base.contracts import COMPARE
from stages.base.errors import InputError
from stages.core.cli import add_config_arguments, add_context_arguments, config_from_args, context_from_args
from stages.core.execution import require_store_in
from stages.core.record import write_record
from stages.core.stage import StageResult
from stages.store import StageRef

DESCRIPTION = compare.__doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, compare.CompareConfig)
    add_context_arguments(parser)


def run(args: argparse.Namespace) -> str:
    config = config_from_args(compare.CompareConfig, args)
    context = context_from_args(args)
    if args.step:
        raise InputError("--step does not apply to compare: its arms are runs of their own")
    store = require_store_in(context, COMPARE)
    compare.check(config)  # before Prefect starts: a mistake is one error line, with no server started to reject it
    launch_temporary_server()  # it boots while the comparison's flow is imported
    from flows.compare import compare_flow

    start_prefect()

    outcome = compare_flow(
        config.plain_options(), store.root_uri, run_id=context.run_id, force=context.force, work_dir=_text(context.work_dir)
    )
    if args.record:
        manifest = StageRef(outcome["run_id"], COMPARE).manifest(store)
        write_record(Path(args.record), StageResult(COMPARE, tuple(outcome["lines"]), manifest, outcome["cached"]))
    return "\n".join(outcome["lines"])


def _text(path: Path | None) -> str | None:
    return str(path) if path else None
