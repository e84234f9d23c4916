"""Lineage queries: what every run did, from its manifests, leases and tables in the artifact store.

`list_run_summaries` backs `spectrum runs`; `audit_run` backs `spectrum audit RUN`: each
stage's inputs and outputs with hashes, the selection (which tensors were trainable and why,
with their SNR), the lineage of the SNR table it selected from, and the tensors each training
changed (per training stage: cpt and sft apart). `Producers.walk` is the one lineage walk: the
audit's and the report's (stages/report) follow inputs back to the stages that wrote them.

A run's stages are listed as the run recorded them: a stage it reused from an earlier run (a
re-run's upstream, a cached step) is its reuse record, with its own start time, shown as
"reused from RUN/STEP". A run's status also reads its leases (store/lease.py): a stage or the
pipeline whose holder is alive is `running`; one whose holder stopped beating without releasing
it (killed) is `crashed`; a pipeline released as failed or interrupted is that.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..base.contracts import (
    CPT,
    FAILED,
    LAYER_SELECT,
    MANIFEST_FILE,
    PIPELINE_LEASE,
    RUNNING,
    SELECTION_TABLE,
    SFT,
    SUCCEEDED,
    TRAINED_TENSORS_TABLE,
    base_stage,
    stage_sort_key,
)
from ..base.errors import InputError
from .base import ArtifactStore
from .errors import ArtifactNotFoundError
from .keys import NAME
from .lease import LeaseState, lease_state
from .manifest import LEASE_FOLDER, Manifest, committed_manifests, lease_folder, load_manifest_or_none, manifest_key
from .tables import table_rows

log = logging.getLogger(__name__)
CRASHED = "crashed"  # a holder that stopped beating without releasing its lease: killed (kill -9, OOM, a lost node)
TRAINING_STAGES = (CPT, SFT)


@dataclass
class _RunKeys:
    stages: list[str] = field(default_factory=list)  # steps with a manifest
    leased: dict[str, list[str]] = field(default_factory=dict)  # step (or `pipeline`) -> the keys of its lease folder


def list_run_summaries(store: ArtifactStore, with_compute: bool = False) -> list[dict[str, Any]]:
    """Every run with a committed stage or a lease: its stages' statuses and the run's (see the module docstring).

    `with_compute`: each summary's `compute` maps the stages the run computed itself to their manifests' compute
    (None: recorded before compute was); a reuse record computed nothing and is left out, so summing runs counts work once.
    """
    summaries = []
    for run_id, keys in sorted(_scan_runs(store).items()):
        records = _records(store, run_id, keys.stages)
        stages = {m.stage: m.status for m in records}
        unresolved = sorted(set(keys.leased) - set(stages))
        leases = {step: state for step in unresolved if (state := _lease(store, run_id, step, keys.leased[step]))}
        stages.update((step, _lease_status(state)) for step, state in leases.items() if step != PIPELINE_LEASE)
        if not stages and PIPELINE_LEASE not in leases:
            continue
        pipeline = leases.get(PIPELINE_LEASE)
        started = [m.started_at for m in records] + [_iso(state.acquired_at) for state in leases.values()]
        summaries.append(
            {
                "run_id": run_id,
                "status": _run_status(stages, pipeline),
                "stages": dict(sorted(stages.items(), key=lambda item: stage_sort_key(item[0]))),
                "pipeline": _lease_status(pipeline) if pipeline else None,
                "started_at": min(started),
                "finished_at": max((m.finished_at or "" for m in records), default="") or None,
                "code_version": sorted({m.code_version for m in records}),
            }
        )
        if with_compute:
            summaries[-1]["compute"] = {m.stage: m.compute for m in records if m.reused_from is None}
    return summaries


def _scan_runs(store: ArtifactStore) -> dict[str, _RunKeys]:
    """One listing of runs/: each run's committed steps and its lease folders (keys of another layout are warned about)."""
    runs: dict[str, _RunKeys] = {}
    for key in store.list("runs/"):
        parts = key.split("/")
        named = len(parts) >= 4 and NAME.fullmatch(parts[1]) and NAME.fullmatch(parts[2])
        if named and len(parts) == 4 and parts[3] == MANIFEST_FILE:
            runs.setdefault(parts[1], _RunKeys()).stages.append(parts[2])
        elif named and len(parts) > 4 and parts[3] == LEASE_FOLDER:
            runs.setdefault(parts[1], _RunKeys()).leased.setdefault(parts[2], []).append(key)
        elif parts[-1] == MANIFEST_FILE:
            log.warning("skipping %s: not a manifest of the runs/<run>/<stage>/ layout", store.uri(key))
    return runs


def _records(store: ArtifactStore, run_id: str, stages: list[str]) -> list[Manifest]:
    """The run's own manifests in pipeline order: a reuse record as recorded, not the manifest it points to."""
    records = []
    for stage in sorted(stages, key=stage_sort_key):
        key = manifest_key(run_id, stage)
        try:
            records.append(Manifest.from_json(store.get_bytes(key), store.uri(key)))
        except ArtifactNotFoundError:
            continue
        except InputError as exc:
            log.warning("%s", exc)
    return records


def _lease(store: ArtifactStore, run_id: str, step: str, keys: list[str]) -> LeaseState | None:
    """The lease of a run's step (or pipeline), from the listing's `keys`; one that cannot be read is warned about."""
    try:
        return lease_state(store, lease_folder(run_id, step), keys=keys)
    except InputError as exc:
        log.warning("%s", exc)
        return None


def _lease_status(state: LeaseState) -> str:
    if state.live:
        return RUNNING
    if state.expired:
        return CRASHED
    return str((state.released or {}).get("outcome") or FAILED)


def _run_status(stages: dict[str, str], pipeline: LeaseState | None) -> str:
    """running, crashed, failed (or the pipeline's other outcome, e.g. interrupted), else succeeded when every stage did."""
    statuses = set(stages.values()) | ({_lease_status(pipeline)} if pipeline else set())
    for status in (RUNNING, CRASHED, FAILED):
        if status in statuses:
            return status
    other = statuses - {SUCCEEDED}
    return sorted(other)[0] if other else SUCCEEDED


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")


def audit_run(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    records = _records(store, run_id, _steps_of(store, run_id))
    if not records:
        raise InputError(
            f"run {run_id!r} has no committed stage in {store.root_uri}; `spectrum runs --store {store.root_uri}` lists the runs"
        )
    producers = Producers(committed_manifests(store))  # read once: the producers of the run's inputs
    report: dict[str, Any] = {"run_id": run_id, "store": store.root_uri, "stages": [], "lineage": []}
    work: list[Manifest] = []  # the manifest of each stage's work: its own, or the one its reuse record names
    upstream: list[Manifest] = []
    for record in records:
        manifest = _resolved(store, record)
        work.append(manifest)
        report["stages"].append(
            {
                "stage": record.stage,
                "status": manifest.status,
                "reused_from": record.reused_from,  # {run_id, stage} of the run that did the work, or None
                "recorded_at": record.started_at,  # when this run recorded the stage (for a reuse: when it reused it)
                "code_version": manifest.code_version,
                "cache_key": manifest.cache_key,
                "host": manifest.host,
                "started_at": manifest.started_at,
                "seconds": manifest.seconds,
                "parameters": manifest.parameters,
                "inputs": manifest.inputs,
                "outputs": manifest.outputs,
            }
        )
        walked = producers.walk(producers.of(manifest.inputs), exclude_run=run_id)
        found = [node.manifest for node in walked if node.manifest not in upstream]
        upstream += found
        report["lineage"] += [{"run_id": m.run_id, "stage": m.stage, "parameters": m.parameters, "inputs": m.inputs} for m in found]
        if base_stage(manifest.stage) == LAYER_SELECT and manifest.status == SUCCEEDED:
            selection = _selection(store, manifest)  # a run's own selection first; a rescan's is a step (layer_select.sft)
            report.setdefault("selection", selection)
            report.setdefault("selections", {})[record.stage] = selection
    report["training"] = _training(store, records, work, upstream)
    return report


def _steps_of(store: ArtifactStore, run_id: str) -> list[str]:
    if not NAME.fullmatch(run_id):
        return []
    prefix = f"runs/{run_id}/"
    return [parts[0] for key in store.list(prefix) if len(parts := key[len(prefix) :].split("/")) == 2 and parts[1] == MANIFEST_FILE]


def _resolved(store: ArtifactStore, record: Manifest) -> Manifest:
    """The manifest of the work a record stands for: itself, or the earlier run's its reuse record names (when readable)."""
    if record.reused_from is None:
        return record
    return load_manifest_or_none(store, record.reused_from["run_id"], record.reused_from["stage"]) or record


Key = tuple[str, str]  # (run id, stage or step)


@dataclass(frozen=True)
class LineageNode:
    """A committed stage met on a lineage walk, with the stages that produced its inputs."""

    manifest: Manifest
    parents: tuple[Key, ...]

    @property
    def key(self) -> Key:
        return (self.manifest.run_id, self.manifest.stage)


class Producers:
    """Which succeeded stage wrote each stored object (by URI): lineage follows inputs back to the runs that made them."""

    def __init__(self, manifests: dict[str, list[Manifest]]):
        self._by_uri: dict[str, Manifest] = {}
        for run_manifests in manifests.values():
            for manifest in run_manifests:
                if manifest.status == SUCCEEDED:
                    self._by_uri.update((output["uri"], manifest) for output in manifest.outputs if output.get("uri"))

    def of(self, inputs: Iterable[dict[str, Any]]) -> list[Manifest]:
        """The producers of `inputs`, in their order (inputs that no stage wrote, e.g. local files, have none)."""
        return [producer for ref in inputs if (producer := self._by_uri.get(ref.get("uri", "")))]

    def walk(self, start: Iterable[Manifest], exclude_run: str | None = None) -> list[LineageNode]:
        """`start`, then the stages that produced their inputs, transitively, nearest first, each once.

        Stages of `exclude_run` are neither listed nor followed.
        """
        nodes: dict[Key, LineageNode] = {}
        pending = deque(start)
        while pending:
            manifest = pending.popleft()
            key = (manifest.run_id, manifest.stage)
            if key in nodes or manifest.run_id == exclude_run:
                continue
            producers = self.of(manifest.inputs)
            parents = dict.fromkeys(p_key for p in producers if (p_key := (p.run_id, p.stage)) != key)
            nodes[key] = LineageNode(manifest, tuple(parents))
            pending.extend(producers)
        return list(nodes.values())


def ancestors(nodes: Iterable[LineageNode], key: Key) -> set[Key]:
    """Every stage among `nodes` that `key` descends from (its parents, theirs, and so on)."""
    parents = {node.key: node.parents for node in nodes}
    found: set[Key] = set()
    pending = list(parents.get(key, ()))
    while pending:
        parent = pending.pop()
        if parent not in found:
            found.add(parent)
            pending.extend(parents.get(parent, ()))
    return found


def _selection(store: ArtifactStore, manifest: Manifest) -> dict[str, Any]:
    rows = table_rows(store, manifest, SELECTION_TABLE)
    trainable = [r for r in rows if r["selected"]]
    frozen = [r for r in rows if not r["selected"]]
    fields = ("tensor_name", "module_type", "snr", "parameter_count", "rank", "reason")
    return {
        "trainable": [{k: r[k] for k in fields} for r in trainable],
        "frozen": [{k: r[k] for k in fields} for r in frozen],
        "trainable_parameters": sum(r["parameter_count"] or 0 for r in trainable),
        "total_parameters": sum(r["parameter_count"] or 0 for r in rows),
    }


def _training(store: ArtifactStore, records: list[Manifest], work: list[Manifest], upstream: list[Manifest]) -> dict[str, Any] | None:
    """The tensors each training changed, per stage: the run's own trainings (done or reused), else those its inputs came from.

    `changed` is the union by tensor name (a tensor trained by cpt and sft is one tensor), `stages` each training apart.
    """
    stages = [
        _trained(store, manifest, record.stage, "reused" if record.reused_from else "run")
        for record, manifest in zip(records, work, strict=True)
        if base_stage(manifest.stage) in TRAINING_STAGES and manifest.status == SUCCEEDED
    ]
    if not stages:  # e.g. `spectrum evaluate --cpt-run X`: the training it measured is an input's producer
        stages = [_trained(store, m, m.stage, "input") for m in reversed(upstream) if base_stage(m.stage) in TRAINING_STAGES]
    if not stages:
        return None
    changed: dict[str, dict[str, Any]] = {}
    names: set[str] = set()
    for stage in stages:
        changed.update((r["tensor_name"], r) for r in stage["changed"] if r["tensor_name"] not in changed)
        names |= stage["tensors"]
    for stage in stages:
        stage["tensors"] = len(stage["tensors"])
    return {"stages": stages, "changed": list(changed.values()), "unchanged": len(names - set(changed))}


def _trained(store: ArtifactStore, manifest: Manifest, step: str, via: str) -> dict[str, Any]:
    """One training stage's changed tensors, from its trained_tensors partition (none recorded: no rows)."""
    rows = table_rows(store, manifest, TRAINED_TENSORS_TABLE, required=False) or []
    return {
        "stage": step,
        "run_id": manifest.run_id,
        "trained_as": manifest.stage,  # the step in the run that did the training
        "via": via,  # run: trained in this run; reused: this run reused it; input: this run's inputs came from it
        "changed": [r for r in rows if r.get("changed")],
        "tensors": {r["tensor_name"] for r in rows},
    }
