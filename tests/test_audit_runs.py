"""`spectrum runs` and `spectrum audit` of re-runs, evaluate-only runs and killed runs (issue 14: items 18, 19).

The store is written by hand (manifests, reuse records, leases, trained_tensors partitions), as the
stages write them, so each case is exact and fast.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import types

import pyarrow as pa
import pytest

import stages.store.lease as lease_module
from spectrum_cli.audit import format_audit, format_runs
from spectrum_cli.main import main
from stages.store import commit_manifest, open_store, record_reuse, start_manifest, write_table
from stages.store.lease import acquire_lease, holder_identity
from stages.store.lineage import audit_run, list_run_summaries
from stages.store.manifest import lease_folder

SHA = "0" * 64
CPT_CHANGED = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
SFT_CHANGED = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
TENSORS = [*CPT_CHANGED, "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]


def commit(store, run: str, stage: str, inputs: list[dict], outputs: list) -> object:
    return commit_manifest(store, start_manifest(stage, "1.0", run, {"stage": stage}, inputs).finish(outputs))


def stage_with_output(store, run: str, stage: str, inputs: list[dict], changed: list[str] | None = None):
    """A committed stage with one output file (its `model/…` for a training) and, for a training, its trained_tensors table."""
    outputs = [store.put_bytes(f"runs/{run}/{stage}/model/model.safetensors", f"{run}/{stage}".encode())]
    if changed is not None:
        table = pa.table({"tensor_name": TENSORS, "changed": [name in changed for name in TENSORS]})
        outputs.append(write_table(store, "trained_tensors", table, stage=stage, run_id=run))
    commit(store, run, stage, inputs, outputs)
    return outputs[0]


def ref(info) -> dict:
    return {"uri": info.uri, "sha256": info.sha256, "size": info.size}


@pytest.fixture
def trained(tmp_path):
    """A store with run `orig`: snr_scan -> cpt -> sft -> evaluate."""
    store = open_store(str(tmp_path / "store"))
    model = {"uri": "file:///models/base/model.safetensors", "sha256": SHA}
    scanned = stage_with_output(store, "orig", "snr_scan", [model])
    cpt = stage_with_output(store, "orig", "cpt", [model, ref(scanned)], CPT_CHANGED)
    sft = stage_with_output(store, "orig", "sft", [ref(cpt)], SFT_CHANGED)
    stage_with_output(store, "orig", "evaluate", [ref(sft), model])
    return store, cpt, sft


def test_an_only_evaluate_rerun_is_audited_with_its_reused_training_per_stage(trained):
    store, _, sft = trained
    for stage in ("snr_scan", "cpt", "sft"):  # what `pipeline run --only evaluate --run orig` records
        record_reuse(store, _manifest(store, "orig", stage), "rerun", stage)
    record_reuse(store, _manifest(store, "orig", "snr_scan"), "rerun", "snr_scan.evaluate_base")  # a cached step
    stage_with_output(store, "rerun", "evaluate", [ref(sft)])

    report = audit_run(store, "rerun")
    assert [s["stage"] for s in report["stages"]] == ["snr_scan", "snr_scan.evaluate_base", "cpt", "sft", "evaluate"]
    assert report["stages"][1]["reused_from"] == {"run_id": "orig", "stage": "snr_scan"}
    training = report["training"]
    assert [(t["stage"], t["via"], len(t["changed"])) for t in training["stages"]] == [("cpt", "reused", 2), ("sft", "reused", 2)]
    assert sorted(r["tensor_name"] for r in training["changed"]) == sorted(set(CPT_CHANGED + SFT_CHANGED))  # 3, not 2 + 2
    assert training["unchanged"] == 1

    text = format_audit(report)
    assert "no training" not in text and "none in this run" not in text
    assert len(re.findall(r"^\[snr_scan\]", text, re.MULTILINE)) == 1
    assert re.search(r"^\[snr_scan\.evaluate_base\] reused from orig/snr_scan at \S+ \(succeeded there: code 1\.0", text, re.MULTILINE)
    assert "training: 3 distinct tensors changed in all\n  cpt (reused from run orig/cpt): 2 of 4 tensors changed\n" in text
    assert "  sft (reused from run orig/sft): 2 of 4 tensors changed" in text


def test_an_evaluate_run_is_audited_with_the_training_it_measured(trained):
    store, cpt, _ = trained
    stage_with_output(store, "ev", "evaluate", [ref(cpt)])  # `spectrum evaluate --cpt-run orig`
    report = audit_run(store, "ev")
    assert [(t["stage"], t["run_id"], t["via"]) for t in report["training"]["stages"]] == [("cpt", "orig", "input")]
    assert "  cpt of run orig (not in this run: its inputs came from it): 2 of 4 tensors changed" in format_audit(report)


def test_a_rerun_starts_when_it_ran_not_when_the_run_it_reused_did(trained):
    store, _, sft = trained
    time.sleep(0.01)  # a later millisecond than orig's stages (ordering, not timing, is asserted)
    record_reuse(store, _manifest(store, "orig", "cpt"), "rerun", "cpt")
    stage_with_output(store, "rerun", "evaluate", [ref(sft)])
    summaries = {s["run_id"]: s for s in list_run_summaries(store)}
    assert summaries["rerun"]["started_at"] > summaries["orig"]["finished_at"]
    assert summaries["rerun"]["stages"] == {"cpt": "succeeded", "evaluate": "succeeded"}


def test_runs_reads_pipeline_and_stage_leases(trained, monkeypatch):
    store, _, _ = trained
    holder = holder_identity(run_id="x")
    acquire_lease(store, lease_folder("orig", "pipeline"), holder, timeout=60)  # all stages committed, the pipeline never released
    acquire_lease(store, lease_folder("live", "pipeline"), holder, timeout=7200)
    acquire_lease(store, lease_folder("live", "cpt"), holder, timeout=7200)  # a first stage still running: no manifest yet
    acquire_lease(store, lease_folder("dead", "cpt"), holder, timeout=60)  # killed before its commit
    stage_with_output(store, "failed", "snr_scan", [{"uri": "file:///m", "sha256": SHA}])
    acquire_lease(store, lease_folder("failed", "pipeline"), holder, timeout=60).release("failed", "cpt diverged")
    stage_with_output(store, "done", "snr_scan", [{"uri": "file:///m", "sha256": SHA}])
    acquire_lease(store, lease_folder("done", "pipeline"), holder, timeout=60).release("succeeded")

    real = time.time
    monkeypatch.setattr(lease_module, "time", types.SimpleNamespace(time=lambda: real() + 3600))  # an hour on: 60 s leases expired
    summaries = {s["run_id"]: s for s in list_run_summaries(store)}
    assert {run: s["status"] for run, s in summaries.items()} == {
        "orig": "crashed",  # was listed as succeeded: every committed stage succeeded, but the pipeline was killed
        "live": "running",
        "dead": "crashed",
        "failed": "failed",
        "done": "succeeded",
    }
    assert summaries["live"]["stages"] == {"cpt": "running"} and summaries["dead"]["stages"] == {"cpt": "crashed"}
    assert summaries["orig"]["pipeline"] == "crashed" and summaries["done"]["pipeline"] == "succeeded"
    assert summaries["live"]["started_at"] and summaries["live"]["finished_at"] is None
    assert re.search(r"^orig\s+crashed\s", format_runs(list(summaries.values())), re.MULTILINE)


def test_a_damaged_lease_does_not_break_the_listing(trained, caplog):
    store, _, _ = trained
    store.put_bytes("runs/orig/pipeline/lease/0.json", b"not json")
    assert {s["run_id"]: s["status"] for s in list_run_summaries(store)} == {"orig": "succeeded"}
    assert "is not a lease claim" in caplog.text


def _manifest(store, run: str, stage: str):
    from stages.store import load_manifest

    return load_manifest(store, run, stage)


# --- spectrum runs --cost (issue 17) ------------------------------------------------------------------------------------

HOUR = 3600.0


def computed(store, run: str, stage: str, device: str, count: int, seconds: float | None) -> None:
    """A committed stage whose manifest records `count` `device`s for `seconds` (None: a manifest from before compute was recorded)."""
    manifest = start_manifest(stage, "1.0", run, {"stage": stage, "run": run}, []).finish([])
    compute = None
    if seconds is not None:
        compute = {"device": device, "device_name": None, "device_count": count, "seconds": seconds, "device_seconds": count * seconds}
    commit_manifest(store, dataclasses.replace(manifest, compute=compute))


@pytest.fixture
def costed(tmp_path):
    """orig: a CPU scan (0.5 CPU-h) and a 4-GPU cpt (1 GPU-h); rerun: reuses both, evaluates on one GPU (0.25 GPU-h); old: no record."""
    store = open_store(str(tmp_path / "store"))
    computed(store, "orig", "snr_scan", "cpu", 1, HOUR / 2)
    computed(store, "orig", "cpt", "cuda", 4, HOUR / 4)
    for stage in ("snr_scan", "cpt"):
        record_reuse(store, _manifest(store, "orig", stage), "rerun", stage)
    computed(store, "rerun", "evaluate", "cuda", 1, HOUR / 4)
    computed(store, "old", "snr_scan", "cpu", 1, None)
    return store


def test_runs_cost_sums_each_run_and_counts_a_reuse_once(costed, capsys):
    code = main(["runs", "--store", costed.root_uri, "--cost", "--json"])
    costs = json.loads(capsys.readouterr().out)
    assert code == 0
    by_run = {r["run_id"]: r["usage"] for r in costs["runs"]}
    assert by_run["orig"] == {
        "device_hours": {"cpu": 0.5, "cuda": 1.0},
        "gpu_hours": 1.0,
        "stages_without_compute": 0,
        "cost": None,
        "unpriced": [],
    }
    assert by_run["rerun"] == {"device_hours": {"cuda": 0.25}, "gpu_hours": 0.25, "stages_without_compute": 0, "cost": None, "unpriced": []}
    assert by_run["old"] == {"device_hours": {}, "gpu_hours": 0.0, "stages_without_compute": 1, "cost": None, "unpriced": []}
    assert costs["total"] == {
        "device_hours": {"cpu": 0.5, "cuda": 1.25},
        "gpu_hours": 1.25,
        "stages_without_compute": 1,
        "cost": None,
        "unpriced": [],
    }
    assert costs["prices"] is None


def test_runs_cost_prices_per_kind_in_the_table(costed, capsys):
    code = main(["runs", "--store", costed.root_uri, "--cost", "--price-per-device-hour", "cuda=4", "--price-per-device-hour", "cpu=0.1"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^orig\s+succeeded\s+1\.0000\s+0\.5000\s+4\.05 snr_scan, cpt$", out, re.MULTILINE), out
    assert re.search(r"^rerun\s+succeeded\s+0\.2500\s+0\.0000\s+1\.00 snr_scan, cpt, evaluate$", out, re.MULTILINE), out
    assert re.search(r"^old\s+succeeded\s+0\.0000\s+0\.0000\s+0\.00 snr_scan\*$", out, re.MULTILINE), out
    assert re.search(r"^total \(3 runs\)\s+1\.2500\s+0\.5000\s+5\.05 \*$", out, re.MULTILINE), out  # * : a lower bound
    assert "* stages without a compute record" in out


def test_runs_cost_counts_an_unpriced_kind_at_zero_and_says_so(costed, capsys):
    assert main(["runs", "--store", costed.root_uri, "--price-per-device-hour", "cuda=4", "--json"]) == 0  # a price asks for the cost
    costs = json.loads(capsys.readouterr().out)
    assert {r["run_id"]: r["usage"]["cost"] for r in costs["runs"]} == {"old": 0.0, "orig": 4.0, "rerun": 1.0}  # orig's CPU time is free
    assert costs["total"]["cost"] == 5.0 and costs["total"]["unpriced"] == ["cpu"]
    assert costs["prices"] == {"by_device": {"cuda": 4.0}, "default": None}
    assert main(["runs", "--store", costed.root_uri, "--price-per-device-hour", "cuda=4"]) == 0
    assert "cost: cpu time has no price and is counted at 0" in capsys.readouterr().out


def test_runs_without_cost_is_unchanged(costed, capsys):
    assert main(["runs", "--store", costed.root_uri, "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert all("compute" not in s and "usage" not in s for s in summaries)
    assert summaries == json.loads(json.dumps(list_run_summaries(costed)))


def test_a_bad_price_is_one_error_line_before_the_store_is_read(tmp_path, capsys):
    missing = str(tmp_path / "no-store")
    assert main(["runs", "--store", missing, "--cost", "--price-per-device-hour", "gpu=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --price-per-device-hour gpu=4: unknown device kind 'gpu'") and len(err.strip().splitlines()) == 1
