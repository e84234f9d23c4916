"""Audit trail: what every run did, from its manifests and tables in the artifact store.

`list_run_summaries` backs `spectrum runs`; `audit_run` backs `spectrum audit RUN`: each
stage's inputs and outputs with hashes, the selection (which tensors were trainable and why,
with their SNR), the lineage of the SNR table it selected from, and -- once a training stage
writes its `trained_tensors` table -- which tensors changed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .stage_run import add_store_location_arguments, store_from_args
from .store import ArtifactNotFoundError, ArtifactStore, list_runs, load_manifest, read_table, table_key

STAGE_ORDER = ("download", "snr_scan", "layer_select", "cpt", "sft", "evaluate")


def _stage_sort_key(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def list_run_summaries(store: ArtifactStore) -> list[dict[str, Any]]:
    summaries = []
    for run_id, stages in sorted(list_runs(store).items()):
        manifests = [load_manifest(store, run_id, stage) for stage in sorted(stages, key=_stage_sort_key)]
        statuses = {m.status for m in manifests}
        summaries.append(
            {
                "run_id": run_id,
                "status": "failed" if "failed" in statuses else "succeeded",
                "stages": {m.stage: m.status for m in manifests},
                "started_at": min(m.started_at for m in manifests),
                "finished_at": max((m.finished_at or "") for m in manifests) or None,
                "code_version": sorted({m.code_version for m in manifests}),
            }
        )
    return summaries


def audit_run(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    stages = list_runs(store).get(run_id)
    if not stages:
        raise InputError(f"run {run_id!r} has no committed stage in {store.root_uri}; `spectrum runs --store {store.root_uri}` lists the runs")
    producers = _ProducerIndex(store)
    report: dict[str, Any] = {"run_id": run_id, "store": store.root_uri, "stages": [], "lineage": []}
    for stage in sorted(stages, key=_stage_sort_key):
        manifest = load_manifest(store, run_id, stage)
        report["stages"].append(
            {
                "stage": stage,
                "status": manifest.status,
                "code_version": manifest.code_version,
                "cache_key": manifest.cache_key,
                "host": manifest.host,
                "started_at": manifest.started_at,
                "seconds": manifest.seconds,
                "parameters": manifest.parameters,
                "inputs": manifest.inputs,
                "outputs": manifest.outputs,
            }
        )
        report["lineage"].extend(producers.lineage(manifest.inputs, exclude_run=run_id))
        if stage == "layer_select" and manifest.status == "succeeded":
            report["selection"] = _selection(store, run_id)
    report["training"] = _training(store, run_id)
    return report


class _ProducerIndex:
    """Which committed stage wrote each stored object: the audit follows inputs back to their runs."""

    def __init__(self, store: ArtifactStore):
        self._by_uri: dict[str, Any] = {}
        for run_id, stages in list_runs(store).items():
            for stage in stages:
                manifest = load_manifest(store, run_id, stage)
                if manifest.status == "succeeded":
                    for output in manifest.outputs:
                        self._by_uri[output["uri"]] = manifest

    def lineage(self, inputs: list[dict[str, Any]], exclude_run: str) -> list[dict[str, Any]]:
        """Earlier stages that produced these inputs, transitively, each listed once."""
        found: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        pending = list(inputs)
        while pending:
            manifest = self._by_uri.get(pending.pop(0)["uri"])
            if manifest is None or (manifest.run_id, manifest.stage) in seen or manifest.run_id == exclude_run:
                continue
            seen.add((manifest.run_id, manifest.stage))
            found.append({"run_id": manifest.run_id, "stage": manifest.stage, "parameters": manifest.parameters, "inputs": manifest.inputs})
            pending.extend(manifest.inputs)
        return found


def _selection(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    table = pq.read_table(_buffer(store, table_key("selection", "layer_select", run_id)), use_threads=False)
    rows = table.to_pylist()
    trainable = [r for r in rows if r["selected"]]
    frozen = [r for r in rows if not r["selected"]]
    fields = ("tensor_name", "module_type", "snr", "parameter_count", "rank", "reason")
    return {
        "trainable": [{k: r[k] for k in fields} for r in trainable],
        "frozen": [{k: r[k] for k in fields} for r in frozen],
        "trainable_parameters": sum(r["parameter_count"] or 0 for r in trainable),
        "total_parameters": sum(r["parameter_count"] or 0 for r in rows),
    }


def _training(store: ArtifactStore, run_id: str) -> dict[str, Any] | None:
    try:
        table = read_table(store, "trained_tensors", run_id=run_id)
    except ArtifactNotFoundError:
        return None
    rows = table.to_pylist()
    return {"changed": [r for r in rows if r.get("changed")], "unchanged": sum(1 for r in rows if not r.get("changed"))}


def _buffer(store: ArtifactStore, key: str) -> pa.BufferReader:
    return pa.BufferReader(store.get_bytes(key))


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
        lines.append(f"\n[{stage['stage']}] {stage['status']}, code {stage['code_version']}, {stage['seconds']} s on {stage['host']}")
        lines.append(f"  parameters: {json.dumps(stage['parameters'], sort_keys=True)}")
        lines.extend(f"  input  {ref['sha256'][:16]}  {ref['uri']}" for ref in stage["inputs"])
        lines.extend(f"  output {ref['sha256'][:16]}  {ref['uri']}" + (f"  (version {ref['version_id']})" if ref.get("version_id") else "") for ref in stage["outputs"])
    for producer in report["lineage"]:
        lines.append(f"\ninput produced by run {producer['run_id']} ({producer['stage']}, {json.dumps(producer['parameters'], sort_keys=True)}), which read:")
        lines.extend(f"  {ref['sha256'][:16]}  {ref['uri']}" for ref in producer["inputs"])
    selection = report.get("selection")
    if selection:
        lines.append(
            f"\nselection: {len(selection['trainable'])} trainable tensors, {len(selection['frozen'])} frozen; "
            f"{selection['trainable_parameters']:,} of {selection['total_parameters']:,} parameters trainable"
        )
        lines.append(f"  {'TRAINABLE TENSOR':60} {'SNR':>12}  WHY")
        lines.extend(f"  {r['tensor_name']:60} {_snr(r['snr']):>12}  {r['reason']}" for r in selection["trainable"])
    training = report.get("training")
    lines.append(
        "\ntraining: no training stage in this run" if training is None else f"\ntraining: {len(training['changed'])} tensors changed"
    )
    return "\n".join(lines)


def _snr(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_location_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", help="the run to audit (see `spectrum runs`)")
    add_runs_arguments(parser)


def _require_store(args: argparse.Namespace) -> ArtifactStore:
    """The store to read, opened read-only: auditing never creates or changes a store."""
    if not args.store:
        raise InputError("no artifact store: pass --store URI or set SPECTRUM_STORE")
    return store_from_args(args, writable=False)


def runs_cli(args: argparse.Namespace) -> str:
    summaries = list_run_summaries(_require_store(args))
    return json.dumps(summaries, indent=2) if args.json else format_runs(summaries)


def audit_cli(args: argparse.Namespace) -> str:
    report = audit_run(_require_store(args), args.run_id)
    return json.dumps(report, indent=2, default=str) if args.json else format_audit(report)
