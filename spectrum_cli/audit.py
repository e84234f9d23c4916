"""`spectrum runs` and `spectrum audit`: read the store's runs and present them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from stages.core.cli import add_store_location_arguments, require_store
from stages.store.lineage import audit_run, list_run_summaries

RUNS_HELP = "list the runs in an artifact store with their stages and status"
RUNS_DESCRIPTION = """List every run in the artifact store: its stages, their status, when it started.

A run is a set of stages committed under one run id (runs/<run>/<stage>/manifest.json).
A run whose pipeline or stage is still held by a live process is `running`; one whose holder
was killed (its lease expired unreleased) is `crashed`; a failed or interrupted pipeline says so.
A re-run's stages reused from an earlier run start when the re-run recorded them.
The store is only read, never created or changed."""
AUDIT_HELP = "a run's inputs, outputs, selection and training changes"
AUDIT_DESCRIPTION = """Show what one run did: for each stage its parameters, code version, host and time,
every input and output with its sha256 (and S3 version id), the runs that produced its
inputs (back to the downloaded model files), the tensors the selection made trainable with
their SNR and the reason, and -- once the run has trained -- the tensors that changed.
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


def _snr(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_location_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", help="the run to audit (see `spectrum runs`)")
    add_runs_arguments(parser)


def runs_command(args: argparse.Namespace) -> str:
    summaries = list_run_summaries(require_store(args, writable=False))
    return json.dumps(summaries, indent=2) if args.json else format_runs(summaries)


def audit_command(args: argparse.Namespace) -> str:
    report = audit_run(require_store(args, writable=False), args.run_id)
    return json.dumps(report, indent=2, default=str) if args.json else format_audit(report)
