"""`spectrum pipeline run CONFIG.yaml`: the whole chain as one Prefect flow run, or one stage of a committed run again."""

from __future__ import annotations

import argparse
import sys

from flows.prefect_api import PrefectUnavailableError, launch_temporary_server, scrub, start_prefect
from stages.base.errors import InputError
from stages.store import StoreUnavailableError

DESCRIPTION = """Run the pipeline a YAML config describes (see flows/pipeline_config.py) as one Prefect flow
run under one run id. Stages whose inputs and parameters were committed before are reused.

  spectrum pipeline run pipeline.yaml                          # the whole chain, a new run
  spectrum pipeline run pipeline.yaml --run RUN --only evaluate # one stage again, on RUN's upstream outputs
  spectrum pipeline run pipeline.yaml --run RUN --from layer_select --force layer_select"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="pipeline_action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run", help="run the pipeline of CONFIG", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run.add_argument("config", help="the pipeline config (YAML)")
    run.add_argument(
        "--run", metavar="RUN_ID", help="the run to record under, or to re-run stages of (default: the config's run_id, else new)"
    )
    run.add_argument("--only", metavar="STAGE", help="run this stage alone, on the committed upstream outputs of --run")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and the ones after it (upstream from --run)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="recompute STAGE even if committed (repeatable)")
    run.set_defaults(action=run_command)


def run_command(args: argparse.Namespace) -> str:
    from flows.pipeline_config import check_rerun, load_pipeline_config

    # The config, every stage's checks and the re-run options are checked before Prefect is imported or started:
    # a mistake is one error line, with no temporary server started just to reject it.
    check_rerun(load_pipeline_config(args.config), args.only, args.from_stage, args.force, args.run)
    launch_temporary_server()  # it boots while the pipeline is imported
    from flows.pipeline import pipeline_flow

    start_prefect()

    outcome = pipeline_flow(args.config, only=args.only, from_stage=args.from_stage, force=args.force, run=args.run)
    lines = [*outcome["lines"], f"pipeline run {outcome['run_id']}:"]
    for stage, run_id in outcome["stages"].items():
        how = "reused from run " + run_id if stage in outcome["cached"] else "ran" if stage in outcome["ran"] else "committed earlier"
        lines.append(f"  {stage}: {how}")
    lines.append(f"compute: {outcome['compute']}")  # the device time this run spent (reused stages: none), priced by cost:
    if outcome["report"]:
        lines.append(f"report: {outcome['report']}")
    return "\n".join(lines)


WATCH_DESCRIPTION = """Watch PREFIX in the config's store for data drops: a drop is <prefix>/<drop>/…, ready once
<drop>/_SUCCESS exists. Each ready drop is claimed with a conditional create in the store (one
of two racing watchers wins), copied locally and run through the pipeline with the drop as its
data; done.json marks it processed. A claim without a heartbeat for --claim-timeout seconds is
taken over (its committed stages are reused, training resumes from its checkpoint).

  spectrum watch pipeline.yaml --prefix incoming           # poll every minute
  spectrum watch pipeline.yaml --prefix incoming --once    # one pass (cron, a scheduled deployment)"""


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the pipeline config (YAML); each drop replaces its data")
    parser.add_argument("--prefix", required=True, help="store prefix of the drops: <prefix>/<drop>/…, ready once <drop>/_SUCCESS exists")
    parser.add_argument("--once", action="store_true", help="one pass, then exit (for cron or a scheduled deployment)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between passes (default 60)")
    parser.add_argument(
        "--claim-timeout", type=float, default=3600.0, help="seconds without a heartbeat after which a claim is taken over (default 3600)"
    )
    parser.add_argument("--watcher", help="this watcher's name in its claims (default: host and a random suffix)")


def watch_command(args: argparse.Namespace) -> str:
    import time

    from flows.pipeline_config import load_pipeline_config

    if args.interval <= 0 or args.claim_timeout <= 0:
        raise InputError("--interval and --claim-timeout must be positive")
    config = load_pipeline_config(args.config)  # before Prefect is imported: a bad config is one error line
    from flows.watch import watch_once

    while True:
        try:
            report = watch_once(config, args.prefix, args.claim_timeout, args.watcher)
        except (StoreUnavailableError, PrefectUnavailableError) as exc:
            if args.once:
                raise
            print(f"warning: {scrub(str(exc))}; trying again in {args.interval:g} s", file=sys.stderr, flush=True)
            time.sleep(args.interval)
            continue
        lines = [f"drop {drop}: pipeline run {run_id}" for drop, run_id in report.started]
        lines += [f"drop {drop}: {why}" for drop, why in report.failed.items()]
        lines += [f"drop {drop}: skipped ({why})" for drop, why in report.skipped.items()]
        if args.once:
            if report.failed:  # a scheduler (cron, a deployment) must see that the pass did not do its job
                print(scrub("\n".join(lines)), flush=True)
                raise InputError(
                    f"{len(report.failed)} drop(s) failed in this pass ({', '.join(sorted(report.failed))}); "
                    "each claim was released with its reason and the next pass retries it"
                )
            return "\n".join(lines) or f"no ready drop under {args.prefix}"
        if lines:
            print(scrub("\n".join(lines)), flush=True)
        time.sleep(args.interval)
