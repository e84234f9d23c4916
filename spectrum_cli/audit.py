"""`spectrum runs` and `spectrum audit`: read the store's runs and present them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from stages.base.errors import InputError
from stages.core.cli import add_store_location_arguments, require_store
from stages.store.compute import Prices, Usage, usage
from stages.store.line_audit import audit_line
from stages.store.lineage import audit_run, list_run_summaries

from .prices import add_price_argument, currency_from_args, prices_from_args

RUNS_DESCRIPTION = """List every run in the artifact store: its stages, their status, when it started.

A run is a set of stages committed under one run id (runs/<run>/<stage>/manifest.json).
A run whose pipeline or stage is still held by a live process is `running`; one whose holder
was killed (its lease expired unreleased) is `crashed`; a failed or interrupted pipeline says so.
A re-run's stages reused from an earlier run start when the re-run recorded them.

With --cost (or a price): each run's device time from its manifests (device-hours by kind, GPU-hours) and,
with --price-per-device-hour, its cost; then the total over the runs listed. A stage a run
reused from an earlier run counts there only, so a re-run does not count the work twice.
The store is only read, never created or changed."""
AUDIT_DESCRIPTION = """Show what one run did: for each stage its parameters, code version, host and time,
every input and output with its sha256 (and S3 version id), the runs that produced its
inputs (back to the downloaded model files), the tensors the selection made trainable with
their SNR and the reason, and -- once the run has trained -- the tensors that changed.

With --line LINE instead of a run: the audit trail of the line's production model (or of
generation N's, --generation N): the chain of generations it descends from, back to the base
model; every tensor with the generations that changed it, its SNR at each generation's scan and
its cumulative relative change; and the proof, by the sha256 chain through the generations'
trained_tensors tables, that every tensor never trained is bit-identical to the base.
The store is only read, never created or changed."""


def format_runs(summaries: list[dict[str, Any]]) -> str:
    if not summaries:
        return "no runs"
    header = f"{'RUN':36} {'STATUS':10} {'STARTED':30} STAGES"
    lines = [header]
    for s in summaries:
        stages = ", ".join(f"{k}({v})" if v != "succeeded" else k for k, v in s["stages"].items())
        lines.append(f"{s['run_id']:36} {s['status']:10} {s['started_at']:30} {stages}")
    return "\n".join(lines)


def format_cost(costs: dict[str, Any], currency: str = "") -> str:
    """The runs with their device-hours and cost (`runs_cost`, in `currency`), then the total."""
    if not costs["runs"]:
        return "no runs"
    priced = costs["prices"] is not None
    header = f"{'RUN':36} {'STATUS':10} {'GPU-H':>10} {'CPU-H':>10}" + (f" {'COST':>10}" if priced else "") + " STAGES"
    lines = [header]
    rows = [(s["run_id"], s["status"], s["usage"], ", ".join(s["stages"])) for s in costs["runs"]]
    rows.append((f"total ({len(costs['runs'])} runs)", "", costs["total"], ""))
    for run_id, status, use, stages in rows:
        mark = "*" if use["stages_without_compute"] else ""
        cost = f" {_money(use['cost'], currency):>10}" if priced else ""
        hours = use["device_hours"]
        lines.append(f"{run_id:36} {status:10} {use['gpu_hours']:>10.4f} {hours.get('cpu', 0.0):>10.4f}{cost} {stages}{mark}".rstrip())
    if costs["total"]["stages_without_compute"]:
        lines.append("* stages without a compute record (written before it was recorded): their time is not counted")
    if priced and costs["total"]["unpriced"]:
        unpriced = ", ".join(costs["total"]["unpriced"])
        lines.append(f"cost: {unpriced} time has no price and is counted at 0 (--price-per-device-hour KIND=X prices it)")
    return "\n".join(lines)


def runs_cost(summaries: list[dict[str, Any]], prices: Prices | None) -> dict[str, Any]:
    """Each run summary with its usage, the total over them, and the prices used (summaries from list_run_summaries(with_compute))."""
    runs = [{**s, "usage": _usage_dict(usage(s["compute"].values(), prices))} for s in summaries]
    total = usage([c for s in summaries for c in s["compute"].values()], prices)
    price_table = None if prices is None else {"by_device": dict(prices.by_device), "default": prices.default}
    return {"runs": runs, "total": _usage_dict(total), "prices": price_table}


def _usage_dict(use: Usage) -> dict[str, Any]:
    return {
        "device_hours": dict(use.device_hours),
        "gpu_hours": use.gpu_hours,
        "stages_without_compute": use.unknown,
        "cost": use.cost,
        "unpriced": list(use.unpriced),
    }


def _money(value: float | None, currency: str = "") -> str:
    return "-" if value is None else f"{currency}{value:,.2f}"


def format_audit(report: dict[str, Any]) -> str:
    lines = [f"run {report['run_id']} in {report['store']}"]
    for stage in report["stages"]:
        work = f"code {stage['code_version']}, {stage['seconds']} s on {stage['host']}"
        reused = stage.get("reused_from")
        if reused:
            lines.append(
                f"\n[{stage['stage']}] reused from {reused['run_id']}/{reused['stage']} at {stage['recorded_at']} "
                f"({stage['status']} there: {work})"
            )
        else:
            lines.append(f"\n[{stage['stage']}] {stage['status']}, {work}")
        lines.append(f"  parameters: {json.dumps(stage['parameters'], sort_keys=True)}")
        lines.extend(f"  input  {ref['sha256'][:16]}  {ref['uri']}" for ref in stage["inputs"])
        lines.extend(
            f"  output {ref['sha256'][:16]}  {ref['uri']}" + (f"  (version {ref['version_id']})" if ref.get("version_id") else "")
            for ref in stage["outputs"]
        )
    for producer in report["lineage"]:
        parameters = json.dumps(producer["parameters"], sort_keys=True)
        lines.append(f"\ninput produced by run {producer['run_id']} ({producer['stage']}, {parameters}), which read:")
        lines.extend(f"  {ref['sha256'][:16]}  {ref['uri']}" for ref in producer["inputs"])
    selection = report.get("selection")
    if selection:
        lines.append(
            f"\nselection: {len(selection['trainable'])} trainable tensors, {len(selection['frozen'])} frozen; "
            f"{selection['trainable_parameters']:,} of {selection['total_parameters']:,} parameters trainable"
        )
        lines.append(f"  {'TRAINABLE TENSOR':60} {'SNR':>12}  WHY")
        lines.extend(f"  {r['tensor_name']:60} {_snr(r['snr']):>12}  {r['reason']}" for r in selection["trainable"])
    lines += _training_lines(report.get("training"))
    return "\n".join(lines)


def _training_lines(training: dict[str, Any] | None) -> list[str]:
    """Each training stage apart (cpt and sft are never summed), then the tensors changed by any of them."""
    if training is None:
        return ["\ntraining: none in this run or in the runs its inputs came from"]
    lines = [f"\ntraining: {len(training['changed'])} distinct tensors changed in all"]
    for stage in training["stages"]:
        where = {
            "run": "",
            "reused": f" (reused from run {stage['run_id']}/{stage['trained_as']})",
            "input": f" of run {stage['run_id']} (not in this run: its inputs came from it)",
        }[stage["via"]]
        lines.append(f"  {stage['stage']}{where}: {len(stage['changed'])} of {stage['tensors']} tensors changed")
    return lines


def format_line_audit(audit: dict[str, Any]) -> str:
    """The chain, what each generation changed (with SNR and relative change), and the never-trained tensors' proof."""
    target = audit["target"]
    which = "production model" if target["production"] else "model"
    out = [
        f"line {audit['line']} in {audit['store']}: the {which} of generation {target['generation']} "
        f"(run {target['run_id']}, {target['decision']}): {target['model']}",
        f"base model: {audit['base']['uri']} (sha256 {audit['base']['sha256'][:16]})",
        "",
        "chain (base first):",
    ]
    by_name = {t["tensor_name"]: t for t in audit["tensors"]}
    for position, generation in enumerate(audit["chain"]):
        out.append(
            f"  generation {generation['generation']}: run {generation['run_id']}, drop {generation['drop'] or '-'}, "
            f"{generation['decision']}; scan run {generation['scan_run'] or '-'}; "
            f"{len(generation['changed'])} of {generation['tensors']} tensors changed ({generation['trainable']} trainable)"
        )
        out += [f"    {'CHANGED TENSOR':60} {'SNR':>12} {'REL. CHANGE':>12}"] if generation["changed"] else []
        for name in generation["changed"]:
            step = by_name[name]["generations"][position]
            out.append(f"    {name:60} {_snr(step['snr']):>12} {_snr(step['relative_change']):>12}")
    for excluded in audit["excluded"]:
        out.append(
            f"  not in the chain: generation {excluded['generation']} (run {excluded['run_id']}, {excluded['decision']}): "
            "this model does not descend from it"
        )
    trained = [t for t in audit["tensors"] if t["trained_in"]]
    out += ["", f"tensors trained since the base: {len(trained)} of {len(audit['tensors'])}"]
    if trained:
        out.append(f"  {'TENSOR':60} {'GENERATIONS':12} {'CUMULATIVE':>12}  (prod(1 + relative change) - 1 >= ||W - W_base|| / ||W_base||)")
        out += [
            f"  {t['tensor_name']:60} {','.join(map(str, t['trained_in'])):12} {_snr(t['cumulative_relative_change']):>12}" for t in trained
        ]
    never = audit["never_trained"]
    out.append(f"tensors never trained since the base: {never['count']}, each {never['proof']}")
    return "\n".join(out)


def _snr(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    _add_reading_arguments(parser)
    parser.add_argument("--cost", action="store_true", help="each run's device-hours (GPU-hours) and cost, and their total")
    add_price_argument(parser)


def _add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_location_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", help="the run to audit (see `spectrum runs`)")
    parser.add_argument("--line", metavar="LINE", help="audit the model line LINE instead of a run (see `spectrum line status`)")
    parser.add_argument("--generation", type=int, metavar="N", help="with --line: audit generation N's model (default: production's)")
    _add_reading_arguments(parser)


def runs_command(args: argparse.Namespace) -> str:
    prices = prices_from_args(args)  # checked before the store is read
    store = require_store(args, writable=False)
    if args.cost or prices is not None:  # a price asks for the cost
        costs = runs_cost(list_run_summaries(store, with_compute=True), prices)
        return json.dumps(costs, indent=2) if args.json else format_cost(costs, currency_from_args(args))
    summaries = list_run_summaries(store)
    return json.dumps(summaries, indent=2) if args.json else format_runs(summaries)


def audit_command(args: argparse.Namespace) -> str:
    if args.line is not None:
        if args.run_id is not None:
            raise InputError(f"pass a run or --line, not both (got run {args.run_id} and --line {args.line})")
        audit = audit_line(require_store(args, writable=False), args.line, args.generation)
        return json.dumps(audit, indent=2) if args.json else format_line_audit(audit)
    if args.generation is not None:
        raise InputError("--generation applies to a line: pass --line LINE with it")
    if args.run_id is None:
        raise InputError("nothing to audit: pass a run id (see `spectrum runs`) or --line LINE (see `spectrum line status`)")
    report = audit_run(require_store(args, writable=False), args.run_id)
    return json.dumps(report, indent=2, default=str) if args.json else format_audit(report)
