"""The watcher under failures, without Prefect or training: a bad drop, a store that stops taking heartbeats, no Prefect API."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from flows import watch
from flows.pipeline import PipelineResult
from flows.pipeline_config import load_pipeline_config
from flows.prefect_api import PrefectUnavailableError
from flows.watch import CLAIMS, MAX_ATTEMPTS, watch_once
from stages.store import FileStore, StoreUnavailableError
from stages.store.claims import DONE, FAILED
from stages.store.lease import lease_state


class FlakyStore(FileStore):
    """A file store whose heartbeats fail while `failing` is set (an S3 outage as the lease sees it)."""

    failing = False

    def put_bytes(self, key, data, *args, **kwargs):
        if self.failing and ".beat-" in key:
            raise StoreUnavailableError(f"the store at {self.root_uri} did not answer (simulated outage)")
        return super().put_bytes(key, data, *args, **kwargs)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """(config, store, runs): a config on a local store, Prefect's start stubbed, and the pipeline replaced by a recorder."""
    store = FlakyStore(tmp_path / "store", writable=True)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"model": "m", "data": "d", "store": "store", "report": False}))
    config = load_pipeline_config(tmp_path / "pipeline.yaml")
    runs: list[str] = []

    def pipeline(config, run, work_dir, drop=None):
        runs.append(run)
        return PipelineResult(run_id=run, store=store.root_uri)

    monkeypatch.setattr(watch, "start_prefect", lambda: "http://stub")
    monkeypatch.setattr(watch, "open_pipeline_store", lambda config: store)
    monkeypatch.setattr(watch, "run_pipeline", pipeline)
    return config, store, runs


def land(store, drop: str, files: bool = True) -> None:
    if files:
        store.put_bytes(f"incoming/{drop}/logs.jsonl", b'{"text": "a log line"}\n')
    store.put_bytes(f"incoming/{drop}/_SUCCESS", b"")


def test_a_bad_drop_is_released_as_failed_and_the_watcher_goes_on_to_the_next(setup, tmp_path):
    config, store, runs = setup
    land(store, "a-empty", files=False)  # no readable data: only the marker
    land(store, "b-good")
    report = watch_once(config, "incoming", claim_timeout=600, watcher="w", work_dir=tmp_path / "work")
    assert [drop for drop, _ in report.started] == ["b-good"] and len(runs) == 1
    assert "holds no files besides _SUCCESS" in report.failed["a-empty"] and f"attempt 1 of {MAX_ATTEMPTS}" in report.failed["a-empty"]
    state = lease_state(store, f"{CLAIMS}/incoming/a-empty")
    assert state.released["outcome"] == "failed" and "holds no files" in state.released["reason"]  # released at once, not left to expire

    for attempt in range(2, MAX_ATTEMPTS + 1):  # --once passes (cron): bounded retries, then recorded as failed
        report = watch_once(config, "incoming", claim_timeout=600, watcher=f"w{attempt}", work_dir=tmp_path / "work")
        assert report.skipped["b-good"] == "done" and "a-empty" in report.failed
    assert "recorded as failed" in report.failed["a-empty"]
    failed = json.loads(store.get_bytes(f"{CLAIMS}/incoming/a-empty/{FAILED}"))
    assert failed["attempts"] == MAX_ATTEMPTS and "holds no files" in failed["reason"]
    last = watch_once(config, "incoming", claim_timeout=600, watcher="w9", work_dir=tmp_path / "work")
    assert last.failed == {} and last.skipped["a-empty"].startswith(f"failed after {MAX_ATTEMPTS} attempts: the drop")
    assert len(runs) == 1


def test_a_holder_that_cannot_renew_its_claim_stops_its_run_and_a_taker_runs_the_drop_once(setup, tmp_path, monkeypatch):
    """An S3 outage for the heartbeats: the holder's run is stopped before its claim could expire; one run finishes in all."""
    config, store, runs = setup
    land(store, "d1")
    finished: list[str] = []

    def long_pipeline(config, run, work_dir, drop=None):
        store.failing = True  # the outage starts while the pipeline runs
        deadline = time.monotonic() + 120  # a hang guard: the holder must be stopped long before
        while time.monotonic() < deadline:
            time.sleep(0.05)
        finished.append(run)
        return PipelineResult(run_id=run, store=store.root_uri)

    monkeypatch.setattr(watch, "run_pipeline", long_pipeline)
    report = watch_once(config, "incoming", claim_timeout=2.0, watcher="holder", work_dir=tmp_path / "work")
    assert finished == [] and report.started == []
    assert "stopped, its claim could not be renewed" in report.failed["d1"]
    state = lease_state(store, f"{CLAIMS}/incoming/d1")
    assert state.generation == 0 and state.released["outcome"] == "lost"

    store.failing = False
    monkeypatch.setattr(
        watch, "run_pipeline", lambda config, run, work_dir, drop=None: finished.append(run) or PipelineResult(run, store.root_uri)
    )
    taken = watch_once(config, "incoming", claim_timeout=2.0, watcher="taker", work_dir=tmp_path / "work")
    assert [drop for drop, _ in taken.started] == ["d1"] and len(finished) == 1
    assert json.loads(store.get_bytes(f"{CLAIMS}/incoming/d1/{DONE}"))["generation"] == 1


def test_nothing_is_claimed_when_prefect_cannot_start(setup, tmp_path, monkeypatch):
    config, store, runs = setup
    land(store, "d1")

    def unavailable():
        raise PrefectUnavailableError("the temporary Prefect server did not start within 300 s")

    monkeypatch.setattr(watch, "start_prefect", unavailable)
    with pytest.raises(PrefectUnavailableError):
        watch_once(config, "incoming", claim_timeout=600, watcher="w", work_dir=tmp_path / "work")
    assert store.list(f"{CLAIMS}/") == [] and runs == []


def test_a_dead_holder_counts_as_an_attempt(setup, tmp_path):
    """Holders killed on a drop (an OOM kill each time) do not make it retried forever."""
    config, store, runs = setup
    land(store, "d1")
    for generation in range(MAX_ATTEMPTS):
        claim = {"holder": {"watcher": "killed"}, "acquired_at": time.time() - 7200, "timeout": 60}
        store.put_bytes(f"{CLAIMS}/incoming/d1/{generation}.json", json.dumps(claim).encode())
    report = watch_once(config, "incoming", claim_timeout=60, watcher="w", work_dir=tmp_path / "work")
    assert report.skipped["d1"].startswith(f"failed after {MAX_ATTEMPTS} attempts: its watcher stopped") and runs == []


def test_watch_once_exits_non_zero_when_a_drop_failed_and_names_it(setup, tmp_path, capsys):
    from spectrum_cli.main import main

    _, store, runs = setup
    land(store, "a-empty", files=False)
    land(store, "b-good")
    code = main(["watch", str(tmp_path / "pipeline.yaml"), "--prefix", "incoming", "--once"])
    out, err = capsys.readouterr()
    assert code == 2 and len(runs) == 1
    assert "drop b-good: pipeline run" in out and "drop a-empty:" in out
    assert err.startswith("error: 1 drop(s) failed in this pass (a-empty)")
