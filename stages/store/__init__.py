"""The artifact store: one interface over `file://` folders and `s3://` buckets, plus manifests and tables.

store = open_store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:8333")
manifest = start_manifest(SNR_SCAN, CODE_VERSION, run_id, parameters, inputs)
info = write_table(store, SNR_TABLE, table, stage=SNR_SCAN, run_id=run_id)
commit_manifest(store, manifest.finish([info]))     # last: the commit marker
"""

from __future__ import annotations

from .base import ArtifactStore, ObjectInfo
from .errors import (
    ArtifactNotFoundError,
    CredentialsRejectedError,
    IntegrityError,
    SecretLeakError,
    StoreError,
    StoreUnavailableError,
)
from .file_backend import FileStore
from .manifest import (
    Manifest,
    StageRef,
    cache_key,
    commit_manifest,
    find_manifest,
    list_runs,
    load_manifest,
    manifest_key,
    new_run_id,
    output_key,
    read_output,
    read_stage_output,
    record_reuse,
    resolve_run_reference,
    start_manifest,
    succeeded_manifest,
)
from .tables import TableFiles, read_table, read_table_output, table_files, table_key, write_table
from .uri import FileLocation, parse_store_uri


def open_store(uri: str, *, endpoint_url: str | None = None, writable: bool = True) -> ArtifactStore:
    """Open `file:///abs/path` (or a plain local path) or `s3://bucket/prefix`.

    `endpoint_url` (else $SPECTRUM_S3_ENDPOINT_URL) points S3 at a compatible server. A writable
    store is created if missing (S3: bucket with versioning on); `writable=False` only reads and
    requires the store to exist, leaving it untouched.
    """
    location = parse_store_uri(uri)
    if isinstance(location, FileLocation):
        return FileStore(location.root, writable=writable)
    from .s3_backend import S3Store  # boto3 is imported only when an S3 store is opened

    return S3Store(location, endpoint_url=endpoint_url, writable=writable)


__all__ = [
    "ArtifactNotFoundError",
    "ArtifactStore",
    "CredentialsRejectedError",
    "FileStore",
    "IntegrityError",
    "Manifest",
    "ObjectInfo",
    "SecretLeakError",
    "StoreError",
    "StoreUnavailableError",
    "TableFiles",
    "cache_key",
    "commit_manifest",
    "find_manifest",
    "list_runs",
    "load_manifest",
    "manifest_key",
    "new_run_id",
    "open_store",
    "output_key",
    "parse_store_uri",
    "read_output",
    "read_stage_output",
    "read_table",
    "read_table_output",
    "record_reuse",
    "StageRef",
    "resolve_run_reference",
    "start_manifest",
    "succeeded_manifest",
    "table_files",
    "table_key",
    "write_table",
]
