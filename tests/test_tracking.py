"""Stages logged to a real MLflow server: nested runs, parameters, tags, curves and artifacts read back as the store holds them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spectrum_cli.main import main
from stages import cpt, layer_select, snr_scan
from stages.base.contracts import SELECTION_JSON_FILE, SNR_TABLE, UNFROZEN_YAML_FILE
from stages.core.cli import command_line, context_from_args, stage_parser
from stages.core.stage import StageContext
from stages.store import load_manifest, open_store, read_output
from stages.store.tables import read_table_output
from stages.tracking import MlflowTarget
from stages.tracking.mlflow_log import LOGGED, UNAVAILABLE, start_pipeline_run

from .mlflow_server import free_ports
from .test_cpt import base_model, config, corpus, drop  # noqa: F401 - the tiny model, its tokenizer and drop

STEPS = 4


def _experiment(client, name: str):
    return client.get_experiment_by_name(name).experiment_id


@pytest.mark.integration
def test_a_pipeline_of_stages_is_one_mlflow_run_with_a_nested_run_per_stage(base_model, drop, tmp_path, mlflow_client, mlflow_server):  # noqa: F811
    store = open_store(str(tmp_path / "store"))
    target = start_pipeline_run(MlflowTarget(mlflow_server.uri, "stages-test"), "run-1", store.root_uri, {"model": str(base_model)})
    assert target.parent_run_id
    context = StageContext(store, run_id="run-1", work_dir=tmp_path / "work", progress=False, tracking=target)
    scanned = snr_scan.run(snr_scan.ScanConfig(model_dir=str(base_model), workers=1), context)
    selected = layer_select.run(layer_select.SelectConfig(snr_run=scanned.run_id, top_percent=25), context)
    trained = cpt.run(config(base_model, drop, selection_run=selected.run_id, max_steps=STEPS, save_steps=STEPS), context)

    runs = mlflow_client.search_runs([_experiment(mlflow_client, "stages-test")], f"tags.mlflow.parentRunId = '{target.parent_run_id}'")
    by_stage = {run.data.tags["spectrum.stage"]: run for run in runs}
    assert set(by_stage) == {"snr_scan", "layer_select", "cpt"}
    for result in (scanned, selected, trained):
        manifest = load_manifest(store, "run-1", result.manifest.stage)
        run = by_stage[manifest.stage]
        assert manifest.tracking["mlflow"] == {
            "status": LOGGED,
            "tracking_uri": mlflow_server.uri,
            "experiment_id": run.info.experiment_id,
            "run_id": run.info.run_id,
        }
        assert run.data.tags["spectrum.run_id"] == "run-1" and run.data.tags["spectrum.cache_key"] == manifest.cache_key
        assert run.data.tags["spectrum.store"] == store.root_uri and run.info.status == "FINISHED"
        assert run.data.metrics["device_seconds"] == manifest.compute["device_seconds"]
    assert by_stage["snr_scan"].data.params["estimator"] == "reference"
    assert by_stage["layer_select"].data.params["top_percent"] == "25"
    # the selection the tracker shows is the store's, byte for byte, and both runs that used it say which
    selection = load_manifest(store, "run-1", "layer_select")
    for name in (SELECTION_JSON_FILE, UNFROZEN_YAML_FILE):
        local = mlflow_client.download_artifacts(by_stage["layer_select"].info.run_id, name, str(tmp_path / "download"))
        assert Path(local).read_bytes() == read_output(store, selection, name)[0]
    selection_sha = selection.recorded_output(f"runs/run-1/layer_select/{SELECTION_JSON_FILE}")["sha256"]
    assert by_stage["layer_select"].data.tags["spectrum.selection_sha256"] == selection_sha
    assert by_stage["layer_select"].data.tags["spectrum.estimator"] == "reference"
    snr = mlflow_client.download_artifacts(by_stage["snr_scan"].info.run_id, "tables/snr.parquet", str(tmp_path / "download"))
    assert Path(snr).read_bytes() == read_table_output(store, scanned.manifest, SNR_TABLE)[0]
    # one point per optimizer step of each training curve
    cpt_run = by_stage["cpt"].info.run_id
    for curve in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        history = mlflow_client.get_metric_history(cpt_run, curve)
        assert sorted(point.step for point in history) == list(range(1, STEPS + 1)), curve
    assert by_stage["cpt"].data.params["max_steps"] == str(STEPS)
    assert "deepspeed_config.optimizer.type" in by_stage["cpt"].data.params  # nested parameters, flattened


@pytest.mark.integration
def test_a_reused_stage_is_logged_as_the_run_it_reused(tiny_model, tmp_path, mlflow_client, mlflow_server):
    store = open_store(str(tmp_path / "store"))
    target = MlflowTarget(mlflow_server.uri, "reuse-test")
    first = snr_scan.run(snr_scan.ScanConfig(model_dir=str(tiny_model), workers=1), StageContext(store, run_id="first", tracking=target))
    again = snr_scan.run(snr_scan.ScanConfig(model_dir=str(tiny_model), workers=1), StageContext(store, run_id="second", tracking=target))
    assert again.cached and again.manifest.run_id == first.run_id
    runs = {run.data.tags["spectrum.run_id"]: run for run in mlflow_client.search_runs([_experiment(mlflow_client, "reuse-test")])}
    assert set(runs) == {"first", "second"}
    assert runs["second"].data.tags["spectrum.reused_from"] == "first" and "spectrum.reused_from" not in runs["first"].data.tags
    assert "device_seconds" not in runs["second"].data.metrics  # the work, and its cost, is the first run's


def test_a_tracker_that_is_down_costs_one_warning_and_the_stage_commits(tiny_model, tmp_path, caplog):
    store = open_store(str(tmp_path / "store"))
    down = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="stages"):
        result = snr_scan.run(snr_scan.ScanConfig(model_dir=str(tiny_model), workers=1), StageContext(store, tracking=MlflowTarget(down)))
    manifest = load_manifest(store, result.run_id, "snr_scan")
    assert manifest.status == "succeeded" and manifest.tracking["mlflow"]["status"] == UNAVAILABLE
    assert manifest.tracking["mlflow"]["tracking_uri"] == down and manifest.tracking["mlflow"]["error"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "experiment tracker" in r.getMessage()]
    assert len(warnings) == 1 and "the store holds everything" in warnings[0].getMessage()


def test_a_tracking_uri_with_credentials_is_refused_before_any_work(tiny_model, tmp_path, capsys):
    store_dir = tmp_path / "store"
    code = main(["scan", str(tiny_model), "--store", str(store_dir), "--mlflow-tracking-uri", "http://alice:s3cr3tpass@tracker:5000"])
    err = capsys.readouterr().err
    assert code == 2 and "MLFLOW_TRACKING_USERNAME" in err and "s3cr3tpass" not in err
    assert not (store_dir / "runs").exists()
    assert main(["scan", str(tiny_model), "--store", str(store_dir), "--mlflow-parent-run", "0" * 32]) == 2
    assert "--mlflow-parent-run needs a tracker" in capsys.readouterr().err


def test_the_tracker_travels_on_a_stage_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    target = MlflowTarget("http://tracker:5000", "team", "a" * 32)
    context = StageContext(open_store(str(tmp_path / "store")), run_id="r1", tracking=target)
    config = layer_select.SelectConfig(snr_run="r0", top_percent=25)
    args = stage_parser(layer_select.STAGE).parse_args(command_line(layer_select.STAGE, config, context))
    assert context_from_args(args).tracking == target
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    plain = StageContext(None)
    args = stage_parser(layer_select.STAGE).parse_args(command_line(layer_select.STAGE, config, plain))
    assert context_from_args(args).tracking == MlflowTarget("http://from-env:5000")


def _quick_stage(store, context, produce):
    from stages.core.execution import execute_stage

    return execute_stage("layer_select", context, {"top_percent": 25}, [], produce)


@pytest.mark.integration
def test_a_failed_stage_is_a_failed_mlflow_run_and_a_failed_commit_never_shows_finished(
    tmp_path, mlflow_client, mlflow_server, monkeypatch
):  # noqa: E501
    from stages.core import execution

    store = open_store(str(tmp_path / "store"))
    target = MlflowTarget(mlflow_server.uri, "failures")

    def broken(stage):
        raise RuntimeError("the work broke")

    with pytest.raises(RuntimeError):
        _quick_stage(store, StageContext(store, run_id="broken", tracking=target), broken)
    failed = load_manifest(store, "broken", "layer_select")
    assert failed.status == "failed" and failed.tracking["mlflow"]["status"] == LOGGED
    assert mlflow_client.get_run(failed.tracking["mlflow"]["run_id"]).info.status == "FAILED"

    real_commit = execution.commit_manifest

    def commit_fails_once(store, manifest):
        if manifest.status == "succeeded":
            raise OSError("the store went away")
        return real_commit(store, manifest)

    monkeypatch.setattr(execution, "commit_manifest", commit_fails_once)
    with pytest.raises(OSError):
        _quick_stage(store, StageContext(store, run_id="uncommitted", tracking=target), lambda stage: [stage.put_bytes("a.json", b"{}")])
    record = load_manifest(store, "uncommitted", "layer_select")
    assert record.status == "failed"  # the store says failed, and so does MLflow: never a finished stage the store lacks
    assert mlflow_client.get_run(record.tracking["mlflow"]["run_id"]).info.status == "FAILED"


def test_a_target_known_to_be_down_is_not_contacted(tmp_path, caplog):
    store = open_store(str(tmp_path / "store"))
    down = MlflowTarget(f"http://127.0.0.1:{free_ports(1)[0]}").marked_unavailable("ConnectionError: refused")
    with caplog.at_level(logging.WARNING, logger="stages"):
        result = _quick_stage(store, StageContext(store, tracking=down), lambda stage: [stage.put_bytes("a.json", b"{}")])
    assert result.manifest.tracking["mlflow"] == {
        "status": UNAVAILABLE,
        "tracking_uri": down.tracking_uri,
        "error": "not contacted: ConnectionError: refused",
    }
    assert not caplog.records  # the one warning was the pipeline's, when it found the tracker down


@pytest.mark.integration
def test_a_stage_in_its_own_process_nests_in_the_pipeline_run_and_an_untracked_one_ignores_the_environment(
    tiny_model, tmp_path, mlflow_client, mlflow_server, monkeypatch
):
    from stages.core.process import run_in_own_process

    store = open_store(str(tmp_path / "store"))
    target = start_pipeline_run(MlflowTarget(mlflow_server.uri, "own-process"), "proc", store.root_uri, {})
    scanned = snr_scan.run(snr_scan.ScanConfig(model_dir=str(tiny_model), workers=1), StageContext(store, run_id="proc"))
    context = StageContext(store, run_id="proc", progress=False, work_dir=tmp_path / "work", tracking=target)
    tracked = run_in_own_process(layer_select.STAGE, layer_select.SelectConfig(snr_run=scanned.run_id, top_percent=25), context, "select")
    [run] = mlflow_client.search_runs([_experiment(mlflow_client, "own-process")], f"tags.mlflow.parentRunId = '{target.parent_run_id}'")
    assert run.info.run_id == tracked.manifest.tracking["mlflow"]["run_id"] and run.data.tags["spectrum.stage"] == "layer_select"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # the pipeline did not ask for tracking: the child must not track
    untracked = run_in_own_process(
        layer_select.STAGE, layer_select.SelectConfig(snr_run=scanned.run_id, top_percent=50), StageContext(store, run_id="quiet"), "select"
    )
    assert untracked.manifest.tracking is None
