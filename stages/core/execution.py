"""The one mechanism every stage uses to publish through the artifact store.

A stage computes its inputs (URIs with sha256) and parameters; `execute_stage` derives the
cache key, skips the work when a committed run with the same key exists (unless forced),
otherwise lets the stage write its outputs under `runs/<run_id>/<stage>/` and commits the
manifest last. A stage that fails after it started leaves a `failed` manifest and no
committed outputs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
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
from ..store.compute import begin_compute
from ..store.lease import Lease, LeaseHeldError, acquire_lease, holder_identity
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
        if earlier is not None and (
            context.run_id is None or _is_the_step_itself(earlier, context.run_id, step) or store.exists(manifest_key(context.run_id, step))
        ):
            _track_reuse(plan, earlier)
            return StageOutcome(earlier, cached=True)
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
        result = _execute_leased(plan, produce, lease)
        if result.cached:
            lease.release("reused")
    return result


# The seconds the steps run inside the current stage's work spent (a list: the stage's own counter), so that a run's
# compute counts each second once: a step records its own compute, the stage it ran in leaves it out.
_NESTED_SECONDS: ContextVar[list[float] | None] = ContextVar("nested_step_seconds", default=None)


def _execute_leased(plan: StagePlan, produce: Produce, lease: Lease) -> StageOutcome:
    store, step, context, manifest = plan.store, plan.step, plan.context, plan.manifest
    if not context.force:
        earlier = plan.committed()
        if earlier is not None:
            tracking = _track_reuse(plan, earlier)
            if context.run_id and not _is_the_step_itself(earlier, context.run_id, step):  # a named run records what it reused
                record_reuse(store, earlier, context.run_id, step, tracking=tracking)
            return StageOutcome(earlier, cached=True)
    _refuse_committed(store, manifest.run_id, step)
    begin_compute()
    tracking = None
    enclosing, nested = _NESTED_SECONDS.get(), [0.0]
    token, started = _NESTED_SECONDS.set(nested), time.monotonic()
    try:
        made = produce(StageRun(store, step, manifest.run_id, manifest.cache_key))
        produced = made if isinstance(made, Produced) else Produced(made)
        finished = manifest.finish(produced.outputs, nested_seconds=nested[0])
        tracking = _track(plan, finished, end=False)  # the MLflow run ends once the commit did (end_stage_run below)
        committed = replace(finished, tracking=tracking)
        commit_manifest(store, committed)
    except BaseException as exc:
        if lease.lost.is_set():  # the work was stopped for a lost lease: another process may hold the stage now, not ours to mark failed
            raise
        # Record the failure (of the work or of the commit itself); if even that cannot be
        # stored (server down), the original error matters more.
        with contextlib.suppress(Exception):
            failed = manifest.finish([], status=FAILED, nested_seconds=nested[0])
            commit_manifest(store, replace(failed, tracking=_track_failure(plan, failed, tracking, exc)))
            setattr(exc, RECORDED_FAILURE, f"{step} stage of run {manifest.run_id}")
        raise
    finally:
        _NESTED_SECONDS.reset(token)
        if enclosing is not None:  # a step run inside another stage's work: that stage's compute leaves this time out
            enclosing[0] += time.monotonic() - started
    _end_tracked(plan, tracking, succeeded=True)
    return StageOutcome(committed, cached=False, detail=produced.detail)


def _is_the_step_itself(earlier: Manifest, run_id: str, step: str) -> bool:
    """The committed manifest is this run's own step (nothing to record), not another run's or another step's work."""
    return (earlier.run_id, earlier.stage) == (run_id, step)


def _track(plan: StagePlan, manifest: Manifest, end: bool = True) -> dict[str, Any] | None:
    """Where the experiment tracker logged the stage (or why it could not): the manifest's `tracking`; None untracked."""
    if plan.context.tracking is None:
        return None
    from ..tracking.mlflow_log import log_stage

    return log_stage(plan.context.tracking, plan.store, manifest, end=end)


def _end_tracked(plan: StagePlan, tracking: dict[str, Any] | None, succeeded: bool) -> None:
    if plan.context.tracking is not None and tracking is not None:
        from ..tracking.mlflow_log import end_stage_run

        end_stage_run(plan.context.tracking, tracking, succeeded)


def _track_failure(plan: StagePlan, failed: Manifest, tracking: dict[str, Any] | None, exc: BaseException) -> dict[str, Any] | None:
    """A stage that failed is tracked as failed: its open run ends FAILED, or (a failed work) a FAILED run is logged.

    An interrupt (Ctrl-C, SIGTERM) only ends what is open: a stopping process must not wait for a tracker.
    """
    if tracking is not None:
        _end_tracked(plan, tracking, succeeded=False)
        return tracking
    return _track(plan, failed) if isinstance(exc, Exception) else None


def _track_reuse(plan: StagePlan, earlier: Manifest) -> dict[str, Any] | None:
    """A reused stage is logged too, as the run it reused (tagged so): a pipeline run's tracker shows every stage."""
    if plan.context.tracking is None:
        return None
    from ..tracking.mlflow_log import log_stage

    as_run = replace(earlier, run_id=plan.context.run_id or earlier.run_id, stage=plan.step)
    return log_stage(plan.context.tracking, plan.store, as_run, reused_from=earlier)


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
