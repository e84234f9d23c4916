"""A store run that fails: nothing looks committed, the commit and its cache index agree, the work folder and resumable work are kept."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spectrum_cli.main import main
from stages import snr_scan
from stages.base.contracts import FAILED, SNR_SCAN, SUCCEEDED
from stages.base.errors import CorruptWeightsError, InputError, OutputExistsError
from stages.base.settings import WORK_DIR_ENV
from stages.core.execution import StageRun
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig
from stages.layer_select import run as select_run
from stages.store import (
    ArtifactNotFoundError,
    StoreError,
    list_runs,
    load_manifest,
    open_store,
    read_table,
    table_files,
)

from .helpers import (
    SNR_KEY,
    interrupt_scan_after,
    no_decomposition,
    scan_config,
    snapshot,
    store_scan,
    table_of,
    without,
)

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
    no_decomposition(monkeypatch)
    out, ref = tmp_path / "again.parquet", tmp_path / "again.json"
    outcome, _ = store_scan(store, tiny_model, tmp_path / "work", output=str(out), reference_json=str(ref))
    assert outcome.cached and outcome.manifest.run_id == run
    assert out.read_bytes() == store.get_bytes(SNR_KEY.format(run=run))
    assert ref.read_bytes() == store.get_bytes(f"runs/{run}/snr_scan/snr_results.json")


# --- 9. the commit and its cache index agree ----------------------------------------------------


def test_a_failed_index_write_commits_nothing_and_the_next_run_recomputes(tmp_path, tiny_model):
    store = open_store((tmp_path / "store").as_uri())
    real = store.put_bytes

    def disk_full_at_the_index(key, data):
        if key.startswith("cache/"):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return real(key, data)

    store.put_bytes = disk_full_at_the_index
    with pytest.raises(OSError):
        store_scan(store, tiny_model, tmp_path / "work")
    (failed_run,) = list_runs(store)
    assert load_manifest(store, failed_run, SNR_SCAN).status == FAILED  # the store does not claim success
    store.put_bytes = real
    again, _ = store_scan(store, tiny_model, tmp_path / "work")
    assert not again.cached and again.manifest.status == SUCCEEDED
    assert store_scan(store, tiny_model, tmp_path / "work")[0].cached  # and from now on it is reused


def test_a_failed_manifest_write_leaves_an_index_entry_that_is_ignored(tmp_path, tiny_model):
    store = open_store((tmp_path / "store").as_uri())
    real = store.put_bytes

    def fail_manifests(key, data):
        if key.endswith("/manifest.json"):
            raise OSError(errno.EIO, "Input/output error", key)
        return real(key, data)

    store.put_bytes = fail_manifests
    with pytest.raises(OSError):
        store_scan(store, tiny_model, tmp_path / "work")
    store.put_bytes = real
    assert list_runs(store) == {}
    assert not store_scan(store, tiny_model, tmp_path / "work")[0].cached


# --- 11. a failed publish keeps the resumable work ---------------------------------------------------


def test_a_failed_publish_keeps_the_scan_journal_and_the_next_run_resumes(tmp_path, tiny_model, monkeypatch):
    store = open_store((tmp_path / "store").as_uri())
    work = tmp_path / "work"
    real = StageRun.write_table

    def store_down(self, table_name, table):
        raise StoreError("the store went away while publishing")

    monkeypatch.setattr(StageRun, "write_table", store_down)
    with pytest.raises(StoreError):
        store_scan(store, tiny_model, work)
    (journal,) = work.glob("*/snr.parquet.partial.jsonl")
    rows = journal.read_text().count("\n") - 1
    assert rows > 0
    monkeypatch.setattr(StageRun, "write_table", real)
    no_decomposition(monkeypatch)
    result, _ = store_scan(store, tiny_model, work)
    assert not result.cached and result.detail.resumed == rows
    assert not journal.exists()
