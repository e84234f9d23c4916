"""Prefect artifacts of a pipeline run: the SNR table, the selection, the trained tensors, the evaluation, the report.

Read from the store (what the stages committed), shown in the Prefect UI beside the flow run.
Artifact keys are lowercase letters, digits and dashes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_table_artifact

from stages.base.contracts import (
    CPT,
    EVALUATE,
    EVALUATION_TABLE,
    LAYER_SELECT,
    SELECTION_TABLE,
    SNR_SCAN,
    SNR_TABLE,
    TRAINED_TENSORS_TABLE,
)
from stages.store import ArtifactStore, Manifest, read_table

TABLES = (
    (SNR_SCAN, SNR_TABLE, "snr", ("tensor_name", "module_type", "layer_index", "snr", "parameter_count")),
    (LAYER_SELECT, SELECTION_TABLE, "selection", ("tensor_name", "module_type", "snr", "selected", "reason")),
    (CPT, TRAINED_TENSORS_TABLE, "trained-tensors", ("tensor_name", "trainable", "changed", "relative_change")),
    (EVALUATE, EVALUATION_TABLE, "evaluation", ("model", "metric", "dataset", "value", "tokens")),
)


def publish_artifacts(store: ArtifactStore, run_id: str, manifests: Mapping[str, Manifest], report: Path | None) -> list[str]:
    """Create the artifacts (call inside the flow run); returns their keys."""
    keys = []
    for stage, table, name, columns in TABLES:
        manifest = manifests.get(stage)
        if manifest is None:
            continue
        key = f"{name}-{_slug(run_id)}"
        rows = _rows(store, table, manifest, columns)
        create_table_artifact(rows, key=key, description=f"{table} of the {stage} stage (run {manifest.run_id})")
        keys.append(key)
    if report is not None:
        key = f"report-{_slug(run_id)}"
        create_link_artifact(report.resolve().as_uri(), link_text="report", key=key, description=f"report of run {run_id}")
        keys.append(key)
    return keys


def _rows(store: ArtifactStore, table: str, manifest: Manifest, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = [r for r in read_table(store, table, run_id=manifest.run_id).to_pylist() if r["stage"] == manifest.stage]
    return [{c: r.get(c) for c in columns} for r in rows]


def _slug(run_id: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in run_id.lower())
