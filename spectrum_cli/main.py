"""`spectrum` command line: one subcommand per stage, no prompts, `--help` everywhere.

Only the command that runs is imported: `spectrum --version` and `spectrum --help` load no stage,
and `spectrum scan` loads neither torch's training code, DeepSpeed nor Prefect. COMMANDS is the one
list of the commands and their one-line summaries; each command's options, description and action
come from its module when it is chosen.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from stages import __version__


@dataclass(frozen=True)
class Command:
    """A `spectrum` subcommand: where its options live, imported only when it is the one that runs."""

    name: str
    summary: str  # one line for `spectrum --help`
    module: str  # a stage module (its STAGE) or a spectrum_cli module
    description: str = "DESCRIPTION"  # the module's attributes: its --help text, its options and its action
    add_arguments: str = "add_arguments"
    action: str | None = "run"  # None: the command's own subcommands set theirs (pipeline, line)

    @property
    def is_stage(self) -> bool:
        return self.module.startswith("stages.")

    def build(self, parser: argparse.ArgumentParser) -> None:
        """Give `parser` the command's options, description and action (importing its module)."""
        module = importlib.import_module(self.module)
        if self.is_stage:
            from stages.core.cli import stage_parser

            parser.description = module.STAGE.description
            stage_parser(module.STAGE, parser)
            return
        parser.description = getattr(module, self.description)
        getattr(module, self.add_arguments)(parser)
        if self.action is not None:
            parser.set_defaults(action=getattr(module, self.action))


COMMANDS = (
    Command("download", "copy a model and/or a data drop into the artifact store, content-addressed", "stages.download"),
    Command("scan", "compute the SNR of every weight matrix of a safetensors model", "stages.snr_scan"),
    Command("select", "choose the tensors to train from an SNR table or reference JSON", "stages.layer_select"),
    Command("cpt", "continued pre-training with DeepSpeed of the selected tensors on a data drop", "stages.cpt"),
    Command("sft", "supervised fine-tuning with DeepSpeed of the selected tensors on chat data (loss on assistant tokens)", "stages.sft"),
    Command(
        "evaluate",
        "perplexity (domain held-out and a general forgetting probe), SFT eval loss and SNR drift, base vs trained",
        "stages.evaluate",
    ),
    Command("promote", "the promotion gate: check an evaluation against rules and record the decision", "stages.promote"),
    Command(
        "compare",
        "full fine-tuning, Spectrum selections (and random, inverse, no-embeddings controls) and LoRA at one CPT budget, over seeds",
        "spectrum_cli.compare_command",
    ),
    Command(
        "plan",
        "plan the GPU memory of training a selection, LoRA or the full model (per device, by component) and the cheapest setup that fits",
        "spectrum_cli.plan_command",
    ),
    Command(
        "runs",
        "list the runs in an artifact store with their stages and status (and their GPU-hours and cost: --cost)",
        "spectrum_cli.audit",
        "RUNS_DESCRIPTION",
        "add_runs_arguments",
        "runs_command",
    ),
    Command(
        "audit",
        "a run's inputs, outputs, selection and training changes; or a model line's whole history (--line)",
        "spectrum_cli.audit",
        "AUDIT_DESCRIPTION",
        "add_audit_arguments",
        "audit_command",
    ),
    Command(
        "report", "a self-contained HTML report (and Markdown beside it) of a run, a comparison or a model line", "spectrum_cli.report"
    ),
    Command(
        "card", "the Hugging Face model card (README.md) of a trained model, with its evaluation and compute", "spectrum_cli.card_command"
    ),
    Command(
        "register", "register a trained model in the MLflow model registry, with its model card and run id", "spectrum_cli.register_command"
    ),
    Command(
        "pipeline",
        "run the pipeline of a config file (download → snr_scan → layer_select → cpt → sft → evaluate + report)",
        "spectrum_cli.pipeline_command",
        action=None,
    ),
    Command(
        "watch",
        "start one pipeline run per new data drop under a store prefix (exactly once, however many watchers)",
        "spectrum_cli.pipeline_command",
        "WATCH_DESCRIPTION",
        "add_watch_arguments",
        "watch_command",
    ),
    Command(
        "line",
        "a model line's generations, decisions and production model; promote or roll back by hand",
        "spectrum_cli.line_command",
        action=None,
    ),
    Command(
        "demo", "run the whole pipeline on a generated model and data drop (the embedded default), with its report", "spectrum_cli.demo"
    ),
)
STAGE_MODULES = tuple(command.module for command in COMMANDS if command.is_stage)


def build_parser(argv: list[str] | None = None, *, every_command: bool = False) -> argparse.ArgumentParser:
    """The parser of `argv`: the chosen command built in full, the others as their one-line summaries.

    `every_command` builds them all (imports everything: for tests that check every command's options).
    """
    chosen = _command_in(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="spectrum", description="Spectrum pipeline: SNR scan, layer selection and selective training.")
    parser.add_argument("--version", action="version", version=f"spectrum {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        if every_command or command.name == chosen:
            command.build(sub)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand `argv` names: its first argument that is not an option (the top level has only --help and --version)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    from stages.core.cli import execute

    action: Callable[[argparse.Namespace], str] = args.action
    return execute(action, args)


if __name__ == "__main__":
    raise SystemExit(main())
