"""`spectrum` command line: one subcommand per stage, no prompts, `--help` everywhere."""

from __future__ import annotations

import argparse

from stages import __version__, audit, download, layer_select, snr_scan
from stages.cli_support import execute

from . import demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectrum", description="Spectrum pipeline: SNR scan, layer selection and selective training.")
    parser.add_argument("--version", action="version", version=f"spectrum {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stages = (
        ("download", download, "copy a model and/or a data drop into the artifact store, content-addressed"),
        ("scan", snr_scan, "compute the SNR of every weight matrix of a safetensors model"),
        ("select", layer_select, "choose the tensors to train from an SNR table or reference JSON"),
    )
    for name, module, summary in stages:
        sub = commands.add_parser(name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(action=module.cli)
    sub = commands.add_parser("runs", help="list the runs in an artifact store with their stages and status", description=audit.__doc__)
    audit.add_runs_arguments(sub)
    sub.set_defaults(action=audit.runs_cli)
    sub = commands.add_parser("audit", help="a run's inputs, outputs, selection and training changes", description=audit.__doc__)
    audit.add_audit_arguments(sub)
    sub.set_defaults(action=audit.audit_cli)
    sub = commands.add_parser("demo", help="generate a small model, scan it and select layers (the embedded default)", description=demo.__doc__)
    demo.add_arguments(sub)
    sub.set_defaults(action=demo.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args.action, args)


if __name__ == "__main__":
    raise SystemExit(main())
