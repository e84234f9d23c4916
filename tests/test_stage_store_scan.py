"""snr_scan publishing into the artifact store: the layout, the lineage, and the cache (reuse, new runs, --force)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spectrum_cli.main import main
from stages import snr_scan
from stages.base.errors import OutputExistsError
from stages.base.settings import WORK_DIR_ENV
from stages.scan import engine
from stages.scan.table import read_table_metadata
from stages.store import (
    list_runs,
    load_manifest,
    read_table,
    table_files,
    table_key,
)

from .helpers import (
    MODEL_ID,
    QUIET,
    SNR_KEY,
    no_decomposition,
    scan_config,
    sha,
    snapshot,
    store_scan,
    table_of,
    without,
)


@pytest.fixture(scope="module")
def sharded_model(synthetic_model) -> Path:
    """The tiny model split into several shards with an index and a config.json."""
    folder = synthetic_model(max_shard_bytes=100_000)
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


# --- scanning into the store --------------------------------------------------------------------


def test_scan_publishes_table_reference_json_and_a_manifest_of_every_file_read(store, sharded_model, tmp_path):
    outcome, result = store_scan(store, sharded_model, tmp_path / "work")
    assert not outcome.cached and result is not None
    m = outcome.manifest
    run = m.run_id
    assert m.stage == "snr_scan" and m.status == "succeeded"
    assert list_runs(store) == {run: ["snr_scan"]}

    # inputs: every shard, the index and config.json, each with its sha256 and size
    shards = sorted(p.name for p in sharded_model.glob("*.safetensors"))
    expected_files = {*shards, "model.safetensors.index.json", "config.json"}
    by_uri = {ref["uri"]: ref for ref in m.inputs}
    assert set(by_uri) == {(sharded_model / name).resolve().as_uri() for name in expected_files}
    assert len(m.inputs) == len(expected_files)
    for name in expected_files:
        data = (sharded_model / name).read_bytes()
        ref = by_uri[(sharded_model / name).resolve().as_uri()]
        assert ref["sha256"] == sha(data)
        assert ref["size"] == len(data)
    assert m.parameters == {"estimator": "reference", "svd_method": "gram", "include": [], "exclude": [], "model_id": MODEL_ID}

    # outputs: the Parquet partition and snr_results.json, both hashed and sized
    table_k = SNR_KEY.format(run=run)
    json_k = f"runs/{run}/snr_scan/snr_results.json"
    assert table_k == table_key("snr", "snr_scan", run)
    outputs = {ref["key"]: ref for ref in m.outputs}
    assert set(outputs) == {table_k, json_k}
    for key in (table_k, json_k):
        data = store.get_bytes(key)
        assert outputs[key]["sha256"] == sha(data)
        assert outputs[key]["size"] == len(data)
        assert outputs[key]["uri"] == store.uri(key)
    assert store.exists(f"runs/{run}/snr_scan/manifest.json")
    assert load_manifest(store, run, "snr_scan") == m

    reference = json.loads(store.get_bytes(json_k))
    scanned = [r for r in result.rows if r["scanned"]]
    assert set(reference) == {r["module_name"] for r in scanned}
    for r in scanned:
        assert reference[r["module_name"]] == {"snr": pytest.approx(r["snr"]), "type": r["module_type"]}


def test_store_table_equals_a_local_scan(store, sharded_model, tmp_path):
    outcome, _ = store_scan(store, sharded_model, tmp_path / "work")
    run = outcome.manifest.run_id
    local = snr_scan.run(scan_config(sharded_model, output=str(tmp_path / "local.parquet")), QUIET).detail
    expected = pq.read_table(local.output)

    stored = table_of(store.get_bytes(SNR_KEY.format(run=run)))
    assert stored.schema.remove_metadata() == expected.schema.remove_metadata()
    assert without(stored.to_pylist(), "scan_seconds") == without(expected.to_pylist(), "scan_seconds")
    assert read_table_metadata(stored) == read_table_metadata(expected)
    assert len(stored) == len(local.rows) > 0

    # through the dataset reader: the same rows plus the partition columns
    through_dataset = read_table(store, "snr", run_id=run)
    assert set(through_dataset.column("run_id").to_pylist()) == {run}
    assert set(through_dataset.column("stage").to_pylist()) == {"snr_scan"}
    assert without(through_dataset.drop_columns(["stage", "run_id"]).to_pylist(), "scan_seconds") == without(
        expected.to_pylist(), "scan_seconds"
    )
    files = table_files(store, "snr")
    assert files.uris == [store.uri(SNR_KEY.format(run=run))]


# --- cache ----------------------------------------------------------------------------------------


def test_unchanged_model_and_settings_reuse_the_committed_run(store, tiny_model, tmp_path, monkeypatch):
    first, _ = store_scan(store, tiny_model, tmp_path / "work")
    before = snapshot(store)
    no_decomposition(monkeypatch)
    again, result = store_scan(store, tiny_model, tmp_path / "work")
    assert again.cached is True and result is None
    assert again.manifest == first.manifest
    assert list_runs(store) == {first.manifest.run_id: ["snr_scan"]}
    assert snapshot(store) == before


def test_a_named_run_that_reuses_work_records_where_it_came_from(store, tiny_model, tmp_path, monkeypatch):
    """A pipeline run finds every stage under its own id, even the ones an earlier run computed."""
    first, _ = store_scan(store, tiny_model, tmp_path / "work", run_id="first")
    no_decomposition(monkeypatch)
    again, result = store_scan(store, tiny_model, tmp_path / "work", run_id="second")
    assert again.cached and result is None and again.manifest == first.manifest
    assert list_runs(store) == {"first": ["snr_scan"], "second": ["snr_scan"]}
    record = json.loads(store.get_bytes("runs/second/snr_scan/manifest.json"))
    assert record["reused_from"] == {"run_id": "first", "stage": "snr_scan"} and record["outputs"] == json.loads(
        store.get_bytes("runs/first/snr_scan/manifest.json")
    )["outputs"]
    assert load_manifest(store, "second", "snr_scan") == first.manifest  # followed to the run that did the work
    assert [k.rsplit("/", 1)[1] for k in store.list(f"cache/snr_scan/{first.manifest.cache_key}/")] == ["first.json"]
    assert store_scan(store, tiny_model, tmp_path / "work", run_id="second")[0].manifest == first.manifest  # again: no-op


def test_a_changed_setting_makes_a_new_run(store, tiny_model, tmp_path):
    first, _ = store_scan(store, tiny_model, tmp_path / "work")
    second, result = store_scan(store, tiny_model, tmp_path / "work", estimator="gavish-donoho")
    assert not second.cached and result is not None
    assert second.manifest.run_id != first.manifest.run_id
    assert second.manifest.cache_key != first.manifest.cache_key
    assert second.manifest.parameters["estimator"] == "gavish-donoho"
    assert sorted(list_runs(store)) == sorted([first.manifest.run_id, second.manifest.run_id])
    rows = table_of(store.get_bytes(SNR_KEY.format(run=second.manifest.run_id))).to_pylist()
    assert {r["estimator"] for r in rows if r["scanned"]} == {"gavish-donoho"}


def test_a_changed_model_file_makes_a_new_run(store, synthetic_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(synthetic_model(), model)
    first, _ = store_scan(store, model, tmp_path / "work")
    # other weights of the same names and shapes
    (model / "model.safetensors").unlink()
    shutil.copyfile(synthetic_model(seed=1) / "model.safetensors", model / "model.safetensors")
    second, result = store_scan(store, model, tmp_path / "work")
    assert not second.cached and result is not None and result.resumed == 0
    assert second.manifest.run_id != first.manifest.run_id
    shard_uri = (model / "model.safetensors").resolve().as_uri()
    old = next(r for r in first.manifest.inputs if r["uri"] == shard_uri)
    new = next(r for r in second.manifest.inputs if r["uri"] == shard_uri)
    assert new["sha256"] == sha((model / "model.safetensors").read_bytes()) != old["sha256"]
    old_rows = table_of(store.get_bytes(SNR_KEY.format(run=first.manifest.run_id))).to_pylist()
    new_rows = table_of(store.get_bytes(SNR_KEY.format(run=second.manifest.run_id))).to_pylist()
    assert [r["tensor_sha256"] for r in old_rows if r["scanned"]] != [r["tensor_sha256"] for r in new_rows if r["scanned"]]


def test_a_changed_config_json_makes_a_new_run(store, synthetic_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(synthetic_model(), model)
    first, _ = store_scan(store, model, tmp_path / "work")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "spectrum_test_marker": 1}))
    second, _ = store_scan(store, model, tmp_path / "work")
    assert not second.cached and second.manifest.run_id != first.manifest.run_id


def test_force_recomputes_under_a_new_run_id(store, tiny_model, tmp_path, monkeypatch):
    first, _ = store_scan(store, tiny_model, tmp_path / "work")
    calls = []
    real = engine.matrix_stats
    monkeypatch.setattr(engine, "matrix_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    forced, result = store_scan(store, tiny_model, tmp_path / "work", force=True)
    assert not forced.cached and result is not None and result.resumed == 0
    assert len(calls) == result.scanned > 0
    assert forced.manifest.run_id != first.manifest.run_id
    assert forced.manifest.cache_key == first.manifest.cache_key
    assert sorted(list_runs(store)) == sorted([first.manifest.run_id, forced.manifest.run_id])
    a = table_of(store.get_bytes(SNR_KEY.format(run=first.manifest.run_id))).to_pylist()
    b = table_of(store.get_bytes(SNR_KEY.format(run=forced.manifest.run_id))).to_pylist()
    assert without(a, "scan_seconds") == without(b, "scan_seconds")
    # both are indexed under the same cache key
    assert len(store.list(f"cache/snr_scan/{first.manifest.cache_key}/")) == 2


@pytest.mark.parametrize("how", ["force", "other-settings"])
def test_an_explicit_run_id_that_has_the_stage_is_refused_and_nothing_changes(store, tiny_model, tmp_path, how):
    first, _ = store_scan(store, tiny_model, tmp_path / "work")
    run = first.manifest.run_id
    before = snapshot(store)
    overrides = {"force": True} if how == "force" else {"estimator": "gavish-donoho"}
    with pytest.raises(OutputExistsError) as raised:
        store_scan(store, tiny_model, tmp_path / "work", run_id=run, **overrides)
    assert run in str(raised.value) and raised.value.exit_code == 4
    assert snapshot(store) == before
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_store_scan_via_cli_reports_the_committed_run(store, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(WORK_DIR_ENV, str(tmp_path / "work"))
    assert main(["scan", str(tiny_model), "--store", store.root_uri, "--model-id", "m", "--no-progress", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    run = re.search(r"committed run (\S+)", out).group(1)
    assert list_runs(store) == {run: ["snr_scan"]}
    assert main(["scan", str(tiny_model), "--store", store.root_uri, "--model-id", "m", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"reusing run {run}" in out and "--force" in out
    assert list_runs(store) == {run: ["snr_scan"]}
