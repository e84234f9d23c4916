"""snr_scan and layer_select publishing through the artifact store: layout, lineage, cache, failures, resume, secrets."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spectrum_cli.main import main
from stages import snr_scan
from stages.base.errors import CorruptWeightsError, InputError, OutputExistsError
from stages.base.settings import WORK_DIR_ENV
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig
from stages.layer_select import run as select_run
from stages.scan import engine
from stages.scan.table import read_table_metadata
from stages.snr_scan import ScanConfig
from stages.store import (
    ArtifactNotFoundError,
    FileStore,
    list_runs,
    load_manifest,
    read_table,
    table_files,
    table_key,
)

from .helpers import QUIET, interrupt_scan_after

MODEL_ID = "tiny-llama"
SNR_KEY = "tables/snr/stage=snr_scan/run_id={run}/part-0.parquet"
SELECTION_KEY = "tables/selection/stage=layer_select/run_id={run}/part-0.parquet"


# --- helpers ------------------------------------------------------------------------------------


def scan_config(model: Path, **overrides) -> ScanConfig:
    options = {"model_dir": str(model), "output": None, "model_id": MODEL_ID, "workers": 1}
    return ScanConfig(**{**options, **overrides})


def store_scan(store, model: Path, work_dir: Path, run_id=None, force=False, **overrides):
    """(the stage result, the scan's rows or None when a committed run was reused)"""
    context = StageContext(store, run_id=run_id, force=force, work_dir=work_dir, progress=False)
    result = snr_scan.run(scan_config(model, **overrides), context)
    return result, result.detail


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def without(rows: list[dict], *columns: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in columns} for r in rows]


def table_of(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def snapshot(store) -> dict[str, bytes]:
    """Every object the store lists, with its bytes (and, for a file store, every file under the root)."""
    objects = {key: store.get_bytes(key) for key in store.list("")}
    if isinstance(store, FileStore):
        root = Path(store.root_uri.removeprefix("file://"))
        objects.update({f"<file>{p.relative_to(root)}": p.read_bytes() for p in root.rglob("*") if p.is_file()})
    return objects




def _no_scan(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the scan decomposed a matrix although a committed run should have been reused")

    monkeypatch.setattr(engine, "singular_values", boom)


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
    _no_scan(monkeypatch)
    again, result = store_scan(store, tiny_model, tmp_path / "work")
    assert again.cached is True and result is None
    assert again.manifest == first.manifest
    assert list_runs(store) == {first.manifest.run_id: ["snr_scan"]}
    assert snapshot(store) == before


def test_a_named_run_that_reuses_work_records_where_it_came_from(store, tiny_model, tmp_path, monkeypatch):
    """A pipeline run finds every stage under its own id, even the ones an earlier run computed."""
    first, _ = store_scan(store, tiny_model, tmp_path / "work", run_id="first")
    _no_scan(monkeypatch)
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
    real = engine.singular_values
    monkeypatch.setattr(engine, "singular_values", lambda *a, **k: calls.append(1) or real(*a, **k))
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


# --- failures, work folder, resume ----------------------------------------------------------------


def _nan_checkpoint(write_checkpoint, folder: Path) -> Path:
    import torch

    g = torch.Generator().manual_seed(5)
    broken = torch.randn(24, 16, generator=g)
    broken[2, 7] = float("nan")
    return write_checkpoint(
        folder,
        {
            "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
            "model.layers.1.mlp.up_proj.weight": broken,
            "model.layers.2.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
        },
    )


def test_nan_mid_scan_leaves_a_failed_manifest_and_no_committed_table(store, write_checkpoint, tmp_path, capsys):
    model = _nan_checkpoint(write_checkpoint, tmp_path / "model")
    with pytest.raises(CorruptWeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        store_scan(store, model, tmp_path / "work", model_id="broken")
    runs = list_runs(store)
    assert len(runs) == 1
    (run,) = runs
    assert runs[run] == ["snr_scan"]
    manifest = load_manifest(store, run, "snr_scan")
    assert manifest.status == "failed" and manifest.outputs == [] and manifest.finished_at is not None
    assert not store.list("cache/")  # a failed run is never a cache hit
    assert not store.exists(SNR_KEY.format(run=run))
    with pytest.raises(ArtifactNotFoundError):
        table_files(store, "snr")
    with pytest.raises(ArtifactNotFoundError):
        read_table(store, "snr", run_id=run)

    code = main(["runs", "--store", store.root_uri, "--json"])
    assert code == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["run_id"] == run and summary["status"] == "failed"
    assert summary["stages"] == {"snr_scan": "failed"}
    assert main(["runs", "--store", store.root_uri]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.startswith(run))
    assert "failed" in line and "snr_scan(failed)" in line

    # selecting from the failed run is a clear error
    with pytest.raises(InputError, match="failed"):
        select_run(SelectConfig(snr_input=None, out_dir=None, snr_run=run), StageContext(store))


def test_work_dir_is_removed_after_a_successful_store_scan(store, tiny_model, tmp_path):
    work = tmp_path / "work"
    outcome, result = store_scan(store, tiny_model, work)
    assert not (work / outcome.manifest.cache_key).exists()
    assert not work.exists() or list(work.iterdir()) == []
    assert result.output == work / outcome.manifest.cache_key / "snr.parquet"


def test_work_dir_from_the_environment_is_used_and_removed(store, synthetic_model, tmp_path, monkeypatch):
    work = tmp_path / "env-work"
    monkeypatch.setenv(WORK_DIR_ENV, str(work))
    seen = []
    real = snr_scan.scan_to_table

    def spy(config, progress, **options):
        seen.append(Path(config.output))
        return real(config, progress, **options)

    monkeypatch.setattr(snr_scan, "scan_to_table", spy)
    outcome = snr_scan.run(scan_config(synthetic_model(), model_id="env-work"), StageContext(store, progress=False))
    assert seen == [work / outcome.manifest.cache_key / "snr.parquet"]
    assert list(work.iterdir()) == []


def test_interrupted_store_scan_resumes_to_the_same_table(store, tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    work = tmp_path / "work"
    interrupt_scan_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        store_scan(store, tiny_model, work)
    monkeypatch.undo()
    (interrupted,) = list_runs(store)
    assert load_manifest(store, interrupted, "snr_scan").status == "failed"
    assert not store.list("tables/")
    partials = list(work.rglob("*.partial.jsonl"))
    assert len(partials) == 1 and len(partials[0].read_text().splitlines()) == 1 + 5

    outcome, result = store_scan(store, tiny_model, work)
    assert not outcome.cached and outcome.manifest.run_id != interrupted
    assert result.resumed == 5
    assert partials[0].parent.name == outcome.manifest.cache_key
    assert not partials[0].parent.exists()  # the work folder is gone once the table is in the store
    stored = table_of(store.get_bytes(SNR_KEY.format(run=outcome.manifest.run_id)))
    expected = pq.read_table(tiny_snr_table)
    assert without(stored.to_pylist(), "scan_seconds") == without(expected.to_pylist(), "scan_seconds")
    summaries = {s["run_id"]: s["status"] for s in _runs_json(store)}
    assert summaries == {interrupted: "failed", outcome.manifest.run_id: "succeeded"}


def _runs_json(store) -> list[dict]:
    from stages.store.lineage import list_run_summaries

    return list_run_summaries(store)


def test_store_scan_refuses_to_overwrite_an_existing_reference_json(store, tiny_model, tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text("precious")
    before = snapshot(store)
    with pytest.raises(OutputExistsError, match="ref.json"):
        store_scan(store, tiny_model, tmp_path / "work", reference_json=str(ref))
    assert ref.read_text() == "precious"
    assert snapshot(store) == before


def test_cached_store_scan_still_writes_the_requested_local_files(store, tiny_model, tmp_path, monkeypatch):
    first, _ = store_scan(store, tiny_model, tmp_path / "work")
    run = first.manifest.run_id
    _no_scan(monkeypatch)
    out, ref = tmp_path / "again.parquet", tmp_path / "again.json"
    outcome, _ = store_scan(store, tiny_model, tmp_path / "work", output=str(out), reference_json=str(ref))
    assert outcome.cached and outcome.manifest.run_id == run
    assert out.read_bytes() == store.get_bytes(SNR_KEY.format(run=run))
    assert ref.read_bytes() == store.get_bytes(f"runs/{run}/snr_scan/snr_results.json")


def test_a_store_under_the_current_directory_is_not_a_secret_leak(tiny_model, tmp_path, monkeypatch):
    from stages.store import open_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))  # as a shell sets it
    store = open_store(str(tmp_path / "store"))
    outcome, _ = store_scan(store, tiny_model, tmp_path / "work")
    assert outcome.manifest.status == "succeeded"


# --- layer_select from the store ---------------------------------------------------------------


@pytest.fixture
def scanned(store, tiny_model, tmp_path):
    """(store, snr run id) with a committed scan of tiny_model."""
    outcome, _ = store_scan(store, tiny_model, tmp_path / "work")
    return store, outcome.manifest.run_id


def store_config(run: str, **overrides) -> SelectConfig:
    return SelectConfig(**{"snr_input": None, "out_dir": None, "snr_run": run, **overrides})


def test_select_from_a_store_run_publishes_its_outputs_and_lineage(scanned, tiny_snr_table, tmp_path):
    store, snr_run = scanned
    outcome = select_run(store_config(snr_run), StageContext(store))
    assert outcome.manifest is not None and not outcome.cached and outcome.detail.out_dir is None
    m = outcome.manifest
    run = m.run_id
    assert run != snr_run and m.stage == "layer_select" and m.status == "succeeded"

    # the input is the SNR table's URI with its sha256 (as the scan's manifest recorded it)
    snr_key = SNR_KEY.format(run=snr_run)
    snr_bytes = store.get_bytes(snr_key)
    (ref,) = m.inputs
    assert ref["uri"] == store.uri(snr_key)
    assert ref["sha256"] == sha(snr_bytes) and ref["size"] == len(snr_bytes)
    scan_output = next(o for o in load_manifest(store, snr_run, "snr_scan").outputs if o["key"] == snr_key)
    assert ref["sha256"] == scan_output["sha256"]

    selection_key = SELECTION_KEY.format(run=run)
    yaml_key = f"runs/{run}/layer_select/unfrozen_parameters.yaml"
    json_key = f"runs/{run}/layer_select/selection.json"
    outputs = {o["key"]: o for o in m.outputs}
    assert set(outputs) == {selection_key, yaml_key, json_key}
    for key, o in outputs.items():
        data = store.get_bytes(key)
        assert o["sha256"] == sha(data) and o["size"] == len(data)

    # the same selection as from the local table
    local = select_run(SelectConfig(snr_input=str(tiny_snr_table), out_dir=str(tmp_path / "local")), StageContext()).detail
    assert store.get_bytes(yaml_key) == (tmp_path / "local" / "unfrozen_parameters.yaml").read_bytes()
    summary = json.loads(store.get_bytes(json_key))
    assert summary["trainable_tensors"] == local.summary["trainable_tensors"]
    assert summary["source"] == f"run {snr_run}" and summary["model_id"] == MODEL_ID
    stored = table_of(store.get_bytes(selection_key))
    assert stored.to_pylist() == local.table.to_pylist()
    assert [r["tensor_name"] for r in stored.to_pylist() if r["selected"]] == summary["trainable_tensors"]
    assert "lm_head.weight" in summary["trainable_tensors"] and "model.embed_tokens.weight" in summary["trainable_tensors"]


def test_select_from_the_store_is_cached_and_forced(scanned):
    store, snr_run = scanned
    first = select_run(store_config(snr_run), StageContext(store))
    before = snapshot(store)
    again = select_run(store_config(snr_run), StageContext(store))
    assert again.cached and again.manifest == first.manifest
    assert snapshot(store) == before
    other = select_run(store_config(snr_run, top_percent=25.0), StageContext(store))
    assert not other.cached and other.manifest.run_id != first.manifest.run_id
    forced = select_run(store_config(snr_run), StageContext(store, force=True))
    assert not forced.cached and forced.manifest.run_id not in (first.manifest.run_id, other.manifest.run_id)
    assert len(list_runs(store)) == 4  # the scan, and three selections


def test_select_into_the_scan_run_records_both_stages_under_one_run(scanned):
    store, snr_run = scanned
    result = select_run(store_config(snr_run), StageContext(store, run_id=snr_run))
    assert result.manifest.run_id == snr_run
    assert list_runs(store) == {snr_run: ["snr_scan", "layer_select"]}


def test_select_with_local_out_dir_and_store_writes_both(scanned, tmp_path):
    store, snr_run = scanned
    out = tmp_path / "sel"
    result = select_run(store_config(snr_run, out_dir=str(out)), StageContext(store))
    run = result.manifest.run_id
    for name in ("unfrozen_parameters.yaml", "selection.json"):
        assert (out / name).read_bytes() == store.get_bytes(f"runs/{run}/layer_select/{name}")


def test_select_errors(scanned, tiny_snr_table, tmp_path):
    store, snr_run = scanned
    with pytest.raises(InputError, match="--store"):
        select_run(store_config(snr_run, out_dir=str(tmp_path / "a")), StageContext())
    with pytest.raises(InputError, match="not both"):
        select_run(store_config(snr_run, snr_input=str(tiny_snr_table)), StageContext(store))
    with pytest.raises(InputError, match="nowhere to write"):
        select_run(SelectConfig(snr_input=str(tiny_snr_table), out_dir=None), StageContext())
    before = snapshot(store)
    with pytest.raises(ArtifactNotFoundError, match="20990101T000000Z-deadbeef"):
        select_run(store_config("20990101T000000Z-deadbeef"), StageContext(store))
    assert snapshot(store) == before
    assert not (tmp_path / "a").exists()


def test_select_cli_errors_exit_2_with_one_line(scanned, capsys):
    store, snr_run = scanned
    assert main(["select", "--snr-run", snr_run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--store" in err and len(err.strip().splitlines()) == 1
    assert main(["select", "--snr-run", "no-such-run", "--store", store.root_uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-run" in err


# --- secrets ------------------------------------------------------------------------------------


def test_no_secret_from_the_environment_reaches_the_store(store, tiny_model, tmp_path, monkeypatch):
    hf_token = "hf_" + "Q7x" * 12
    monkeypatch.setenv("HF_TOKEN", hf_token)
    if isinstance(store, FileStore):
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAZZZZZZZZZZZZZZZZ")
    secrets_ = [os.environ["HF_TOKEN"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    outcome, _ = store_scan(store, tiny_model, tmp_path / "work", reference_json=str(tmp_path / "ref.json"))
    select_run(store_config(outcome.manifest.run_id), StageContext(store))
    objects = snapshot(store)
    assert any(k.endswith("manifest.json") for k in objects) and any(k.endswith(".parquet") for k in objects)
    for key, data in objects.items():
        for secret in secrets_:
            assert secret.encode() not in data, f"{key} holds a secret from the environment"
            assert secret not in key


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
