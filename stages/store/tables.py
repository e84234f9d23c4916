"""Parquet tables in the store: one file per run and stage, under Hive-style partitions.

    tables/<table>/stage=<stage>/run_id=<run_id>/part-0.parquet

Runs append without locks (each writes its own file). Readers see only partitions whose
run committed a succeeded manifest for that stage: no manifest, no output.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..base.contracts import SUCCEEDED
from ..base.errors import InputError
from ..base.parquet import read_parquet
from .base import ArtifactStore, ObjectInfo
from .errors import ArtifactNotFoundError, StoreError
from .keys import NAME, validate_name
from .manifest import Manifest, load_manifest_or_none

PARTITION_COLUMNS = ("stage", "run_id")
PART_NAME = "part-0.parquet"


def table_key(table_name: str, stage: str, run_id: str) -> str:
    return (
        f"tables/{validate_name(table_name, 'table name')}/stage={validate_name(stage, 'stage name')}"
        f"/run_id={validate_name(run_id, 'run id')}/{PART_NAME}"
    )


def read_table_output(store: ArtifactStore, manifest: Manifest, table_name: str) -> tuple[bytes, ObjectInfo]:
    """The Parquet partition of `table_name` a committed stage wrote, read as its manifest recorded it."""
    return store.read_recorded(manifest.recorded_output(table_key(table_name, manifest.stage, manifest.run_id)))


def table_rows(store: ArtifactStore, manifest: Manifest, table_name: str, *, required: bool = True) -> list[dict[str, Any]] | None:
    """The rows of the stage's partition of `table_name`, read verified (read_table_output).

    A stage that recorded no such partition: an error when `required` (as read_table_output), else None.
    """
    if not required and not any(o.get("key") == table_key(table_name, manifest.stage, manifest.run_id) for o in manifest.outputs):
        return None
    data, _ = read_table_output(store, manifest, table_name)
    return read_parquet(data).to_pylist()


def write_table(store: ArtifactStore, table_name: str, table: pa.Table, *, stage: str, run_id: str) -> ObjectInfo:
    """Store `table` as this run's and stage's partition; list the returned info in the manifest's outputs."""
    clashing = [name for name in PARTITION_COLUMNS if name in table.column_names]
    if clashing:
        raise InputError(
            f"table {table_name!r} has column(s) {', '.join(clashing)}, which are its partition columns; rename them"
        )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return store.put_bytes(table_key(table_name, stage, run_id), buffer.getvalue())


@dataclass(frozen=True)
class TableFiles:
    """The committed Parquet files of a table, as paths on a pyarrow filesystem.

    pyarrow: `files.dataset()`; pandas: `pd.read_parquet(files.paths, filesystem=files.filesystem)`;
    DuckDB: `duckdb.read_parquet(files.paths, hive_partitioning=True)` for a file store, or
    `duckdb.from_arrow(files.dataset())` for any store.
    """

    filesystem: pafs.FileSystem
    base_path: str
    paths: list[str]
    uris: list[str]
    keys: list[str]

    def dataset(self) -> Any:
        """All files as one pyarrow.dataset.Dataset; the schema is unified over every file (later runs may add columns).

        pyarrow.dataset (which loads pandas) is imported here, not by every command that opens a store.
        """
        import pyarrow.dataset as ds

        partitioning = ds.partitioning(pa.schema([(name, pa.string()) for name in PARTITION_COLUMNS]), flavor="hive")
        factory = ds.FileSystemDatasetFactory(
            self.filesystem,
            self.paths,
            ds.ParquetFileFormat(),
            ds.FileSystemFactoryOptions(partitioning=partitioning, partition_base_dir=self.base_path),
        )
        return factory.finish(factory.inspect())


def table_files(store: ArtifactStore, table_name: str, *, run_id: str | None = None) -> TableFiles:
    prefix = f"tables/{validate_name(table_name, 'table name')}/"
    keys = list(_committed_partitions(store, table_name, run_id))
    return TableFiles(
        filesystem=store.arrow_filesystem(),
        base_path=store.arrow_path(prefix.rstrip("/")),
        paths=[store.arrow_path(key) for key in keys],
        uris=[store.uri(key) for key in keys],
        keys=keys,
    )


def read_table(store: ArtifactStore, table_name: str, *, run_id: str | None = None) -> pa.Table:
    """Every committed partition of the table (or one run's), with `stage` and `run_id` columns.

    Each partition is read as its manifest recorded it (version and sha256 checked), one file at a
    time and without arrow's thread pools: a process that scanned a dataset with them can abort at
    exit ("terminate called without an active exception", apache/arrow#34314).
    """
    parts = []
    for key, manifest in _committed_partitions(store, table_name, run_id).items():
        data, _ = store.read_recorded(manifest.recorded_output(key))
        try:
            table = read_parquet(data)
        except (OSError, pa.ArrowInvalid) as exc:
            raise StoreError(f"reading table {table_name!r} from {store.uri(key)} failed: {exc}") from exc
        n = table.num_rows
        stage, run = pa.array([manifest.stage] * n, pa.string()), pa.array([manifest.run_id] * n, pa.string())
        parts.append(table.append_column("stage", stage).append_column("run_id", run))
    return pa.concat_tables(parts, promote_options="default")


def _committed_partitions(store: ArtifactStore, table_name: str, run_id: str | None) -> dict[str, Manifest]:
    """Key of each partition file whose run committed a succeeded manifest for its stage -> that manifest."""
    prefix = f"tables/{validate_name(table_name, 'table name')}/"
    manifests: dict[tuple[str, str], Manifest | None] = {}
    committed: dict[str, Manifest] = {}
    for key in store.list(prefix):
        parts = key[len(prefix) :].split("/")
        if len(parts) != 3 or not parts[0].startswith("stage=") or not parts[1].startswith("run_id="):
            continue
        partition = (parts[1].removeprefix("run_id="), parts[0].removeprefix("stage="))
        if run_id is not None and partition[0] != run_id:
            continue
        if partition not in manifests:
            manifests[partition] = _succeeded_manifest(store, *partition)
        manifest = manifests[partition]
        # The manifest must be the partition's own and record the file: a run that reused another's work (its
        # manifest a reuse record) may still hold the partition of an attempt that crashed before committing.
        if manifest is not None and (manifest.run_id, manifest.stage) == partition and any(o.get("key") == key for o in manifest.outputs):
            committed[key] = manifest
    if not committed:
        which = f" for run {run_id!r}" if run_id is not None else ""
        raise ArtifactNotFoundError(f"table {table_name!r} has no committed data{which} in {store.root_uri}")
    return committed


def _succeeded_manifest(store: ArtifactStore, run_id: str, stage: str) -> Manifest | None:
    """The run's succeeded manifest for the stage, or None."""
    if not (NAME.fullmatch(run_id) and NAME.fullmatch(stage)):
        return None  # written outside the pipeline: no manifest can exist for it
    manifest = load_manifest_or_none(store, run_id, stage)
    return manifest if manifest is not None and manifest.status == SUCCEEDED else None
