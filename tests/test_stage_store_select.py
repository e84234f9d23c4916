"""layer_select from a run in the artifact store: outputs and lineage, the cache, and its errors."""

from __future__ import annotations

import json

import pytest

from spectrum_cli.main import main
from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig
from stages.layer_select import run as select_run
from stages.store import (
    ArtifactNotFoundError,
    list_runs,
    load_manifest,
)

from .helpers import (
    MODEL_ID,
    SNR_KEY,
    sha,
    snapshot,
    store_config,
    store_scan,
    table_of,
)

SELECTION_KEY = "tables/selection/stage=layer_select/run_id={run}/part-0.parquet"


# --- layer_select from the store ---------------------------------------------------------------


@pytest.fixture
def scanned(store, tiny_model, tmp_path):
    """(store, snr run id) with a committed scan of tiny_model."""
    outcome, _ = store_scan(store, tiny_model, tmp_path / "work")
    return store, outcome.manifest.run_id


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
