"""The Prefect pipeline: download → snr_scan → layer_select → cpt → sft → evaluate (+ report), one run id.

Each step (flows/pipeline_definition.py) is a Prefect task (flows/stage_tasks.py) that runs the stage,
with the config built from the pipeline config and the outputs of the steps before it, and waits
on those steps, so the flow run's graph is the pipeline's. A
stage whose inputs and parameters match a committed run is reused (the store's cache key) and
the run records where it came from, so every stage of a pipeline run can be found under its id.

Re-runs build on a committed run (`run=`): `only=STAGE` runs that stage alone against the run's
committed upstream outputs, `from_stage=STAGE` runs it and everything after it, `force=[STAGE]`
recomputes a stage even when its cache key is committed. Nothing upstream is recomputed. A
re-run is a new run (runs are never overwritten) whose upstream stages are reuse records of
the committed run's, so it is complete and auditable on its own. A pipeline that failed is run
again the same way, or whole: committed stages are reused and training resumes from its last
checkpoint in the store.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import prefect.runtime
from prefect import flow
from prefect.states import State

from stages.base.contracts import CPT, DECISION_FILE, DOWNLOAD, PIPELINE_LEASE, PROMOTE
from stages.base.documents import clip
from stages.base.errors import InputError
from stages.core.stage import PIPELINE_INPUTS, From, StageContext
from stages.download import read_summary
from stages.store import ArtifactStore, Manifest, StageRef, lines, new_run_id, open_store, read_output, record_reuse
from stages.store.errors import ArtifactNotFoundError
from stages.store.keys import validate_name
from stages.store.lease import Lease, LeaseHeldError, acquire_lease, holder_identity
from stages.store.manifest import lease_folder
from stages.tracking import MlflowTarget

from . import notify
from .artifacts import publish_artifacts
from .pipeline_config import PipelineConfig, check_rerun, load_pipeline_config
from .pipeline_definition import STAGE_BY_NAME
from .prefect_api import install_scrubbing, redacted, scrub
from .stage_tasks import run_step

REPORT_FILE = "report.html"
log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run_id: str
    store: str
    manifests: dict[str, Manifest] = field(default_factory=dict)  # step -> the manifest it committed or reused
    ran: list[str] = field(default_factory=list)  # stages executed by this invocation (computed or reused)
    cached: list[str] = field(default_factory=list)  # of those, the ones whose committed run was reused
    lines: list[str] = field(default_factory=list)
    report: Path | None = None
    step: str | None = None  # the step being run (the one that failed, when the run raised); None once it finished


@flow(name="spectrum-pipeline")
@redacted
def pipeline_flow(
    config_path: str,
    only: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    run: str | None = None,
    drop: str | None = None,
) -> dict[str, Any]:
    """The whole pipeline for one config (a deployment's parameters are these arguments); `drop` names a line's data drop."""
    install_scrubbing()
    config = load_pipeline_config(config_path)
    result = run_pipeline(config, only=only, from_stage=from_stage, force=force or [], run=run, drop=drop)
    artifacts = publish_artifacts(open_pipeline_store(config), result.run_id, result.manifests, result.report)
    return {
        "flow_run_id": str(prefect.runtime.flow_run.id),  # its task runs and their upstream steps are the pipeline's graph
        "artifacts": artifacts,
        "run_id": result.run_id,
        "stages": {s: m.run_id for s, m in result.manifests.items()},  # the run that did each stage's work
        "ran": result.ran,
        "cached": result.cached,
        "report": str(result.report) if result.report else None,
        "lines": [scrub(line) for line in result.lines],
        "compute": notify.describe_run_usage(result.run_id, result.manifests, config.cost),  # this run's device time (and cost)
    }


def run_pipeline(
    config: PipelineConfig,
    *,
    only: str | None = None,
    from_stage: str | None = None,
    force: list[str] | tuple[str, ...] = (),
    run: str | None = None,
    work_dir: Path | None = None,
    progress: bool | None = None,
    drop: str | None = None,
) -> PipelineResult:
    """Run the steps of `config` in order (see the module docstring), each as the Prefect task of its execution mode.

    With a model line (`line:`), the run is the line's next generation: it starts from the line's
    promoted model (continue_from: promoted; the config's model for generation 1), and the promote
    step's decision is recorded in the line (stages.store.lines), advancing production when it passed.
    `drop` names the data drop in that record (the watcher's drop; default: the config's data).

    The run holds the lease runs/<run>/pipeline/lease/ for its lifetime (one live pipeline per run id),
    renewed while it works and released with its outcome: succeeded, failed (with the reason) or interrupted.
    Once it holds the lease, the run is tracked (`tracking:`, one MLflow run with a run nested per stage) and its
    end is posted (`notify:`, flows/notify.py), succeeded or failed, exactly once, however the pipeline was started.
    A run that fails before it holds the lease (its store unreachable, or the run id held by another pipeline) is posted
    as failed at "start"; a config error (a re-run's options, the drop's name, no store named: InputError) is not posted:
    nothing ran, and whoever started the run is told at once.
    """
    started = time.monotonic()
    check_rerun(config, only, from_stage, force, run)
    if config.line is not None:  # the drop is named in the line's record: refused before anything runs, not after training
        validate_name(Path(drop or config.data).name, "drop name (the data folder's name, which the line records)")
    run_id = (None if only or from_stage else run or config.run_id) or new_run_id()
    try:
        store = open_pipeline_store(config)
        lease = _acquire_pipeline_lease(store, run_id)
    except InputError:  # the config names no store, or one that cannot be: nothing ran and the caller is told at once
        raise
    except BaseException as exc:  # the store is unreachable or the run is another pipeline's: a scheduled run says so too
        _finish_before_start(config, run_id, time.monotonic() - started, exc)
        raise
    result = PipelineResult(run_id=run_id, store=store.root_uri)
    tracking = None
    try:
        with lease.held(reason=lambda exc: clip(scrub(str(exc)), 1000)):
            tracking = _start_tracking(config, store, result, only=only, from_stage=from_stage, force=force)
            if not (only or from_stage):  # a re-run keeps the starting model its committed download recorded
                config = _starting_point(config, store, result)
            _run_stages(config, store, result, only, from_stage, force, run, work_dir, progress, tracking)
            if config.line is not None and PROMOTE in result.ran:
                result.step = "line"
                _record_generation(config, store, result, drop or config.data)
            result.step = None
    except BaseException as exc:
        _finish(config, store, result, tracking, time.monotonic() - started, exc)
        raise
    _finish(config, store, result, tracking, time.monotonic() - started, None)
    return result


def _acquire_pipeline_lease(store: ArtifactStore, run_id: str) -> Lease:
    """The run's pipeline lease, or LeaseHeldError saying that another pipeline has the run and nothing was done."""
    try:
        return acquire_lease(store, lease_folder(run_id, PIPELINE_LEASE), holder_identity(run_id=run_id, stage=PIPELINE_LEASE))
    except LeaseHeldError as exc:
        raise LeaseHeldError(
            f"run {run_id!r} is being run by another pipeline ({exc}); nothing was done: wait for it (`spectrum runs` "
            "shows it), or run under another run id"
        ) from None


def _finish_before_start(config: PipelineConfig, run_id: str, wall_seconds: float, failure: BaseException) -> None:
    """The end of a run that failed before it held its lease: posted as failed at "start" (nothing ran, nothing is tracked)."""
    try:
        notify.notify(config.notify, notify.failed_start(run_id, _store_uri(config), wall_seconds, config.cost, failure))
    except Exception as exc:  # noqa: BLE001 - reporting the end must never change it
        log.warning("the end of run %s could not be reported (%s)", run_id, notify.one_line_error(exc))


def _start_tracking(config: PipelineConfig, store: ArtifactStore, result: PipelineResult, **rerun: Any) -> MlflowTarget | None:
    """The pipeline run's MLflow run, which every stage nests in (the target unchanged, with a warning, if the tracker is down)."""
    if config.tracking is None:
        return None
    from stages.tracking.mlflow_log import start_pipeline_run

    parameters = {
        "model": config.model,
        "revision": config.revision,
        "data": config.data,
        "line": config.line.name if config.line else None,
        "pins": {step: str(ref) for step, ref in config.pins.items()},
        "execution": {stage: config.execution_of(stage) for stage in config.stages},
        "stages": config.options,
        **{name: value for name, value in rerun.items() if value},
    }
    return start_pipeline_run(config.tracking, result.run_id, store.root_uri, _scrubbed(parameters))


def _finish(
    config: PipelineConfig,
    store: ArtifactStore,
    result: PipelineResult,
    tracking: MlflowTarget | None,
    wall_seconds: float,
    failure: BaseException | None,
) -> None:
    """The run's totals to its MLflow run, and its end to the webhook; neither ever fails the run or hides its outcome."""
    try:
        end = notify.run_end(
            result.run_id, store, result.manifests, result.ran, result.cached, wall_seconds, config.cost,
            report=str(result.report) if result.report and failure is None else None, failure=failure, failed_step=result.step,
        )  # fmt: skip
        if tracking is not None:
            from stages.tracking.mlflow_log import finish_pipeline_run

            metrics = {"wall_seconds": end.wall_seconds, "gpu_hours": end.gpu_hours, "device_hours": sum(end.device_hours.values())}
            metrics |= {f"device_hours_{kind}": hours for kind, hours in end.device_hours.items()}
            metrics |= {"stages_run": len(end.stages_run), "stages_reused": len(end.stages_reused)}
            if end.cost is not None:
                metrics["cost"] = end.cost
            artifacts = {"report": result.report} if result.report and result.report.is_file() else {}
            finish_pipeline_run(tracking, failure is None, metrics, artifacts)
        notify.notify(config.notify, end)
    except Exception as exc:  # noqa: BLE001 - reporting the end must never change it
        log.warning("the end of run %s could not be reported (%s)", result.run_id, notify.one_line_error(exc))


def _scrubbed(value: Any) -> Any:
    """`value` with every string scrubbed (URL credentials, secret environment values): parameters an MLflow server keeps."""
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(item) for item in value]
    return scrub(value) if isinstance(value, str) else value


def _starting_point(config: PipelineConfig, store: ArtifactStore, result: PipelineResult) -> PipelineConfig:
    """The config this run trains from: the line's promoted model when it continues from it, else the config as written."""
    if config.line is None or config.line.continue_from != "promoted":
        return config
    lines.complete_gate_promotion(store, config.line.name)  # the line's last run may have stopped before production moved
    pointer = lines.production(store, config.line.name)
    if pointer is None:
        result.lines.append(f"[line] {config.line.name}: no promoted model yet; generation 1 starts from {config.model}")
        return config
    result.lines.append(
        f"[line] {config.line.name}: continues from generation {pointer.generation} (run {pointer.run_id}, {pointer.model})"
    )
    return replace(config, model=pointer.model, revision=None)


def _record_generation(config: PipelineConfig, store: ArtifactStore, result: PipelineResult, drop: str) -> None:
    """The promote step's decision as the line's generation record (and production, when it passed); exactly once per run."""
    decision = json.loads(read_output(store, result.manifests[PROMOTE], DECISION_FILE)[0])
    record, pointer = lines.record_decision(
        store,
        config.line.name,
        drop=Path(drop).name,
        run_id=result.run_id,
        starting_model={"uri": result.manifests[DOWNLOAD].parameters["model"], "sha256": _tree_digest(store, result.manifests[DOWNLOAD])},
        model=STAGE_BY_NAME[CPT].output("model", store, result.manifests[CPT]),
        decision=lines.PROMOTED if decision["passed"] else lines.REJECTED,
        reasons=decision["rules"],
    )
    if record.run_id != result.run_id:  # one decision per drop: a drop trained again (or taken over) is not decided twice
        result.lines.append(
            f"[line] {config.line.name}: drop {record.drop} was decided already, as generation {record.generation} by run "
            f"{record.run_id} ({record.decision}); this run's decision is not recorded"
        )
        return
    verdict = "promoted: production now" if pointer else "rejected: production stays where it was"
    result.lines.append(f"[line] {config.line.name}: generation {record.generation} (run {record.run_id}) {verdict}")


def _tree_digest(store: ArtifactStore, manifest: Manifest) -> str:
    """The sha256 of the starting model's content-addressed tree, as its download recorded it."""
    return read_summary(store, manifest)["model"]["tree"].removeprefix("sha256-")  # trees are named sha256-<hex>


def _run_stages(
    config: PipelineConfig,
    store: ArtifactStore,
    result: PipelineResult,
    only: str | None,
    from_stage: str | None,
    force: list[str] | tuple[str, ...],
    run: str | None,
    work_dir: Path | None,
    progress: bool | None,
    tracking: MlflowTarget | None = None,
) -> None:
    stages, run_id = config.stages, result.run_id
    first = only or from_stage or stages[0]
    selected = [only] if only else stages[stages.index(first) :]
    states: dict[str, State] = {}  # step -> its task run's final state, which the steps after it wait for

    def value_of(wire: From) -> Any:
        if wire.stage == PIPELINE_INPUTS:
            return config.inputs[wire.output]
        return STAGE_BY_NAME[wire.stage].output(wire.output, store, result.manifests[wire.stage])

    for step in config.steps:
        result.step = step.name
        if step.group not in selected:
            if stages.index(step.group) < stages.index(first) and step.qualifier is None:
                result.manifests[step.name] = upstream = _committed(store, run, step.name)
                record_reuse(store, upstream, run_id, step.name)
                result.lines.append(f"[{step.name}] from run {upstream.run_id}")
            continue
        if step.name in config.pins:  # the config pins this step to a committed run (a line's fixed selection, say)
            result.manifests[step.name] = pinned = _committed(store, config.pins[step.name].run_id, config.pins[step.name].step)
            record_reuse(store, pinned, run_id, step.name)
            result.lines.append(f"[{step.name}] pinned to run {pinned.run_id}")
            continue
        stage_config = step.config(config.options.get(step.stage.name, {}), value_of)
        context = StageContext(
            store, run_id=run_id, force=step.group in force, work_dir=work_dir, progress=progress, step=step.qualifier, tracking=tracking
        )
        wait_for = [states[name] for name in step.upstream if name in states]
        outcome, states[step.name] = run_step(step.stage.name, stage_config, context, config.execution_of(step.stage.name), wait_for)
        result.manifests[step.name] = outcome.manifest
        if step.qualifier is None:
            result.ran.append(step.name)
            if outcome.cached:
                result.cached.append(step.name)
        result.lines += [f"[{step.name}] {line}" for line in outcome.lines]
    if config.report and any(step.group in result.ran and step.stage.name == "evaluate" for step in config.steps):
        from stages.report import build_report

        result.step = "report"
        result.report = config.source.parent / REPORT_FILE
        prices, currency = (config.cost.prices, config.cost.currency) if config.cost else (None, "")
        build_report(store, run_id, result.report, overwrite=True, prices=prices, currency=currency)


def open_pipeline_store(config: PipelineConfig) -> ArtifactStore:
    uri = _store_uri(config)
    if not uri:
        from stages.base import settings

        raise InputError(f"{config.source}: store: missing, and ${settings.STORE_ENV} is not set; name the artifact store")
    return open_store(uri)  # a relative store: in the config is already relative to the config's folder (pipeline_config)


def _store_uri(config: PipelineConfig) -> str:
    """The config's store, else the default one ($SPECTRUM_STORE); empty when neither is set."""
    from stages.base import settings

    return config.store or settings.default_store() or ""


def _committed(store: ArtifactStore, run_id: str, stage: str) -> Manifest:
    try:
        return StageRef(run_id, stage).manifest(store)
    except ArtifactNotFoundError as exc:
        raise InputError(
            f"run {run_id} has no committed {stage} stage to build on; run the pipeline from {stage} (--from {stage}) or in full"
        ) from exc
