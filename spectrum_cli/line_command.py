"""`spectrum line status|promote|rollback`: a model line's generations and its production pointer (stages/store/lines.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from stages.core.cli import add_store_location_arguments, require_store
from stages.store import lines

DESCRIPTION = """A model line (a pipeline config's `line: {name: …}`) trains one generation per data drop, each
continuing from the line's production model; a generation becomes production when it passes the
promotion gate. The line's records live in the store under lines/<line>/, append-only: promoting
or rolling back appends a record and changes nothing earlier.

  spectrum line status acme-legal --store s3://bucket/spectrum
  spectrum line promote acme-legal --run RUN --why "gate too strict for this drop"
  spectrum line rollback acme-legal --to 2 --why "regression reported by the legal team\""""

STATUS_DESCRIPTION = """The line's generations (drop, run, decision, first gate reason), every re-pointing of
production (gate, manual, rollback) and the production model now. The store is only read."""
PROMOTE_DESCRIPTION = """Make the generation trained by RUN the line's production model (a manual promotion, e.g. of a
generation its gate rejected). RUN must be a complete generation of the line (its decision recorded)."""
ROLLBACK_DESCRIPTION = """Re-point production to generation N, which must have been production before."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="line_action", required=True, metavar="ACTION")

    status = _action(actions, "status", "the line's generations and production model", STATUS_DESCRIPTION, status_command)
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    promote = _action(actions, "promote", "make a generation's model production by hand", PROMOTE_DESCRIPTION, promote_command)
    promote.add_argument("--run", required=True, metavar="RUN", help="the run of the generation to promote")
    promote.add_argument("--why", required=True, help="why (kept in the production record)")

    rollback_help = "re-point production to an earlier production generation"
    rollback = _action(actions, "rollback", rollback_help, ROLLBACK_DESCRIPTION, rollback_command)
    rollback.add_argument("--to", required=True, type=int, metavar="GENERATION", help="the generation to make production again")
    rollback.add_argument("--why", default="", help="why (kept in the production record)")


def _action(actions: Any, name: str, summary: str, description: str, command: Any) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("line", metavar="LINE", help="the line's name (the config's line.name)")
    add_store_location_arguments(parser)
    parser.set_defaults(action=command)
    return parser


def status_command(args: argparse.Namespace) -> str:
    status = lines.line_status(require_store(args, writable=False), args.line)
    return json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status)


def promote_command(args: argparse.Namespace) -> str:
    pointer = lines.manual_promote(require_store(args), args.line, args.run, args.why)
    return f"line {args.line}: {_pointer_line(pointer.to_dict())}\n{_production_line(pointer.to_dict())}"


def rollback_command(args: argparse.Namespace) -> str:
    why = args.why or f"rolled back to generation {args.to} by hand"
    pointer = lines.rollback(require_store(args), args.line, args.to, why)
    return f"line {args.line}: {_pointer_line(pointer.to_dict())}\n{_production_line(pointer.to_dict())}"


def format_status(status: dict[str, Any]) -> str:
    out = [f"line {status['line']} in {status['store']}", "", "generations:"]
    if status["generations"]:
        out.append(f"  {'GEN':>4}  {'DROP':20} {'RUN':36} {'DECISION':9} FIRST REASON")
        for record in status["generations"]:
            first = first_reason(record["reasons"])
            out.append(f"  {record['generation']:>4}  {record['drop'] or '-':20} {record['run_id']:36} {record['decision']:9} {first}")
    else:
        out.append("  none yet")
    out += ["", "production history:"]
    out += [f"  {_pointer_line(p)}" for p in status["pointers"]] or ["  none yet"]
    if status["skipped_drops"]:
        out += ["", "drops not trained:"]
        out += [f"  {s['drop']}: {s['reason']} ({s['at']})" for s in status["skipped_drops"]]
    out += ["", _production_line(status["production"])]
    return "\n".join(out)


def first_reason(reasons: list[dict[str, Any]]) -> str:
    """The first failed rule result (else the first) in one short line: `FAIL <rule>: <reason>` for the gate's results."""
    if not reasons:
        return "-"
    reason = next((r for r in reasons if r.get("passed") is False), reasons[0])
    passed = reason.get("passed")
    verdict = ("PASS " if passed else "FAIL ") if isinstance(passed, bool) else ""
    if isinstance(reason.get("rule"), str) and isinstance(reason.get("reason"), str):
        return _clip(f"{verdict}{reason['rule']}: {reason['reason']}")
    named_first = sorted(reason.items(), key=lambda item: item[0] not in ("rule", "metric", "name"))  # the rule, then its fields
    return _clip(", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in named_first))


def _pointer_line(pointer: dict[str, Any]) -> str:
    why = f": {pointer['why']}" if pointer["why"] else ""
    return f"#{pointer['seq']} {pointer['at']} {pointer['action']} -> generation {pointer['generation']} (run {pointer['run_id']}){why}"


def _production_line(pointer: dict[str, Any] | None) -> str:
    if pointer is None:
        return "production: none yet (the config's model)"
    return f"production: generation {pointer['generation']} (run {pointer['run_id']}, model {pointer['model']})"


def _clip(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
