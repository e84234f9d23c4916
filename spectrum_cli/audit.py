"""`spectrum runs` and `spectrum audit`: read the store's runs and present them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from stages.base.errors import InputError
from stages.core.cli import add_store_location_arguments, require_store
from stages.store.line_audit import audit_line
from stages.store.lineage import audit_run, list_run_summaries

RUNS_HELP = "list the runs in an artifact store with their stages and status"
RUNS_DESCRIPTION = """List every run in the artifact store: its stages, their status, when it started.

A run is a set of stages committed under one run id (runs/<run>/<stage>/manifest.json).
A run whose pipeline or stage is still held by a live process is `running`; one whose holder
was killed (its lease expired unreleased) is `crashed`; a failed or interrupted pipeline says so.
A re-run's stages reused from an earlier run start when the re-run recorded them.
The store is only read, never created or changed."""
AUDIT_HELP = "a run's inputs, outputs, selection and training changes; or a model line's whole history (--line)"
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
    add_store_location_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", help="the run to audit (see `spectrum runs`)")
    parser.add_argument("--line", metavar="LINE", help="audit the model line LINE instead of a run (see `spectrum line status`)")
    parser.add_argument("--generation", type=int, metavar="N", help="with --line: audit generation N's model (default: production's)")
    add_runs_arguments(parser)


def runs_command(args: argparse.Namespace) -> str:
    summaries = list_run_summaries(require_store(args, writable=False))
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
