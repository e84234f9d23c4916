"""The audit trail: `spectrum runs` and `spectrum audit RUN` over the manifests and tables of a store."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from spectrum_cli.audit import format_audit
from spectrum_cli.main import main
from stages.base.errors import CorruptWeightsError, InputError
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig
from stages.layer_select import run as select_run
from stages.snr_scan import ScanConfig
from stages.snr_scan import run as scan_run
from stages.store import (
    commit_manifest,
    list_runs,
    load_manifest,
    start_manifest,
    write_table,
)
from stages.store.lineage import audit_run, list_run_summaries

from .helpers import venv_bin

MODEL_ID = "tiny-llama"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan(store, model: Path, work: Path, **overrides):
    config = ScanConfig(**{"model_dir": str(model), "output": None, "model_id": MODEL_ID, "workers": 1, **overrides})
    return scan_run(config, StageContext(store, work_dir=work, progress=False)).run_id


def select(store, snr_run: str, run_id: str | None = None, **overrides):
    return select_run(
        SelectConfig(**{"snr_input": None, "out_dir": None, "snr_run": snr_run, **overrides}), StageContext(store, run_id=run_id)
    )


@pytest.fixture
def pipeline(store, tiny_model, tmp_path):
    """(store, snr run, select run) after a scan and a per-type 50% selection of tiny_model."""
    snr_run = scan(store, tiny_model, tmp_path / "work")
    result = select(store, snr_run)
    return store, snr_run, result


def test_audit_of_a_select_run_lists_the_selection_and_its_lineage(pipeline, tiny_model):
    store, snr_run, result = pipeline
    run = result.manifest.run_id
    report = audit_run(store, run)
    assert report["run_id"] == run and report["store"] == store.root_uri
    assert [s["stage"] for s in report["stages"]] == ["layer_select"]
    (stage,) = report["stages"]
    assert stage["status"] == "succeeded"
    assert stage["parameters"] == result.manifest.parameters
    assert stage["cache_key"] == result.manifest.cache_key
    assert {o["key"] for o in stage["outputs"]} == {
        f"tables/selection/stage=layer_select/run_id={run}/part-0.parquet",
        f"runs/{run}/layer_select/unfrozen_parameters.yaml",
        f"runs/{run}/layer_select/selection.json",
    }

    summary = json.loads(store.get_bytes(f"runs/{run}/layer_select/selection.json"))
    selection = report["selection"]
    assert [t["tensor_name"] for t in selection["trainable"]] == summary["trainable_tensors"]
    by_name = {e.tensor_name: e for e in result.detail.entries}
    for t in selection["trainable"]:
        entry = by_name[t["tensor_name"]]
        assert t["reason"] == entry.reason and t["reason"].startswith(("selected:", "always trained"))
        assert t["snr"] == entry.snr and t["parameter_count"] == entry.parameter_count
        assert t["module_type"] == entry.module_type and t["rank"] == entry.rank
    scanned_trainable = [t for t in selection["trainable"] if t["snr"] is not None]
    assert scanned_trainable and all(t["snr"] > 0 for t in scanned_trainable)
    frozen_names = {t["tensor_name"] for t in selection["frozen"]}
    assert frozen_names == set(by_name) - set(summary["trainable_tensors"])
    assert all(t["reason"].startswith(("frozen:", "not scanned:")) for t in selection["frozen"])
    assert selection["trainable_parameters"] == summary["trainable_parameters"]
    assert selection["total_parameters"] == summary["total_parameters"]
    assert 0 < selection["trainable_parameters"] < selection["total_parameters"]

    # lineage: the scan run that wrote the selection's SNR table, and the model files that scan read
    (producer,) = report["lineage"]
    assert producer["run_id"] == snr_run and producer["stage"] == "snr_scan"
    assert producer["parameters"] == load_manifest(store, snr_run, "snr_scan").parameters
    snr_uri = store.uri(f"tables/snr/stage=snr_scan/run_id={snr_run}/part-0.parquet")
    assert stage["inputs"][0]["uri"] == snr_uri
    assert snr_uri in {o["uri"] for o in load_manifest(store, snr_run, "snr_scan").outputs}
    files = {ref["uri"]: ref["sha256"] for ref in producer["inputs"]}
    expected = {name: (tiny_model / name) for name in ("model.safetensors", "config.json")}
    assert files == {p.resolve().as_uri(): sha(p.read_bytes()) for p in expected.values()}
    assert report["training"] is None


def test_audit_of_a_run_with_both_stages(pipeline):
    store, snr_run, _ = pipeline
    select(store, snr_run, run_id=snr_run, top_percent=25.0)
    report = audit_run(store, snr_run)
    assert [s["stage"] for s in report["stages"]] == ["snr_scan", "layer_select"]
    assert report["lineage"] == []  # the scan that made the SNR table is a stage of this same run
    scan_stage = report["stages"][0]
    assert scan_stage["parameters"]["model_id"] == MODEL_ID
    assert all(re.fullmatch(r"[0-9a-f]{64}", ref["sha256"]) for ref in scan_stage["inputs"] + scan_stage["outputs"])


def test_audit_of_a_scan_only_run_has_no_selection(pipeline):
    store, snr_run, _ = pipeline
    report = audit_run(store, snr_run)
    assert [s["stage"] for s in report["stages"]] == ["snr_scan"]
    assert "selection" not in report and report["training"] is None
    text = format_audit(report)
    assert f"run {snr_run}" in text and "selection:" not in text


def test_audit_of_an_unknown_run_is_an_input_error(pipeline, capsys):
    store, _, _ = pipeline
    with pytest.raises(InputError, match="20990101T000000Z-deadbeef"):
        audit_run(store, "20990101T000000Z-deadbeef")
    assert main(["audit", "20990101T000000Z-deadbeef", "--store", store.root_uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "spectrum runs" in err and len(err.strip().splitlines()) == 1


def test_audit_shows_tensors_changed_by_training(pipeline):
    """A training stage's trained_tensors table (as a later stage will write it) is reported."""
    store, _, result = pipeline
    run = result.manifest.run_id
    selection_ref = next(o for o in result.manifest.outputs if o["key"].startswith("tables/selection/"))
    manifest = start_manifest("cpt", "0.0.0", run, {"epochs": 1}, [selection_ref])
    table = pa.table(
        {
            "tensor_name": ["lm_head.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"],
            "changed": [True, True, False],
        }
    )
    info = write_table(store, "trained_tensors", table, stage="cpt", run_id=run)
    commit_manifest(store, manifest.finish([info]))
    report = audit_run(store, run)
    assert [s["stage"] for s in report["stages"]] == ["layer_select", "cpt"]
    training = report["training"]
    assert [r["tensor_name"] for r in training["changed"]] == ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    assert training["unchanged"] == 1
    assert "training: 2 distinct tensors changed in all\n  cpt: 2 of 3 tensors changed" in format_audit(report)


def test_run_summaries_show_stages_and_statuses(pipeline, write_checkpoint, tmp_path):
    import torch

    store, snr_run, result = pipeline
    select_id = result.manifest.run_id
    broken = torch.ones(8, 8)
    broken[0, 0] = float("nan")
    model = write_checkpoint(tmp_path / "broken", {"model.layers.0.mlp.up_proj.weight": broken})
    with pytest.raises(CorruptWeightsError):
        scan(store, model, tmp_path / "work", model_id="broken")
    (failed_id,) = set(list_runs(store)) - {snr_run, select_id}

    summaries = {s["run_id"]: s for s in list_run_summaries(store)}
    assert set(summaries) == {snr_run, select_id, failed_id}
    assert summaries[snr_run]["stages"] == {"snr_scan": "succeeded"} and summaries[snr_run]["status"] == "succeeded"
    assert summaries[select_id]["stages"] == {"layer_select": "succeeded"}
    assert summaries[failed_id]["stages"] == {"snr_scan": "failed"} and summaries[failed_id]["status"] == "failed"
    scan_manifest = load_manifest(store, snr_run, "snr_scan")
    assert summaries[snr_run]["started_at"] == scan_manifest.started_at
    assert summaries[snr_run]["finished_at"] == scan_manifest.finished_at
    assert summaries[snr_run]["code_version"] == [scan_manifest.code_version]
    assert [s["run_id"] for s in list_run_summaries(store)] == sorted(summaries)


def test_runs_and_audit_cli_json_and_text(pipeline, capsys):
    store, snr_run, result = pipeline
    run = result.manifest.run_id

    assert main(["runs", "--store", store.root_uri, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert runs == json.loads(json.dumps(list_run_summaries(store)))
    assert {r["run_id"]: r["stages"] for r in runs} == {snr_run: {"snr_scan": "succeeded"}, run: {"layer_select": "succeeded"}}

    assert main(["runs", "--store", store.root_uri]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:3] == ["RUN", "STATUS", "STARTED"]
    assert re.search(rf"^{re.escape(run)}\s+succeeded\s+\S+\s+layer_select$", text, re.MULTILINE)
    assert re.search(rf"^{re.escape(snr_run)}\s+succeeded\s+\S+\s+snr_scan$", text, re.MULTILINE)

    assert main(["audit", run, "--store", store.root_uri, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(json.dumps(audit_run(store, run), default=str))
    assert report["run_id"] == run and report["training"] is None

    assert main(["audit", run, "--store", store.root_uri]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"run {run} in {store.root_uri}"
    assert f"input produced by run {snr_run} (snr_scan, " in text
    model_line = next(line for line in text.splitlines() if line.strip().endswith("model.safetensors"))
    assert model_line.split()[0] == report["lineage"][0]["inputs"][0]["sha256"][:16]
    for name in result.detail.summary["trainable_tensors"]:
        assert re.search(rf"^  {re.escape(name)}\s", text, re.MULTILINE), name
    assert f"selection: {len(result.detail.summary['trainable_tensors'])} trainable tensors" in text
    assert "training: none in this run or in the runs its inputs came from" in text


def test_runs_of_an_empty_store(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["runs", "--store", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == "no runs"
    assert main(["runs", "--store", str(tmp_path / "empty"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("argv", [["runs"], ["audit", "some-run"]])
def test_reading_a_missing_local_store_is_an_error_and_creates_nothing(argv, tmp_path, capsys):
    missing = tmp_path / "typo-store"
    assert main([*argv, "--store", str(missing)]) == 2
    assert "no artifact store at" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.parametrize("argv", [["runs"], ["runs", "--json"], ["audit", "some-run"]])
def test_runs_and_audit_without_a_store_exit_2(argv, monkeypatch, capsys):
    monkeypatch.delenv("SPECTRUM_STORE", raising=False)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: no artifact store") and len(captured.err.strip().splitlines()) == 1


def test_store_from_the_environment(tiny_model, tmp_path, monkeypatch, capsys):
    from stages.store import open_store

    store = open_store(str(tmp_path / "store"))
    snr_run = scan(store, tiny_model, tmp_path / "work")
    monkeypatch.setenv("SPECTRUM_STORE", store.root_uri)
    assert main(["runs", "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [snr_run]
    assert main(["audit", snr_run, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == snr_run


# --- end to end through the installed `spectrum` command -------------------------------------------


def _spectrum(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("spectrum"), *args], check=False, capture_output=True, text=True, timeout=300, env=env)


ARROW_EXIT_ABORT = "terminate called without an active exception"


def _finished(done: subprocess.CompletedProcess) -> bool:
    """Exit 0, and not pyarrow's abort at interpreter exit (apache/arrow#34314) after the output was written."""
    return done.returncode == 0 and ARROW_EXIT_ABORT not in done.stderr


@pytest.mark.integration
def test_spectrum_scan_select_runs_audit_end_to_end(tiny_model, tmp_path):
    store_dir = tmp_path / "store"
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k != "SPECTRUM_STORE"}
    env["SPECTRUM_WORK_DIR"] = str(work)

    done = _spectrum("scan", str(tiny_model), "--store", str(store_dir), "--model-id", MODEL_ID, "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    snr_run = re.search(r"committed run (\S+)", done.stdout).group(1)
    assert (store_dir / "runs" / snr_run / "snr_scan" / "manifest.json").is_file()
    assert (store_dir / "tables" / "snr" / "stage=snr_scan" / f"run_id={snr_run}" / "part-0.parquet").is_file()
    assert not work.exists() or list(work.iterdir()) == []

    done = _spectrum("select", "--snr-run", snr_run, "--store", str(store_dir), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("selected ")
    select_run_id = re.search(r"committed run (\S+)", done.stdout).group(1)
    assert select_run_id != snr_run

    done = _spectrum("runs", "--store", str(store_dir), "--json", env=env)
    assert done.returncode == 0, done.stderr
    runs = {r["run_id"]: r for r in json.loads(done.stdout)}
    assert runs[snr_run]["stages"] == {"snr_scan": "succeeded"}
    assert runs[select_run_id]["stages"] == {"layer_select": "succeeded"}

    done = _spectrum("audit", select_run_id, "--store", str(store_dir), "--json", env=env)
    assert _finished(done), done.stderr
    report = json.loads(done.stdout)
    summary = json.loads((store_dir / "runs" / select_run_id / "layer_select" / "selection.json").read_text())
    assert [t["tensor_name"] for t in report["selection"]["trainable"]] == summary["trainable_tensors"]
    (producer,) = report["lineage"]
    assert producer["run_id"] == snr_run
    model_file = tiny_model / "model.safetensors"
    assert {r["uri"]: r["sha256"] for r in producer["inputs"]}[model_file.resolve().as_uri()] == sha(model_file.read_bytes())

    done = _spectrum("audit", select_run_id, "--store", str(store_dir), env=env)
    assert _finished(done), done.stderr
    assert f"run {select_run_id}" in done.stdout
    assert all(name in done.stdout for name in summary["trainable_tensors"])


@pytest.mark.integration
def test_spectrum_runs_without_a_store_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPECTRUM_STORE"}
    done = _spectrum("runs", env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("error: ") and "--store" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_audit_process_exits_cleanly_every_time(tiny_model, tmp_path):
    import sys

    from stages.store import open_store

    store = open_store(str(tmp_path / "store"))
    snr_run = scan(store, tiny_model, tmp_path / "work")
    run = select(store, snr_run).manifest.run_id
    code = (
        "import sys; from stages.store.lineage import audit_run; from stages.store import open_store; "
        "audit_run(open_store(sys.argv[1]), sys.argv[2])"
    )
    results = [
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "store"), run], check=False, capture_output=True, text=True, timeout=120)
        for _ in range(6)
    ]
    assert [r.returncode for r in results] == [0] * 6, next(r.stderr for r in results if r.returncode)
