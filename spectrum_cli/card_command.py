"""`spectrum card RUN`: the model card of a committed training, with its evaluation and compute (stages/report/card.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.base.contracts import CPT
from stages.base.errors import InputError
from stages.base.files import ensure_writable, write_atomic
from stages.core.cli import add_store_location_arguments, require_store
from stages.store import ArtifactStore

from .prices import add_price_argument, currency_from_args, prices_from_args

DESCRIPTION = """The model card of the model a cpt or sft step of RUN trained, generated from the artifact store's
records: Hugging Face metadata (base model, datasets by sha256, tags), the selection policy and SNR
estimator, the trainable share with the embedding tensors counted, every trained tensor with its
SNR, the evaluation with base, trained and delta (the run's own evaluate step, or --evaluation-run),
the GPU-hours (and a cost with --price-per-device-hour, marked with --currency) and the command to audit the run. The card
in the model folder (model/README.md) is the same without evaluation and compute, which come later."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_card_source_arguments(parser)
    parser.add_argument("--out", "-o", default=None, help="write the card to this file instead of printing it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_store_location_arguments(parser)


def add_card_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Which training's card, with which evaluation and prices: `spectrum card` and `spectrum register` take the same."""
    parser.add_argument("run_id", metavar="RUN", help="the run that trained the model (RUN, or RUN/STEP such as RUN/sft)")
    parser.add_argument("--step", default=None, help="the training step: cpt (default), sft or a step of them such as cpt.x")
    parser.add_argument("--evaluation-run", metavar="RUN", default=None, help="the evaluate run to show (default: RUN's own evaluate step)")
    add_price_argument(parser)


def card_of_args(args: argparse.Namespace, store: ArtifactStore) -> tuple[str, str, str]:
    """(run id, step, the full card) of the training the arguments name."""
    run_id, step = run_and_step(args.run_id, args.step)
    prices = prices_from_args(args)
    from stages.report.card import card_facts, render_card  # the report package loads matplotlib: only when a card is asked for

    facts = card_facts(store, run_id, step, args.evaluation_run, prices, currency_from_args(args))
    return run_id, step, render_card(facts)


def run(args: argparse.Namespace) -> str:
    run_and_step(args.run_id, args.step)
    prices_from_args(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        ensure_writable(out, args.overwrite)  # before any reading: a taken file is refused at once
    elif args.overwrite:
        raise InputError("--overwrite applies only with --out FILE")
    run_id, step, text = card_of_args(args, require_store(args, writable=False))
    if out is None:
        return text.rstrip("\n")
    write_atomic(out, text.encode(), overwrite=args.overwrite)
    return f"wrote the model card of {run_id}/{step} to {out}"


def run_and_step(reference: str, step: str | None) -> tuple[str, str]:
    """RUN with --step, or RUN/STEP; both naming a step is refused unless they agree."""
    run_id, _, named = reference.partition("/")
    if named and step and named != step:
        raise InputError(f"{reference} names step {named!r} but --step is {step!r}; give the step once")
    return run_id, named or step or CPT
