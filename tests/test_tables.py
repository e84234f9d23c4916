"""Parquet tables in Hive-style partitions, read back by pyarrow, pandas and DuckDB on both backends."""

from __future__ import annotations

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from stages.base.errors import InputError, OutputExistsError
from stages.store import (
    ArtifactNotFoundError,
    commit_manifest,
    read_table,
    start_manifest,
    table_files,
    table_key,
    write_table,
)

SNR = pa.schema([("tensor_name", pa.string()), ("module_type", pa.string()), ("snr", pa.float64())])


def snr_rows(run: int) -> pa.Table:
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)]
    return pa.Table.from_pylist(
        [{"tensor_name": n, "module_type": "self_attn.q_proj", "snr": run + i / 10} for i, n in enumerate(names)],
        schema=SNR,
    )


def scan_run(store, run_id: str, table: pa.Table, status: str = "succeeded") -> None:
    manifest = start_manifest("snr_scan", "1.0", run_id, {"run": run_id}, [])
    info = write_table(store, "snr", table, stage="snr_scan", run_id=run_id)
    commit_manifest(store, manifest.finish([info], status=status))


def test_table_round_trip_over_runs(store):
    scan_run(store, "run-1", snr_rows(1))
    scan_run(store, "run-2", snr_rows(2))

    table = read_table(store, "snr").sort_by([("run_id", "ascending"), ("tensor_name", "ascending")])

    assert table.column_names == ["tensor_name", "module_type", "snr", "stage", "run_id"]
    assert table.num_rows == 6
    assert table.column("run_id").to_pylist() == ["run-1"] * 3 + ["run-2"] * 3
    assert set(table.column("stage").to_pylist()) == {"snr_scan"}
    assert read_table(store, "snr", run_id="run-2").column("snr").to_pylist() == [2.0, 2.1, 2.2]
    assert store.list("tables/") == [table_key("snr", "snr_scan", "run-1"), table_key("snr", "snr_scan", "run-2")]
    assert table_key("snr", "snr_scan", "run-1") == "tables/snr/stage=snr_scan/run_id=run-1/part-0.parquet"


def test_only_committed_succeeded_partitions_are_read(store):
    scan_run(store, "run-1", snr_rows(1))
    scan_run(store, "run-2", snr_rows(2), status="failed")
    write_table(store, "snr", snr_rows(3), stage="snr_scan", run_id="run-3")  # writer died before its manifest

    assert set(read_table(store, "snr").column("run_id").to_pylist()) == {"run-1"}
    with pytest.raises(ArtifactNotFoundError, match="no committed data for run 'run-3'"):
        read_table(store, "snr", run_id="run-3")


def test_later_runs_may_add_columns(store):
    scan_run(store, "run-1", snr_rows(1))
    scan_run(store, "run-2", snr_rows(2).append_column("estimator", pa.array(["gavish-donoho"] * 3)))

    table = read_table(store, "snr").sort_by("run_id")

    assert table.column("estimator").to_pylist() == [None] * 3 + ["gavish-donoho"] * 3


def test_missing_table_and_clashing_columns(store):
    with pytest.raises(ArtifactNotFoundError, match="no committed data"):
        read_table(store, "evaluation")
    with pytest.raises(InputError, match="partition columns"):
        write_table(store, "snr", snr_rows(1).append_column("run_id", pa.array(["x"] * 3)), stage="snr_scan", run_id="r")
    with pytest.raises(InputError, match="table name"):
        write_table(store, "../snr", snr_rows(1), stage="snr_scan", run_id="r")


def test_a_partition_is_never_overwritten(store):
    scan_run(store, "run-1", snr_rows(1))
    with pytest.raises(OutputExistsError, match="never overwritten"):
        write_table(store, "snr", snr_rows(9), stage="snr_scan", run_id="run-1")


def test_duckdb_reads_file_store_tables_with_hive_partitioning(tmp_path):
    from stages.store import open_store

    store = open_store((tmp_path / "store").as_uri())
    scan_run(store, "run-1", snr_rows(1))
    scan_run(store, "run-2", snr_rows(2))
    files = table_files(store, "snr")

    direct = duckdb.read_parquet(files.paths, hive_partitioning=True)
    rows = direct.aggregate("run_id, count(*) AS n, round(max(snr), 3) AS top", "run_id").order("run_id").fetchall()
    assert rows == [("run-1", 3, 1.2), ("run-2", 3, 2.2)]
    # The glob a user would type works on the same folder.
    glob = str(tmp_path / "store" / "tables" / "snr" / "*" / "*" / "*.parquet")
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true)").fetchall() == [(6,)]


@pytest.mark.integration
def test_pandas_and_duckdb_read_s3_tables(s3_store):
    scan_run(s3_store, "run-1", snr_rows(1))
    scan_run(s3_store, "run-2", snr_rows(2))
    files = table_files(s3_store, "snr")

    frame = pd.read_parquet(files.paths, filesystem=files.filesystem)
    assert sorted(frame["run_id"].astype(str).unique()) == ["run-1", "run-2"] and len(frame) == 6
    assert all(uri.startswith("s3://") for uri in files.uris)

    dataset = files.dataset()  # noqa: F841 -- DuckDB finds the local by its name in the SQL
    counts = duckdb.sql("SELECT run_id, count(*) FROM dataset GROUP BY run_id ORDER BY run_id").fetchall()
    assert counts == [("run-1", 3), ("run-2", 3)]
