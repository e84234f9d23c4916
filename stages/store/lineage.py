"""Lineage queries: what every run did, from its manifests and tables in the artifact store.

`list_run_summaries` backs `spectrum runs`; `audit_run` backs `spectrum audit RUN`: each
stage's inputs and outputs with hashes, the selection (which tensors were trainable and why,
with their SNR), the lineage of the SNR table it selected from, and -- once a training stage
writes its `trained_tensors` table -- which tensors changed.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.contracts import FAILED, LAYER_SELECT, SELECTION_TABLE, SUCCEEDED, TRAINED_TENSORS_TABLE, base_stage
from ..core.errors import InputError
from .base import ArtifactStore
from .errors import ArtifactNotFoundError
from .manifest import Manifest, committed_manifests
from .tables import read_table, read_table_output


def list_run_summaries(store: ArtifactStore) -> list[dict[str, Any]]:
    summaries = []
    for run_id, manifests in committed_manifests(store).items():
        statuses = {m.status for m in manifests}
        summaries.append(
            {
                "run_id": run_id,
                "status": SUCCEEDED if statuses == {SUCCEEDED} else FAILED,
                "stages": {m.stage: m.status for m in manifests},
                "started_at": min(m.started_at for m in manifests),
                "finished_at": max((m.finished_at or "") for m in manifests) or None,
                "code_version": sorted({m.code_version for m in manifests}),
            }
        )
    return summaries


def audit_run(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    everything = committed_manifests(store)  # read once: the run's stages and the producers of its inputs
    manifests = everything.get(run_id)
    if not manifests:
        raise InputError(
            f"run {run_id!r} has no committed stage in {store.root_uri}; `spectrum runs --store {store.root_uri}` lists the runs"
        )
    producers = _ProducerIndex(everything)
    report: dict[str, Any] = {"run_id": run_id, "store": store.root_uri, "stages": [], "lineage": []}
    for manifest in manifests:
        report["stages"].append(
            {
                "stage": manifest.stage,
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
        if base_stage(manifest.stage) == LAYER_SELECT and manifest.status == SUCCEEDED:
            selection = _selection(store, manifest)  # a run's own selection first; a rescan's is a step (layer_select.sft)
            report.setdefault("selection", selection)
            report.setdefault("selections", {})[manifest.stage] = selection
    report["training"] = _training(store, run_id)
    return report


class _ProducerIndex:
    """Which committed stage wrote each stored object: the audit follows inputs back to their runs."""

    def __init__(self, manifests: dict[str, list[Manifest]]):
        self._by_uri: dict[str, Manifest] = {}
        for run_manifests in manifests.values():
            for manifest in run_manifests:
                if manifest.status == SUCCEEDED:
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


def _selection(store: ArtifactStore, manifest: Manifest) -> dict[str, Any]:
    data, _ = read_table_output(store, manifest, SELECTION_TABLE)
    table = pq.read_table(pa.BufferReader(data), use_threads=False)
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
        table = read_table(store, TRAINED_TENSORS_TABLE, run_id=run_id)
    except ArtifactNotFoundError:
        return None
    rows = table.to_pylist()
    return {"changed": [r for r in rows if r.get("changed")], "unchanged": sum(1 for r in rows if not r.get("changed"))}

