"""The one mechanism every stage uses to publish through the artifact store.

A stage computes its inputs (URIs with sha256) and parameters; `execute_stage` derives the
cache key, skips the work when a committed run with the same key exists (unless forced),
otherwise lets the stage write its outputs under `runs/<run_id>/<stage>/` and commits the
manifest last. A stage that fails after it started leaves a `failed` manifest and no
committed outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import __version__
from .errors import OutputExistsError
from .store import (
    FAILED,
    ArtifactStore,
    Manifest,
    ObjectInfo,
    commit_manifest,
    find_manifest,
    manifest_key,
    new_run_id,
    open_store,
    output_key,
    start_manifest,
    write_table,
)

STORE_ENV = "SPECTRUM_STORE"


@dataclass(frozen=True)
class StageRun:
    """Where one stage of one run writes."""

    store: ArtifactStore
    stage: str
    run_id: str
    cache_key: str

    def put_bytes(self, name: str, data: bytes) -> ObjectInfo:
        return self.store.put_bytes(output_key(self.run_id, self.stage, name), data)

    def put_file(self, name: str, path: Path) -> ObjectInfo:
        return self.store.put_file(output_key(self.run_id, self.stage, name), path)

    def write_table(self, table_name: str, table: pa.Table) -> ObjectInfo:
        return write_table(self.store, table_name, table, stage=self.stage, run_id=self.run_id)


@dataclass(frozen=True)
class StageOutcome:
    manifest: Manifest
    cached: bool  # True: an earlier committed run was reused and nothing was computed


def execute_stage(
    store: ArtifactStore,
    stage: str,
    parameters: Mapping[str, Any],
    inputs: Sequence[ObjectInfo | Mapping[str, Any]],
    produce: Callable[[StageRun], Sequence[ObjectInfo]],
    run_id: str | None = None,
    force: bool = False,
) -> StageOutcome:
    manifest = start_manifest(stage, __version__, run_id or new_run_id(), parameters, inputs)
    if not force:
        earlier = find_manifest(store, stage, manifest.cache_key)
        if earlier is not None:
            return StageOutcome(earlier, cached=True)
    if store.exists(manifest_key(manifest.run_id, stage)):
        raise OutputExistsError(
            f"run {manifest.run_id!r} already has a committed {stage} stage in {store.root_uri}; "
            "runs are never overwritten: pick a new --run-id (or leave it out for a fresh one)"
        )
    try:
        committed = manifest.finish(produce(StageRun(store, stage, manifest.run_id, manifest.cache_key)))
        commit_manifest(store, committed)
    except BaseException:
        # Record the failure (of the work or of the commit itself); if even that cannot be
        # stored (server down), the original error matters more.
        with contextlib.suppress(Exception):
            commit_manifest(store, manifest.finish([], status=FAILED))
        raise
    return StageOutcome(committed, cached=False)


def add_store_location_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get(STORE_ENV),
        help=f"artifact store: a folder, file:///path or s3://bucket/prefix (default: ${STORE_ENV})",
    )
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 (default: AWS settings)")


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a stage that publishes to the store."""
    add_store_location_arguments(parser)
    parser.add_argument("--run-id", help="run to record this stage under (default: a new run id)")
    parser.add_argument("--force", action="store_true", help="run even when a committed run has the same inputs and parameters")


def store_from_args(args: argparse.Namespace, writable: bool = True) -> ArtifactStore | None:
    return open_store(args.store, endpoint_url=args.s3_endpoint_url, writable=writable) if args.store else None


def describe(outcome: StageOutcome, store: ArtifactStore) -> str:
    m = outcome.manifest
    if outcome.cached:
        return f"{m.stage}: unchanged inputs and parameters; reusing run {m.run_id} in {store.root_uri} (pass --force to recompute)"
    return f"{m.stage}: committed run {m.run_id} in {store.root_uri} ({len(m.outputs)} outputs)"
