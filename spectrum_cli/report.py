"""`spectrum report RUN --out report.html`: the report of a run or a comparison, from the artifact store."""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.core.cli import add_store_location_arguments, require_store
from stages.report import build_report

HELP = "a self-contained HTML report (and Markdown beside it) of a run or a comparison"
DESCRIPTION = """The report of RUN, read from the artifact store: the SNR map (layers x module types, the
selection outlined, tensors that training changed marked), loss and learning-rate curves, the
evaluation with deltas, the comparison of methods, the SNR drift and the lineage of every stage
it came from. Charts are PNGs embedded in the page: it opens offline, from a file or an e-mail."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", help="the run to report (an evaluate, cpt, compare or pipeline run; see `spectrum runs`)")
    parser.add_argument("--out", "-o", default="report.html", help="the HTML file (default report.html); the Markdown goes beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    add_store_location_arguments(parser)


def run(args: argparse.Namespace) -> str:
    result = build_report(require_store(args, writable=False), args.run_id, Path(args.out), overwrite=args.overwrite)
    sections = ", ".join(result.sections)
    return f"report of run {args.run_id}: {result.html_path} ({result.images} charts; {sections}) and {result.markdown_path}"
