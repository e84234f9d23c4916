"""The one mechanism every stage uses to publish through the artifact store.

A stage computes its inputs (URIs with sha256) and parameters; `execute_stage` derives the
cache key, skips the work when a committed run with the same key exists (unless forced),
otherwise lets the stage write its outputs under `runs/<run_id>/<stage>/` and commits the
manifest last. A stage that fails after it started leaves a `failed` manifest and no
committed outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import pyarrow as pa

from .. import __version__
from ..base.contracts import FAILED
from ..base.environment import runtime_environment
from ..base.errors import RECORDED_FAILURE, InputError, OutputExistsError
from ..base.settings import STORE_ENV
from ..store import (
    ArtifactStore,
    Manifest,
    ObjectInfo,
    commit_manifest,
    find_manifest,
    manifest_key,
    output_key,
    record_reuse,
    start_manifest,
    write_table,
)
from ..store.lease import LeaseHeldError, acquire_lease, holder_identity
from ..store.manifest import lease_folder
from .stage import StageContext


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


DetailT = TypeVar("DetailT")


@dataclass(frozen=True)
class Produced(Generic[DetailT]):
    """What a stage's work made: the outputs it stored, and its stage-specific result (the scan's rows, …)."""

    outputs: Sequence[ObjectInfo]
    detail: DetailT | None = None


@dataclass(frozen=True)
class StageOutcome(Generic[DetailT]):
    manifest: Manifest
    cached: bool  # True: an earlier committed run was reused and nothing was computed
    detail: DetailT | None = None  # what `produce` returned beside its outputs; None when reused

    def describe(self, store: ArtifactStore) -> str:
        m = self.manifest
        if self.cached:
            return f"{m.stage}: unchanged inputs and parameters; reusing run {m.run_id} in {store.root_uri} (pass --force to recompute)"
        return f"{m.stage}: committed run {m.run_id} in {store.root_uri} ({len(m.outputs)} outputs)"


Produce = Callable[[StageRun], "Sequence[ObjectInfo] | Produced[DetailT]"]


@dataclass(frozen=True)
class StagePlan:
    """One stage run before it starts: its store, step, run id and cache key (computed once, here)."""

    store: ArtifactStore
    stage: str
    context: StageContext
    manifest: Manifest  # started, not yet committed

    @property
    def cache_key(self) -> str:
        return self.manifest.cache_key

    @property
    def step(self) -> str:
        return self.manifest.stage

    def committed(self) -> Manifest | None:
        """The committed run with this cache key, if any (whatever --force says)."""
        return find_manifest(self.store, self.stage, self.cache_key)


def plan_stage(
    stage: str, context: StageContext, parameters: Mapping[str, Any], inputs: Sequence[ObjectInfo | Mapping[str, Any]]
) -> StagePlan:
    """The stage run `context` asks for, with its cache key; nothing is written."""
    store = require_store_in(context, stage)
    run_id = context.with_run_id().run_id
    manifest = start_manifest(context.step_name(stage), __version__, run_id, parameters, inputs, runtime_environment())
    return StagePlan(store, stage, context, manifest)


def execute_stage(
    stage: str,
    context: StageContext,
    parameters: Mapping[str, Any],
    inputs: Sequence[ObjectInfo | Mapping[str, Any]],
    produce: Produce,
) -> StageOutcome:
    """Publish one stage of a run in `context.store` (see the module docstring)."""
    return execute_plan(plan_stage(stage, context, parameters, inputs), produce)


def execute_plan(plan: StagePlan, produce: Produce) -> StageOutcome:
    """Reuse the committed run with the plan's cache key, or run `produce` and commit (see the module docstring).

    With `context.step` set, the stage runs as the step `<stage>.<step>` of the run (contracts.step_name).
    One process at a time runs a run's stage: it holds the stage's lease (store.lease) from before
    the cache lookup until the commit, renewing it while it works; a second process with the same
    run id fails at once (LeaseHeldError, exit 4) and writes nothing.
    """
    store, step, context, manifest = plan.store, plan.step, plan.context, plan.manifest
    # What needs no writing is decided before the lease (a reuse that records nothing, a refusal leave the store as it was);
    # _execute_leased decides again under the lease.
    if not context.force:
        earlier = plan.committed()
        if earlier is not None and (context.run_id in (None, earlier.run_id) or store.exists(manifest_key(context.run_id, step))):
            return _track_reuse(plan, StageOutcome(earlier, cached=True))
    _refuse_committed(store, manifest.run_id, step)
    holder = holder_identity(run_id=manifest.run_id, stage=step, cache_key=manifest.cache_key)
    try:
        lease = acquire_lease(store, lease_folder(manifest.run_id, step), holder)
    except LeaseHeldError as exc:
        raise LeaseHeldError(
            f"the {step} stage of run {manifest.run_id!r} is being run by another process ({exc}); nothing was done: "
            "wait for it (`spectrum runs` shows it), or pass another --run-id (or none, for a fresh one)"
        ) from None
    with lease.held():
        result = _execute_leased(plan, produce)
        if result.cached:
            lease.release("reused")
    return _track_reuse(plan, result)


def _execute_leased(plan: StagePlan, produce: Produce) -> StageOutcome:
    store, step, context, manifest = plan.store, plan.step, plan.context, plan.manifest
    if not context.force:
        earlier = plan.committed()
        if earlier is not None:
            if context.run_id and context.run_id != earlier.run_id:  # a named run records what it reused
                record_reuse(store, earlier, context.run_id, step)
            return StageOutcome(earlier, cached=True)
    _refuse_committed(store, manifest.run_id, step)
    try:
        made = produce(StageRun(store, step, manifest.run_id, manifest.cache_key))
        produced = made if isinstance(made, Produced) else Produced(made)
        committed = _tracked(plan, manifest.finish(produced.outputs))
        commit_manifest(store, committed)
    except BaseException as exc:
        # Record the failure (of the work or of the commit itself); if even that cannot be
        # stored (server down), the original error matters more.
        with contextlib.suppress(Exception):
            commit_manifest(store, manifest.finish([], status=FAILED))
            setattr(exc, RECORDED_FAILURE, f"{step} stage of run {manifest.run_id}")
        raise
    return StageOutcome(committed, cached=False, detail=produced.detail)


def _tracked(plan: StagePlan, finished: Manifest) -> Manifest:
    """The finished manifest with where the experiment tracker logged it (or why it could not), before its commit."""
    target = plan.context.tracking
    if target is None:
        return finished
    from ..tracking.mlflow_log import log_stage

    return replace(finished, tracking=log_stage(target, plan.store, finished))


def _track_reuse(plan: StagePlan, outcome: StageOutcome) -> StageOutcome:
    """A reused stage is logged too (as the run it reused, tagged so): a pipeline run's tracker shows every stage."""
    target = plan.context.tracking
    if target is not None and outcome.cached:
        from ..tracking.mlflow_log import log_stage

        log_stage(target, plan.store, replace(outcome.manifest, run_id=plan.manifest.run_id, stage=plan.step), reused_from=outcome.manifest)
    return outcome


def _refuse_committed(store: ArtifactStore, run_id: str, step: str) -> None:
    if store.exists(manifest_key(run_id, step)):
        raise OutputExistsError(
            f"run {run_id!r} already has a committed {step} stage in {store.root_uri}; "
            "runs are never overwritten: pick a new --run-id (or leave it out for a fresh one)"
        )


def require_store_in(context: StageContext, stage: str) -> ArtifactStore:
    if context.store is None:
        raise InputError(
            f"no artifact store: the {stage} stage publishes its outputs as a run; "
            f"pass --store (a folder, file:///path or s3://bucket/prefix) or set ${STORE_ENV}"
        )
    return context.store
