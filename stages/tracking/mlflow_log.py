"""Logging stages and pipeline runs to MLflow through MlflowClient (no global active run: threads and processes stay apart).

Everything is read from what the store holds (the manifest and its recorded outputs), so a stage logs the same
whether it ran in a pipeline, by hand, in its own process or on a deployment's worker.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..base.contracts import EVALUATION_TABLE, MODEL_FOLDER, SELECTION_JSON_FILE, SUCCEEDED, TRAINING_METRICS_TABLE
from ..base.documents import clip
from ..store import ArtifactStore, Manifest
from ..store.compute import usage
from ..store.scrub import redact
from ..store.tables import table_key
from .target import MlflowTarget

log = logging.getLogger(__name__)

# A tracker that is down must cost seconds, not MLflow's default of minutes of retries.
# Nor may it print run links on stdout, which is the stage's own output.
_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
MAX_ARTIFACT_BYTES = 16 * 1024 * 1024  # larger outputs (model weights, checkpoints) stay in the store; the tags say where
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
_BATCH = 100  # MLflow accepts at most 100 parameters or 1000 metrics per log_batch
_TRAINING_CURVES = ("loss", "learning_rate", "grad_norm", "tokens_per_second")
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /:]")
LOGGED, UNAVAILABLE = "logged", "unavailable"


def tracker_client(target: MlflowTarget):
    for name, value in _CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=target.tracking_uri)


def ensure_experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by a concurrent stage
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def log_stage(target: MlflowTarget, store: ArtifactStore, manifest: Manifest, reused_from: Manifest | None = None) -> dict[str, Any]:
    """Log one stage as an MLflow run; returns the record its manifest keeps (`{"mlflow": {...}}`), never raises.

    `manifest` may be the finished manifest about to be committed: its outputs are stored already.
    `reused_from`: the committed run a reused stage took its results from (logged as that run's results, tagged).
    """
    source = reused_from or manifest
    try:
        client = tracker_client(target)
        experiment_id = ensure_experiment(client, target.experiment)
        tags = {**_stage_tags(store, source), "mlflow.runName": manifest.stage, "spectrum.run_id": manifest.run_id}
        if reused_from is not None:
            tags["spectrum.reused_from"] = reused_from.run_id
        if target.parent_run_id:
            tags["mlflow.parentRunId"] = target.parent_run_id
        run = client.create_run(experiment_id, tags=tags)
        run_id = run.info.run_id
        try:
            _log_params(client, run_id, _flatten(source.parameters))
            _log_metrics(client, run_id, _stage_metrics(store, source, computed=reused_from is None))
            with tempfile.TemporaryDirectory(prefix="spectrum-mlflow-") as folder:
                for name, data in _artifacts(store, source):
                    path = Path(folder) / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    client.log_artifact(run_id, str(path), artifact_path=str(Path(name).parent) if "/" in name else None)
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED" if source.status == SUCCEEDED else "FAILED")
        return {"mlflow": {"status": LOGGED, "tracking_uri": redact(target.tracking_uri), "experiment_id": experiment_id, "run_id": run_id}}
    except Exception as exc:  # tracking never decides anything: the stage commits all the same
        return _unavailable(target, f"the {manifest.stage} stage of run {manifest.run_id}", exc)


def start_pipeline_run(target: MlflowTarget, run_id: str, store_uri: str, parameters: Mapping[str, Any]) -> MlflowTarget:
    """The pipeline run's MLflow run, which the stages nest in: the target with its parent set (unchanged if the tracker is down)."""
    try:
        client = tracker_client(target)
        experiment_id = ensure_experiment(client, target.experiment)
        tags = {
            "mlflow.runName": f"pipeline {run_id}",
            "spectrum.run_id": run_id,
            "spectrum.store": redact(store_uri),
            "spectrum.kind": "pipeline",
        }
        run = client.create_run(experiment_id, tags=tags)
        _log_params(client, run.info.run_id, _flatten(parameters))
        return target.nested_in(run.info.run_id)
    except Exception as exc:
        _unavailable(target, f"pipeline run {run_id}", exc)
        return target


def finish_pipeline_run(target: MlflowTarget, succeeded: bool, metrics: Mapping[str, float], artifacts: Mapping[str, Path]) -> None:
    """End the pipeline's MLflow run with its totals and files (the report); a no-op when it never started."""
    if target.parent_run_id is None:
        return
    try:
        client = tracker_client(target)
        _log_metrics(client, target.parent_run_id, [(name, float(value), 0) for name, value in metrics.items()])
        for name, path in artifacts.items():
            client.log_artifact(target.parent_run_id, str(path), artifact_path=name or None)
        client.set_terminated(target.parent_run_id, "FINISHED" if succeeded else "FAILED")
    except Exception as exc:
        _unavailable(target, f"the pipeline's MLflow run {target.parent_run_id}", exc)


def _unavailable(target: MlflowTarget, what: str, exc: Exception) -> dict[str, Any]:
    error = clip(redact(f"{type(exc).__name__}: {exc}"), 300)
    log.warning(
        "experiment tracker %s could not log %s (%s); the store holds everything, tracking is skipped",
        redact(target.tracking_uri),
        what,
        error,
    )
    return {"mlflow": {"status": UNAVAILABLE, "tracking_uri": redact(target.tracking_uri), "error": error}}


def _stage_tags(store: ArtifactStore, manifest: Manifest) -> dict[str, str]:
    tags = {
        "spectrum.stage": manifest.stage,
        "spectrum.store": redact(store.root_uri),
        "spectrum.cache_key": manifest.cache_key,
        "spectrum.code_version": manifest.code_version,
        "spectrum.status": manifest.status,
    }
    selection = _selection_sha256(store, manifest)
    if selection:
        tags["spectrum.selection_sha256"] = selection
    estimator = _estimator(store, manifest)
    if estimator:
        tags["spectrum.estimator"] = estimator
    if manifest.compute:
        tags["spectrum.device"] = manifest.compute["device"] + (
            f" ({manifest.compute['device_name']})" if manifest.compute.get("device_name") else ""
        )
    return tags


def _selection_sha256(store: ArtifactStore, manifest: Manifest) -> str | None:
    """The selection this stage made (layer_select) or trained with (an input named like a selection file)."""
    for output in manifest.outputs:
        if output.get("key", "").endswith(f"/{SELECTION_JSON_FILE}"):
            return output.get("sha256")
    for ref in manifest.inputs:
        if ref["uri"].endswith((f"/{SELECTION_JSON_FILE}", ".yaml", ".yml")):
            return ref["sha256"]
    return None


def _estimator(store: ArtifactStore, manifest: Manifest) -> str | None:
    if isinstance(manifest.parameters.get("estimator"), str):
        return manifest.parameters["estimator"]
    document = _selection_document(store, manifest)
    return _find_key(document, "estimator") if document else None


def _selection_document(store: ArtifactStore, manifest: Manifest) -> Any:
    for output in manifest.outputs:
        if output.get("key", "").endswith(f"/{SELECTION_JSON_FILE}"):
            return json.loads(store.read_recorded(output)[0])
    return None


def _find_key(document: Any, key: str) -> str | None:
    if isinstance(document, Mapping):
        if isinstance(document.get(key), str):
            return document[key]
        values: Iterable[Any] = document.values()
    elif isinstance(document, list):
        values = document
    else:
        return None
    return next((found for value in values if (found := _find_key(value, key))), None)


def _flatten(parameters: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`; lists as JSON; values clipped to MLflow's limit."""
    flat: dict[str, str] = {}
    for name, value in parameters.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            flat[key] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return flat


def _log_params(client, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(name, value) for name, value in params.items()]
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[start : start + _BATCH])


def _log_metrics(client, run_id: str, metrics: Iterable[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(_METRIC_NAME.sub("_", name), value, now, step) for name, value, step in metrics if value == value]  # NaN dropped
    for start in range(0, len(items), 10 * _BATCH):
        client.log_batch(run_id, metrics=items[start : start + 10 * _BATCH])


def _stage_metrics(store: ArtifactStore, manifest: Manifest, computed: bool) -> Iterator[tuple[str, float, int]]:
    """(name, value, step): the compute, the training curves per step, the evaluation's base, trained and delta."""
    if manifest.compute and computed:
        use = usage([manifest.compute])
        yield "device_seconds", float(manifest.compute["device_seconds"]), 0
        yield "gpu_hours", use.gpu_hours, 0
    for row in _table_rows(store, manifest, TRAINING_METRICS_TABLE):
        for name in _TRAINING_CURVES:
            if row.get(name) is not None:
                yield name, float(row[name]), int(row["step"])
    for row in _table_rows(store, manifest, EVALUATION_TABLE):
        if row.get("value") is not None:
            yield f"{row['metric']}/{row['dataset']}/{row['model']}", float(row["value"]), 0


def _table_rows(store: ArtifactStore, manifest: Manifest, table: str) -> list[dict[str, Any]]:
    key = table_key(table, manifest.stage, manifest.run_id)
    output = next((o for o in manifest.outputs if o.get("key") == key), None)
    if output is None:
        return []
    return pq.read_table(io.BytesIO(store.read_recorded(output)[0])).to_pylist()


def _artifacts(store: ArtifactStore, manifest: Manifest) -> Iterator[tuple[str, bytes]]:
    """(artifact name, bytes) of the stage's small outputs: selection YAML/JSON, tables, records, the model card.

    Model weights and checkpoints stay in the store (tags name it); the model's card comes along.
    """
    prefix = f"runs/{manifest.run_id}/{manifest.stage}/"
    for output in manifest.outputs:
        key = output.get("key", "")
        if key.startswith(prefix):
            name = key.removeprefix(prefix)
            top = name.split("/")[0]
            if top == MODEL_FOLDER and name != f"{MODEL_FOLDER}/README.md" or top == "checkpoints":
                continue
        elif key.startswith("tables/"):
            name = f"tables/{key.split('/')[1]}.parquet"
        else:
            continue
        if int(output.get("size") or 0) <= MAX_ARTIFACT_BYTES:
            yield name, store.read_recorded(output)[0]


__all__ = ["LOGGED", "UNAVAILABLE", "finish_pipeline_run", "log_stage", "start_pipeline_run"]
