"""Logging stages and pipeline runs to MLflow through MlflowClient (no global active run: threads and processes stay apart).

Everything is read from what the store holds (the manifest and its recorded outputs), so a stage logs the same
whether it ran in a pipeline, by hand, in its own process or on a deployment's worker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..base.contracts import (
    DECISION_FILE,
    DOWNLOAD_SUMMARY_FILE,
    EVALUATION_JSON_FILE,
    EVALUATION_TABLE,
    HELDOUT_FILE,
    MODEL_FOLDER,
    REFERENCE_JSON_FILE,
    SELECTION_JSON_FILE,
    SUCCEEDED,
    TRAINING_FILE,
    TRAINING_METRICS_TABLE,
    UNFROZEN_YAML_FILE,
)
from ..base.documents import clip
from ..store import ArtifactStore, Manifest
from ..store.compute import usage
from ..store.errors import SecretLeakError
from ..store.scrub import check_values, redact
from ..store.tables import table_rows
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
_NAME = re.compile(r"[^A-Za-z0-9_\-. /:]")  # what MLflow accepts in parameter and metric names
LOGGED, UNAVAILABLE = "logged", "unavailable"
# A stage's own files a tracker shows (besides its Parquet tables): its records, never data or weights.
ARTIFACT_FILES = frozenset(
    {
        UNFROZEN_YAML_FILE,
        SELECTION_JSON_FILE,
        TRAINING_FILE,
        HELDOUT_FILE,
        EVALUATION_JSON_FILE,
        DECISION_FILE,
        DOWNLOAD_SUMMARY_FILE,
        REFERENCE_JSON_FILE,
        f"{MODEL_FOLDER}/README.md",
    }
)


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


def log_stage(
    target: MlflowTarget, store: ArtifactStore, manifest: Manifest, reused_from: Manifest | None = None, end: bool = True
) -> dict[str, Any]:
    """Log one stage as an MLflow run; returns the record its manifest keeps (`{"mlflow": {...}}`), never raises.

    `manifest` may be the finished manifest about to be committed: its outputs are stored already. With `end=False`
    the MLflow run stays open until end_stage_run says whether the commit succeeded: MLflow never shows a stage
    finished that the store does not hold. `reused_from`: the committed run a reused stage took its results from.
    """
    if target.unavailable:
        return _record(target, UNAVAILABLE, error=f"not contacted: {target.unavailable}")
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
        if end or source.status != SUCCEEDED:
            client.set_terminated(run_id, "FINISHED" if source.status == SUCCEEDED else "FAILED")
        return _record(target, LOGGED, experiment_id=experiment_id, run_id=run_id)
    except Exception as exc:  # tracking never decides anything: the stage commits all the same
        return _unavailable(target, f"the {manifest.stage} stage of run {manifest.run_id}", exc)


def end_stage_run(target: MlflowTarget, record: dict[str, Any] | None, succeeded: bool) -> None:
    """End a stage's MLflow run that log_stage left open: FINISHED once its manifest is committed, else FAILED."""
    logged = (record or {}).get("mlflow") or {}
    if logged.get("status") != LOGGED:
        return
    try:
        tracker_client(target).set_terminated(logged["run_id"], "FINISHED" if succeeded else "FAILED")
    except Exception as exc:
        _unavailable(target, f"the end of MLflow run {logged['run_id']}", exc)


def start_pipeline_run(target: MlflowTarget, run_id: str, store_uri: str, parameters: Mapping[str, Any]) -> MlflowTarget:
    """The pipeline run's MLflow run, which the stages nest in: the target with its parent set.

    A tracker that is down costs this one warning: the target comes back marked unavailable, and its stages record
    that in their manifests without each waiting for the same timeout.
    """
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
        record = _unavailable(target, f"pipeline run {run_id}", exc)
        return target.marked_unavailable(record["mlflow"]["error"])


def finish_pipeline_run(target: MlflowTarget, succeeded: bool, metrics: Mapping[str, float], artifacts: Mapping[str, Path]) -> None:
    """End the pipeline's MLflow run with its totals and files (the report); a no-op when it never started."""
    if target.parent_run_id is None or target.unavailable:
        return
    try:
        client = tracker_client(target)
        _log_metrics(client, target.parent_run_id, [(name, float(value), 0) for name, value in metrics.items()])
        for name, path in artifacts.items():
            client.log_artifact(target.parent_run_id, str(path), artifact_path=name or None)
        client.set_terminated(target.parent_run_id, "FINISHED" if succeeded else "FAILED")
    except Exception as exc:
        _unavailable(target, f"the pipeline's MLflow run {target.parent_run_id}", exc)


def _record(target: MlflowTarget, status: str, **fields: Any) -> dict[str, Any]:
    return {"mlflow": {"status": status, "tracking_uri": redact(target.tracking_uri), **fields}}


def _unavailable(target: MlflowTarget, what: str, exc: Exception) -> dict[str, Any]:
    """One warning, and the record a manifest keeps; the error text only when it is safe to store (no secret in it)."""
    error = clip(redact(f"{type(exc).__name__}: {exc}"), 300)
    try:
        check_values({"error": error}, "tracking error")
    except SecretLeakError:
        error = f"{type(exc).__name__} (its message named a credential and is not kept)"
    log.warning(
        "experiment tracker %s could not log %s (%s); the store holds everything, tracking is skipped",
        redact(target.tracking_uri),
        what,
        error,
    )
    return _record(target, UNAVAILABLE, error=error)


def _stage_tags(store: ArtifactStore, manifest: Manifest) -> dict[str, str]:
    tags = {
        "spectrum.stage": manifest.stage,
        "spectrum.store": redact(store.root_uri),
        "spectrum.cache_key": manifest.cache_key,
        "spectrum.code_version": manifest.code_version,
        "spectrum.status": manifest.status,
    }
    selection = _selection_facts(store, manifest)
    for name in ("sha256", "policy", "estimator"):
        if selection.get(name):
            tags[f"spectrum.selection_{name}" if name != "estimator" else "spectrum.estimator"] = str(selection[name])
    if isinstance(manifest.parameters.get("estimator"), str):  # the scan's own
        tags["spectrum.estimator"] = manifest.parameters["estimator"]
    if manifest.compute:
        name = manifest.compute.get("device_name")
        tags["spectrum.device"] = manifest.compute["device"] + (f" ({name})" if name else "")
    return tags


def _selection_facts(store: ArtifactStore, manifest: Manifest) -> dict[str, Any]:
    """The selection a stage made (layer_select: its selection.json) or trained (cpt/sft: training.json's record)."""
    for output in manifest.outputs:
        key = output.get("key", "")
        if key.endswith(f"/{SELECTION_JSON_FILE}"):
            document = json.loads(store.read_recorded(output)[0])
            return {"sha256": output.get("sha256"), "policy": document.get("policy"), "estimator": document.get("estimator")}
        if key.endswith(f"/{TRAINING_FILE}"):
            return json.loads(store.read_recorded(output)[0]).get("selection") or {}
    return {}


def _flatten(parameters: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`; lists as JSON; values clipped to MLflow's limit."""
    flat: dict[str, str] = {}
    for name, value in parameters.items():
        key = prefix + _NAME.sub("_", str(name))  # MLflow refuses other characters in a name (a user's mapping key, say)
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
    items = [Metric(_NAME.sub("_", name), value, now, step) for name, value, step in metrics if value == value]  # NaN dropped
    for start in range(0, len(items), 10 * _BATCH):
        client.log_batch(run_id, metrics=items[start : start + 10 * _BATCH])


def _stage_metrics(store: ArtifactStore, manifest: Manifest, computed: bool) -> Iterator[tuple[str, float, int]]:
    """(name, value, step): the compute, the training curves per step, the evaluation's base, trained and delta."""
    if manifest.compute and computed:
        use = usage([manifest.compute])
        yield "device_seconds", float(manifest.compute["device_seconds"]), 0
        yield "gpu_hours", use.gpu_hours, 0
    for row in table_rows(store, manifest, TRAINING_METRICS_TABLE, required=False) or []:
        for name in _TRAINING_CURVES:
            if row.get(name) is not None:
                yield name, float(row[name]), int(row["step"])
    for row in table_rows(store, manifest, EVALUATION_TABLE, required=False) or []:
        if row.get("value") is not None:
            yield f"{row['metric']}/{row['dataset']}/{row['model']}", float(row["value"]), 0


def _artifacts(store: ArtifactStore, manifest: Manifest) -> Iterator[tuple[str, bytes]]:
    """(artifact name, bytes) of the stage's records a team looks at: ARTIFACT_FILES and the Parquet tables.

    Model weights, checkpoints and the held-out data itself stay in the store (the tags say where): a tracker is
    not a second copy of a team's data.
    """
    prefix = f"runs/{manifest.run_id}/{manifest.stage}/"
    for output in manifest.outputs:
        key = output.get("key", "")
        if key.startswith(prefix) and key.removeprefix(prefix) in ARTIFACT_FILES:
            name = key.removeprefix(prefix)
        elif key.startswith("tables/"):
            name = f"tables/{key.split('/')[1]}.parquet"
        else:
            continue
        if int(output.get("size") or 0) <= MAX_ARTIFACT_BYTES:
            yield name, store.read_recorded(output)[0]


__all__ = ["LOGGED", "UNAVAILABLE", "end_stage_run", "finish_pipeline_run", "log_stage", "start_pipeline_run"]
