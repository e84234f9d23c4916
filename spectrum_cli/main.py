"""`spectrum` command line: one subcommand per stage, no prompts, `--help` everywhere."""

from __future__ import annotations

import argparse

from stages import __version__, compare, cpt, download, evaluate, layer_select, promote, sft, snr_scan
from stages.core.cli import execute, stage_parser

from . import audit, card_command, compare_command, demo, line_command, pipeline_command, register_command, report

STAGES = (download.STAGE, snr_scan.STAGE, layer_select.STAGE, cpt.STAGE, sft.STAGE, evaluate.STAGE, promote.STAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectrum", description="Spectrum pipeline: SNR scan, layer selection and selective training.")
    parser.add_argument("--version", action="version", version=f"spectrum {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        sub = commands.add_parser(
            stage.command, help=stage.summary, description=stage.description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        stage_parser(stage, sub)
    for name, summary, description, add_arguments, action in (
        ("compare", compare_command.HELP, compare.__doc__, compare_command.add_arguments, compare_command.run),
        ("runs", audit.RUNS_HELP, audit.RUNS_DESCRIPTION, audit.add_runs_arguments, audit.runs_command),
        ("audit", audit.AUDIT_HELP, audit.AUDIT_DESCRIPTION, audit.add_audit_arguments, audit.audit_command),
        ("report", report.HELP, report.DESCRIPTION, report.add_arguments, report.run),
        ("card", card_command.HELP, card_command.DESCRIPTION, card_command.add_arguments, card_command.run),
        ("register", register_command.HELP, register_command.DESCRIPTION, register_command.add_arguments, register_command.run),
        ("pipeline", pipeline_command.HELP, pipeline_command.DESCRIPTION, pipeline_command.add_arguments, None),
        (
            "watch",
            pipeline_command.WATCH_HELP,
            pipeline_command.WATCH_DESCRIPTION,
            pipeline_command.add_watch_arguments,
            pipeline_command.watch_command,
        ),
        ("line", line_command.HELP, line_command.DESCRIPTION, line_command.add_arguments, None),
        ("demo", demo.HELP, demo.__doc__, demo.add_arguments, demo.run),
    ):
        sub = commands.add_parser(name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(sub)
        if action is not None:  # `pipeline` and `line` set their own per action
            sub.set_defaults(action=action)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args.action, args)


if __name__ == "__main__":
    raise SystemExit(main())
