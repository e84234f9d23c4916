"""`spectrum report RUN --out report.html`: the report of a run or a comparison, from the artifact store.

`spectrum report --line LINE`: the report of a model line over its generations (stages/report/line.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.base.errors import InputError
from stages.core.cli import add_store_location_arguments, require_store
from stages.report import build_report
from stages.report.line import build_line_report

from .prices import CURRENCY_FLAG, FLAG, add_price_argument, currency_from_args, prices_from_args

DESCRIPTION = """The report of RUN, read from the artifact store: the SNR map (layers x module types, the
selection outlined, tensors that training changed marked), loss and learning-rate curves, the
evaluation with deltas, the comparison of methods, the SNR drift, the compute (GPU-hours per stage
and for the run; a cost with --price-per-device-hour and --currency) and the lineage of every stage it came
from. Charts are PNGs embedded in the page: it opens offline, from a file or an e-mail.

With --line LINE instead of RUN: the model line over its generations (held-out and general
perplexity per generation, promoted and rejected marked, the production pointer's history) and a
layers x module-types map of how many generations trained each tensor."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", help="the run to report (an evaluate, cpt, compare or pipeline run; see `spectrum runs`)")
    parser.add_argument("--line", metavar="LINE", help="report the model line LINE instead of a run (see `spectrum line status`)")
    parser.add_argument("--out", "-o", default="report.html", help="the HTML file (default report.html); the Markdown goes beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    add_price_argument(parser)
    add_store_location_arguments(parser)


def run(args: argparse.Namespace) -> str:
    if (args.run_id is None) == (args.line is None):
        raise InputError("spectrum report takes a RUN or --line LINE (one of them): spectrum report RUN, or spectrum report --line LINE")
    prices = prices_from_args(args)
    if args.line is not None:
        if prices is not None:
            raise InputError(f"{FLAG} prices a run's compute: give it (and {CURRENCY_FLAG}) with RUN, not with --line")
        result = build_line_report(require_store(args, writable=False), args.line, Path(args.out), overwrite=args.overwrite)
        what = f"line {args.line}"
    else:
        store = require_store(args, writable=False)
        currency = currency_from_args(args)
        result = build_report(store, args.run_id, Path(args.out), overwrite=args.overwrite, prices=prices, currency=currency)
        what = f"run {args.run_id}"
    sections = ", ".join(result.sections)
    return f"report of {what}: {result.html_path} ({result.images} charts; {sections}) and {result.markdown_path}"
