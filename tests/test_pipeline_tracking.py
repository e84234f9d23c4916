"""A pipeline run in MLflow (a real `mlflow server`): one parent run, a run nested in it per stage, the run's totals and report."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import yaml

from flows import pipeline
from flows.pipeline import run_pipeline
from flows.pipeline_config import load_pipeline_config
from stages.base.errors import InputError

from .test_pipeline import inputs, write_config  # noqa: F401 - the tiny pipeline's inputs fixture

STAGES = ["download", "snr_scan", "layer_select", "cpt", "evaluate"]


def tracked_config(folder: Path, document: dict, uri: str, experiment: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    document = {**document, "tracking": {"mlflow": {"tracking_uri": uri, "experiment": experiment}}}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(document))
    return folder / "pipeline.yaml"


def pipeline_runs(client, experiment: str) -> tuple[list, list]:
    """(the pipeline runs, every other run) of an experiment."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    parents = [r for r in runs if r.data.tags.get("spectrum.kind") == "pipeline"]
    return parents, [r for r in runs if r not in parents]


@pytest.mark.integration
def test_a_pipeline_run_is_one_mlflow_run_with_a_nested_run_per_stage_and_the_report(
    prefect_api,
    mlflow_server,
    mlflow_client,
    inputs,  # noqa: F811
    tmp_path,
):
    from flows.pipeline import pipeline_flow

    evaluate = {"seq_len": 64, "max_tokens": 256, "general": str(inputs / "general.txt"), "snr_drift": False}
    written = yaml.safe_load(write_config(tmp_path, inputs, str(tmp_path / "store"), sft=None, evaluate=evaluate).read_text())
    written["cost"] = {"price_per_device_hour": 3.0}
    outcome = pipeline_flow(str(tracked_config(tmp_path, written, mlflow_server.uri, "pipeline-tracked")), run="tracked")

    (parent,), stage_runs = pipeline_runs(mlflow_client, "pipeline-tracked")
    assert parent.info.status == "FINISHED" and parent.data.tags["spectrum.run_id"] == "tracked"
    nested = [r for r in stage_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in nested if "." not in r.data.tags["mlflow.runName"]) == sorted(STAGES)
    assert all(r.data.tags.get("spectrum.run_id") == "tracked" for r in nested)
    metrics = parent.data.metrics
    assert metrics["stages_run"] == len(STAGES) and metrics["stages_reused"] == 0 and metrics["wall_seconds"] > 0
    assert metrics["device_hours"] > 0 and metrics["cost"] == pytest.approx(3.0 * metrics["device_hours"], abs=1e-5)
    assert "gpu_hours" in metrics
    assert [a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "report")] == ["report/report.html"]
    copy = Path(mlflow_client.download_artifacts(parent.info.run_id, "report/report.html", str(tmp_path / "downloaded")))
    assert copy.read_bytes() == Path(outcome["report"]).read_bytes()


@pytest.mark.integration
def test_a_failed_pipeline_run_is_a_failed_mlflow_run(prefect_api, mlflow_server, mlflow_client, tiny_model, tmp_path):
    document = {"model": str(tiny_model), "data": str(tmp_path / "no-such-drop"), "store": "store", "report": False}
    config = load_pipeline_config(tracked_config(tmp_path, document, mlflow_server.uri, "pipeline-failed"))
    with pytest.raises(InputError):
        run_pipeline(config, run="broken")
    (parent,), _ = pipeline_runs(mlflow_client, "pipeline-failed")
    assert parent.info.status == "FAILED" and parent.data.tags["spectrum.run_id"] == "broken"


@pytest.mark.integration
def test_a_tracker_that_is_down_is_one_warning_and_the_run_completes(tmp_path, monkeypatch, caplog):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(pipeline, "_run_stages", lambda config, store, result, *args: None)
    document = {"model": "m", "data": "d", "store": "store", "report": False}
    config = load_pipeline_config(tracked_config(tmp_path, document, f"http://127.0.0.1:{port}", "down"))
    with caplog.at_level(logging.WARNING):
        assert run_pipeline(config, run="untracked").run_id == "untracked"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "experiment tracker" in r.getMessage()]
    assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0].getMessage()


def test_a_pipeline_stopped_while_its_tracking_starts_releases_its_lease(tmp_path, monkeypatch):
    from stages.store import open_store
    from stages.store.lease import lease_state
    from stages.store.manifest import lease_folder

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_start_tracking", stopped)
    document = {"model": "m", "data": "d", "store": "store", "report": False}
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline_config(tracked_config(tmp_path, document, "http://127.0.0.1:9", "x")), run="stopped")
    released = lease_state(open_store(str(tmp_path / "store")), lease_folder("stopped", pipeline.PIPELINE_LEASE)).released
    assert released["outcome"] == "interrupted"
