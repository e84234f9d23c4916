"""What a stage's execution records: a step reusing its own run's stage, a crashed attempt's partition, a lost lease."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from stages.base.contracts import SUCCEEDED
from stages.core.execution import execute_stage
from stages.core.stage import StageContext
from stages.store import StageRef, list_runs, open_store, read_table, table_files
from stages.store.lease import LeaseTakenError
from stages.store.manifest import lease_folder, load_manifest_or_none
from stages.store.tables import write_table


def _produce(run):
    return [run.write_table("snr", pa.table({"x": [1]}))]


def test_a_step_reusing_its_own_run_s_stage_is_recorded_under_the_run(tmp_path):
    """`snr_scan.sft` of run R with the cache key of R's own `snr_scan`: the run still lists the step, and it can be named."""
    store = open_store(str(tmp_path / "store"))
    execute_stage("snr_scan", StageContext(store=store, run_id="R"), {"p": 1}, [], _produce)
    outcome = execute_stage("snr_scan", StageContext(store=store, run_id="R", step="sft"), {"p": 1}, [], _produce)
    assert outcome.cached and list_runs(store) == {"R": ["snr_scan", "snr_scan.sft"]}
    assert StageRef.parse("R/snr_scan.sft", "snr_scan", "--snr-run").manifest(store).status == SUCCEEDED


def test_a_crashed_attempt_s_partition_is_not_read_as_committed(tmp_path):
    """Run R wrote its partition and was killed; taken over, it reused R0's work: R's partition is no committed data."""
    store = open_store(str(tmp_path / "store"))
    execute_stage("snr_scan", StageContext(store=store, run_id="R0"), {"p": 1}, [], _produce)
    write_table(store, "snr", pa.table({"x": [99]}), stage="snr_scan", run_id="R")  # the crashed attempt's partition
    assert execute_stage("snr_scan", StageContext(store=store, run_id="R"), {"p": 1}, [], _produce).cached
    assert table_files(store, "snr").keys == ["tables/snr/stage=snr_scan/run_id=R0/part-0.parquet"]
    assert read_table(store, "snr").to_pylist() == [{"x": 1, "stage": "snr_scan", "run_id": "R0"}]


def test_a_holder_that_lost_its_lease_writes_no_failed_manifest_over_the_taker_s_run(tmp_path, monkeypatch):
    """Paused past its timeout, the holder finds a later generation: it stops, and leaves the run's stage to the taker."""
    monkeypatch.setenv("SPECTRUM_LEASE_SECONDS", "1")
    store = open_store(str(tmp_path / "store"))

    def produce(run):
        folder = lease_folder("R", "snr_scan")
        store.put_bytes(f"{folder}/1.json", b'{"holder": {"pid": 2}, "acquired_at": 0, "timeout": 60}')  # the taker's claim
        deadline = time.monotonic() + 60  # a hang guard: the heartbeat stops the work within a second
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return []

    with pytest.raises(LeaseTakenError, match="taken over"):
        execute_stage("snr_scan", StageContext(store=store, run_id="R"), {"p": 1}, [], produce)
    assert load_manifest_or_none(store, "R", "snr_scan") is None
