"""Shared command-line plumbing: every stage entrypoint and `spectrum` subcommand use it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import SpectrumError

AddArguments = Callable[[argparse.ArgumentParser], None]
Action = Callable[[argparse.Namespace], str]


def execute(action: Action, args: argparse.Namespace) -> int:
    """Run an action; a SpectrumError becomes one clear line on stderr and its exit code."""
    try:
        message = action(args)
    except SpectrumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: partial results are kept and the next run resumes them", file=sys.stderr)
        return 130
    if message:
        print(message)
    return 0


def run_stage_main(prog: str, description: str | None, add_arguments: AddArguments, action: Action, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return execute(action, parser.parse_args(argv))
