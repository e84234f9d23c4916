"""`spectrum pipeline run CONFIG.yaml`: the whole chain as one Prefect flow run, or one stage of a committed run again."""

from __future__ import annotations

import argparse

HELP = "run the pipeline of a config file (download → snr_scan → layer_select → cpt → sft → evaluate + report)"
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
    from .pipeline import pipeline_flow  # Prefect is imported only when a pipeline runs

    outcome = pipeline_flow(args.config, only=args.only, from_stage=args.from_stage, force=args.force, run=args.run)
    lines = [*outcome["lines"], f"pipeline run {outcome['run_id']}:"]
    for stage, run_id in outcome["stages"].items():
        how = "reused from run " + run_id if stage in outcome["cached"] else "ran" if stage in outcome["ran"] else "committed earlier"
        lines.append(f"  {stage}: {how}")
    if outcome["report"]:
        lines.append(f"report: {outcome['report']}")
    return "\n".join(lines)
