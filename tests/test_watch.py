"""Data drops: one pipeline run per drop under two racing watchers (real processes, real S3); a dead claim is taken over."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from flows.pipeline_config import load_pipeline_config
from flows.watch import CLAIMS, claims_folder, ready_drops, try_claim, watch_once
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
from stages.store import list_runs, open_store

from .helpers import TINY, child_env, venv_bin
from .s3_server import fresh_bucket

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    logs = domain_corpus(120, seed=6)
    return write_tokenizer(
        write_synthetic_model(tmp_path_factory.mktemp("watch") / "model", SyntheticSpec(**TINY)), logs, TINY["vocab_size"]
    )


def write_config(folder: Path, model: Path, store: str) -> Path:
    document = {
        "model": str(model),
        "data": "replaced by each drop",
        "store": store,
        "stages": {
            "cpt": {"max_steps": 2, "seq_len": 64, "save_steps": 0},
            "evaluate": {"seq_len": 64, "max_tokens": 256, "snr_drift": False},
        },
        "report": False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(document))
    return folder / "pipeline.yaml"


def land_drop(store, name: str, ready: bool = True) -> None:
    store.put_bytes(f"incoming/{name}/logs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in domain_corpus(100, seed=7)).encode())
    if ready:
        store.put_bytes(f"incoming/{name}/_SUCCESS", b"")


def test_two_racing_watchers_process_a_drop_exactly_once(s3_env, model, tmp_path):
    store_uri = f"s3://{fresh_bucket()}/spectrum"
    store = open_store(store_uri)
    land_drop(store, "2026-12-01")
    land_drop(store, "half-uploaded", ready=False)
    config = write_config(tmp_path, model, store_uri)
    watchers = []
    for name in ("watcher-a", "watcher-b"):
        env = child_env(PREFECT_HOME=str(tmp_path / f"prefect-{name}"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        command = [venv_bin("spectrum"), "watch", str(config), "--prefix", "incoming", "--once", "--watcher", name]
        watchers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [w.communicate(timeout=600) for w in watchers]
    assert [w.returncode for w in watchers] == [0, 0], [err[-2000:] for _, err in outputs]

    claims = sorted(k.rsplit("/", 1)[1] for k in store.list(f"{CLAIMS}/incoming/2026-12-01/") if ".beat-" not in k)
    assert claims == ["0.json", "0.released.json", "done.json"]  # one claim, released, one completion
    assert json.loads(store.get_bytes(f"{CLAIMS}/incoming/2026-12-01/0.released.json"))["outcome"] == "succeeded"
    done = json.loads(store.get_bytes(f"{CLAIMS}/incoming/2026-12-01/done.json"))
    started = [line for out, _ in outputs for line in out.splitlines() if "pipeline run" in line]
    assert started == [f"drop 2026-12-01: pipeline run {done['run_id']}"]
    assert any("skipped" in out for out, _ in outputs)
    assert {"download", "cpt", "evaluate"} <= set(list_runs(store)[done["run_id"]])
    assert not store.list(f"{CLAIMS}/incoming/half-uploaded/")  # not ready: never claimed


def test_a_claim_whose_watcher_died_is_taken_over_and_a_live_one_is_not(model, tmp_path):
    store = open_store(str(tmp_path / "store"))
    land_drop(store, "d1")
    land_drop(store, "d2")
    dead = {"watcher": "dead", "run_id": "never-finished", "claimed_at": time.time() - 600, "generation": 0}
    store.put_bytes(f"{CLAIMS}/incoming/d1/0.json", json.dumps(dead).encode())
    alive = {"watcher": "alive", "run_id": "running", "claimed_at": time.time(), "generation": 0}
    store.put_bytes(f"{CLAIMS}/incoming/d2/0.json", json.dumps(alive).encode())
    assert ready_drops(store, "incoming") == ["d1", "d2"]

    config = load_pipeline_config(write_config(tmp_path, model, str(tmp_path / "store")))
    report = watch_once(config, "incoming", claim_timeout=60, watcher="taker", work_dir=tmp_path / "work")
    assert [drop for drop, _ in report.started] == ["d1"] and "claimed (generation 0)" in report.skipped["d2"]
    done = json.loads(store.get_bytes(f"{CLAIMS}/incoming/d1/done.json"))
    assert done["generation"] == 1 and done["watcher"] == "taker"
    assert try_claim(store, "incoming", "d1", "late", 60) == (None, "done")

    again = watch_once(config, "incoming", claim_timeout=60, watcher="taker", work_dir=tmp_path / "work")
    assert again.started == [] and again.skipped["d1"] == "done" and again.skipped["d2"].startswith("claimed (generation 0)")


def test_racing_watchers_on_a_model_line_train_its_drops_in_order_one_generation_each(s3_env, model, tmp_path):
    """Two watchers, two drops of one line: generations 1 and 2, one record per drop, the second from the first's model;
    a drop older than one the line trained is then not trained, and `spectrum line status` lists it."""
    from stages.store import StageRef, lines, load_manifest

    store_uri = f"s3://{fresh_bucket()}/spectrum"
    store = open_store(store_uri)
    land_drop(store, "2026-12-01")
    land_drop(store, "2026-12-02")
    config = write_config(tmp_path, model, store_uri)
    document = yaml.safe_load(config.read_text())
    document.update(line={"name": "acme", "continue_from": "promoted"}, gate={"heldout_perplexity": {"max_relative_change": 10.0}})
    config.write_text(yaml.safe_dump(document))
    watchers = []
    for name in ("watcher-a", "watcher-b"):
        env = child_env(PREFECT_HOME=str(tmp_path / f"prefect-{name}"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        command = [venv_bin("spectrum"), "watch", str(config), "--prefix", "incoming", "--once", "--watcher", name]
        watchers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [w.communicate(timeout=900) for w in watchers]
    assert [w.returncode for w in watchers] == [0, 0], [err[-2000:] for _, err in outputs]

    records = lines.generations(store, "acme")
    assert [(r.generation, r.drop, r.decision) for r in records] == [(1, "2026-12-01", "promoted"), (2, "2026-12-02", "promoted")]
    first_model = StageRef(records[0].run_id, "cpt").output_uri("model")
    assert records[1].starting_model["uri"] == first_model == load_manifest(store, records[1].run_id, "download").parameters["model"]
    assert lines.production(store, "acme").generation == 2

    land_drop(store, "2026-11-30")  # late: older than a drop the line trained
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect-late"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    late = subprocess.run(
        [venv_bin("spectrum"), "watch", str(config), "--prefix", "incoming", "--once"], env=env, capture_output=True, text=True, timeout=600
    )
    assert late.returncode == 0, late.stderr[-2000:]
    assert "drop 2026-11-30: skipped (older than drop 2026-12-02" in late.stdout, late.stdout
    status = subprocess.run(
        [venv_bin("spectrum"), "line", "status", "acme", "--store", store_uri], env=env, capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0 and "2026-11-30" in status.stdout and "production: generation 2" in status.stdout, status.stdout
    assert len(lines.generations(store, "acme")) == 2


def test_a_line_generation_whose_watcher_died_is_taken_over_and_decided_once(model, tmp_path):
    """d1's watcher died after recording its decision (before done.json): d1 is not trained or decided again. d2's died
    before deciding: the taker trains d2 and the line records it once, as the next generation."""
    from stages.store import lines

    store = open_store(str(tmp_path / "store"))
    land_drop(store, "d1")
    land_drop(store, "d2")
    for drop in ("d1", "d2"):
        dead = {"watcher": "dead", "run_id": f"dead-{drop}", "claimed_at": time.time() - 600, "generation": 0}
        store.put_bytes(f"{claims_folder('incoming', 'acme')}/{drop}/0.json", json.dumps(dead).encode())
    model_ref = {"uri": str(model), "sha256": "0" * 64}
    lines.record_decision(
        store, "acme", drop="d1", run_id="dead-d1", starting_model=model_ref, model=str(model), decision="rejected", reasons=[]
    )
    config_path = write_config(tmp_path, model, str(tmp_path / "store"))
    document = yaml.safe_load(config_path.read_text())
    document.update(line={"name": "acme"}, gate={"heldout_perplexity": {"max_relative_change": 10.0}})
    config_path.write_text(yaml.safe_dump(document))
    config = load_pipeline_config(config_path)

    report = watch_once(config, "incoming", claim_timeout=60, watcher="taker", work_dir=tmp_path / "work")
    assert [drop for drop, _ in report.started] == ["d2"] and "trained already" in report.skipped["d1"], report
    records = lines.generations(store, "acme")
    assert [(r.generation, r.drop, r.run_id) for r in records] == [(1, "d1", "dead-d1"), (2, "d2", report.started[0][1])]
    again = watch_once(config, "incoming", claim_timeout=60, watcher="taker", work_dir=tmp_path / "work")
    assert again.started == [] and len(lines.generations(store, "acme")) == 2
