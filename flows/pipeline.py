"""The Prefect pipeline: download → snr_scan → layer_select → cpt → sft → evaluate (+ report), one run id.

Each stage is a Prefect task that calls the stage's own `run` (stages/ never imports Prefect),
with the config built from the pipeline config and the manifests of the stages before it. A
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

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from stages import cpt, download, evaluate, layer_select, sft, snr_scan
from stages.base.contracts import CPT, DOWNLOAD, EVALUATE, LAYER_SELECT, PIPELINE_LEASE, SFT, SNR_SCAN
from stages.base.documents import clip
from stages.base.errors import InputError
from stages.core.process import StageProcessError, run_in_own_process
from stages.core.stage import StageConfig, StageContext, StageResult, options_of
from stages.store import ArtifactStore, Manifest, StoreUnavailableError, load_manifest, new_run_id, open_store, record_reuse
from stages.store.errors import ArtifactNotFoundError
from stages.store.lease import LeaseHeldError, acquire_lease, holder_identity
from stages.store.manifest import lease_folder

from .pipeline_config import STAGE_BY_NAME, PipelineConfig, check_rerun, load_pipeline_config
from .prefect_api import install_scrubbing, redacted, scrub

REPORT_FILE = "report.html"


@dataclass
class PipelineResult:
    run_id: str
    store: str
    manifests: dict[str, Manifest] = field(default_factory=dict)  # stage -> the manifest it committed or reused
    ran: list[str] = field(default_factory=list)  # stages executed by this invocation (computed or reused)
    cached: list[str] = field(default_factory=list)  # of those, the ones whose committed run was reused
    lines: list[str] = field(default_factory=list)
    report: Path | None = None


def _transient(task, task_run, state) -> bool:
    """Retry only what another try can fix: the store (S3, network) being unavailable."""
    try:
        state.result()
    except StoreUnavailableError:
        return True
    except Exception:
        return False
    return False


def _logged(result: StageResult) -> StageResult:
    for line in result.lines:
        get_run_logger().info("%s", scrub(line))
    return result


def _stage_run_name(parameters: dict[str, Any]) -> str:
    """A task run is named after the stage or step it runs (`cpt`, `evaluate.sft`), so Prefect's UI shows which failed."""
    return parameters["context"].step_name(parameters["stage_name"])


@task(name="stage", task_run_name=_stage_run_name, cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient)
@redacted
def run_stage(stage_name: str, config: StageConfig, context: StageContext) -> StageResult:
    return _logged(STAGE_BY_NAME[stage_name].run(config, context))


@task(name="stage-process", task_run_name=_stage_run_name, cache_policy=NONE)
@redacted
def run_stage_process(stage_name: str, config: StageConfig, context: StageContext) -> StageResult:
    """The stage as its container runs it: `python -m stages.<stage> …` in a process of its own.

    Not retried here: the child's own failure is all the parent sees (StageProcessError), so it
    cannot tell a store outage from a bad input; running the pipeline again reuses what it committed.
    """
    return _logged(run_in_own_process(STAGE_BY_NAME[stage_name], config, context, stage_name))


@task(name="stage-deployment", task_run_name=_stage_run_name, cache_policy=NONE)
@redacted
def run_stage_deployment(stage_name: str, config: StageConfig, context: StageContext) -> StageResult:
    """A flow run of the stage's deployment (`spectrum-stage/<stage>`) on its work pool; its manifest is read from the store.

    run_deployment does not return the child's result, so the outcome is what the store holds
    for the run afterwards (the stage's own manifest, or the reuse record of a committed one).
    """
    from prefect.deployments import run_deployment

    parameters = {
        "stage": stage_name,
        "options": {f.name: getattr(config, f.name) for f, _ in options_of(type(config))},
        "store": context.store.root_uri,
        "run_id": context.run_id,
        "step": context.step,
        "force": context.force,
    }
    if scrub(repr(parameters)) != repr(parameters):  # flow run parameters are stored by the Prefect server and shown in its UI
        raise InputError(
            f"the {stage_name} stage's options or store name a credential; a deployment's parameters are stored by Prefect: "
            "pass credentials through the worker's environment (AWS_ACCESS_KEY_ID, HF_TOKEN, …) instead"
        )
    flow_run = run_deployment(f"spectrum-stage/{stage_name}", parameters=parameters, poll_interval=1)
    if not flow_run.state or not flow_run.state.is_completed():
        raise StageProcessError(
            f"the {stage_name} deployment's flow run {flow_run.name} ended {flow_run.state.name if flow_run.state else 'unknown'}"
        )
    manifest = load_manifest(context.store, context.run_id, context.step_name(STAGE_BY_NAME[stage_name].name))
    line = f"{manifest.stage}: flow run {flow_run.name} of deployment spectrum-stage/{stage_name} -> run {manifest.run_id}"
    return _logged(StageResult(stage_name, (line,), manifest, cached=manifest.run_id != context.run_id))


@flow(name="spectrum-pipeline")
@redacted
def pipeline_flow(
    config_path: str, only: str | None = None, from_stage: str | None = None, force: list[str] | None = None, run: str | None = None
) -> dict[str, Any]:
    """The whole pipeline for one config (a deployment's parameters are these arguments)."""
    install_scrubbing()
    config = load_pipeline_config(config_path)
    result = run_pipeline(config, only=only, from_stage=from_stage, force=force or [], run=run)
    from .artifacts import publish_artifacts

    artifacts = publish_artifacts(open_pipeline_store(config), result)
    return {
        "artifacts": artifacts,
        "run_id": result.run_id,
        "stages": {s: m.run_id for s, m in result.manifests.items()},  # the run that did each stage's work
        "ran": result.ran,
        "cached": result.cached,
        "report": str(result.report) if result.report else None,
        "lines": [scrub(line) for line in result.lines],
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
    execute: Callable[[str, StageConfig, StageContext], StageResult] | None = None,
) -> PipelineResult:
    """Run the stages of `config` in order (see the module docstring); `execute` runs one stage (default: the Prefect task).

    The run holds the lease runs/<run>/pipeline/lease/ for its lifetime (one live pipeline per run id),
    renewed while it works and released with its outcome: succeeded, failed (with the reason) or interrupted.
    """
    check_rerun(config, only, from_stage, force, run)
    store = open_pipeline_store(config)
    rerun = bool(only or from_stage)
    result = PipelineResult(run_id=new_run_id() if rerun else run or config.run_id or new_run_id(), store=store.root_uri)
    try:
        lease = acquire_lease(
            store, lease_folder(result.run_id, PIPELINE_LEASE), holder_identity(run_id=result.run_id, stage=PIPELINE_LEASE)
        )
    except LeaseHeldError as exc:
        raise LeaseHeldError(
            f"run {result.run_id!r} is being run by another pipeline ({exc}); nothing was done: wait for it (`spectrum runs` "
            "shows it), or run under another run id"
        ) from None
    with lease.held(reason=lambda exc: clip(scrub(str(exc)), 1000)):
        _run_stages(config, store, result, only, from_stage, force, run, work_dir, progress, execute)
    return result


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
    execute: Callable[[str, StageConfig, StageContext], StageResult] | None,
) -> None:
    stages, run_id = config.stages, result.run_id
    first = only or from_stage or stages[0]
    selected = [only] if only else stages[stages.index(first) :]
    modes = {"in-process": run_stage, "subprocess": run_stage_process, "deployment": run_stage_deployment}

    def runner(name: str) -> Callable[[str, StageConfig, StageContext], StageResult]:
        return execute or modes[config.execution_of(name)]

    for name in stages:
        if name not in selected:
            if stages.index(name) < stages.index(first):
                result.manifests[name] = upstream = _committed(store, run, name)
                record_reuse(store, upstream, run_id, name)
                result.lines.append(f"[{name}] from run {upstream.run_id}")
            continue
        stage_config = _config_for(name, config, result.manifests, store)
        context = StageContext(store, run_id=run_id, force=name in force, work_dir=work_dir, progress=progress)
        outcome = runner(name)(name, stage_config, context)
        result.manifests[name] = outcome.manifest
        result.ran.append(name)
        if outcome.cached:
            result.cached.append(name)
        result.lines += [f"[{name}] {line}" for line in outcome.lines]
        if name == SFT:  # the sft model is evaluated too, as the step evaluate.sft (domain numbers come from cpt's evaluation)
            sft_evaluation = _evaluate_config(config, sft_run=_ref(outcome.manifest))
            evaluation = runner(EVALUATE)(EVALUATE, sft_evaluation, replace(context, step=SFT))
            result.lines += [f"[{EVALUATE}.{SFT}] {line}" for line in evaluation.lines]
    if config.report and EVALUATE in result.ran:
        from stages.report import build_report

        result.report = config.source.parent / REPORT_FILE
        build_report(store, run_id, result.report, overwrite=True)


def open_pipeline_store(config: PipelineConfig) -> ArtifactStore:
    from stages.base import settings

    uri = config.store or settings.default_store()
    if not uri:
        raise InputError(f"{config.source}: store: missing, and ${settings.STORE_ENV} is not set; name the artifact store")
    return open_store(uri)  # a relative store: in the config is already relative to the config's folder (pipeline_config)


def _committed(store: ArtifactStore, run_id: str, stage: str) -> Manifest:
    try:
        return load_manifest(store, run_id, stage)
    except ArtifactNotFoundError as exc:
        raise InputError(
            f"run {run_id} has no committed {stage} stage to build on; run the pipeline from {stage} (--from {stage}) or in full"
        ) from exc


def _ref(manifest: Manifest) -> str:
    return f"{manifest.run_id}/{manifest.stage}"


def _config_for(name: str, config: PipelineConfig, upstream: dict[str, Manifest], store: ArtifactStore) -> StageConfig:
    """The stage's config: its options from the pipeline config, and what the stages before it produced."""
    options = dict(config.options.get(name, {}))
    if name == DOWNLOAD:
        return download.DownloadConfig(model=config.model, revision=config.revision, data=config.data, **options)
    stored = download.read_summary(store, upstream[DOWNLOAD])
    model, data = stored["model"]["uri"], stored["data"]["uri"]
    if name == SNR_SCAN:
        return snr_scan.ScanConfig(model_dir=model, **options)
    if name == LAYER_SELECT:
        return layer_select.SelectConfig(snr_run=_ref(upstream[SNR_SCAN]), **options)
    if name == CPT:
        return cpt.CptConfig(model=model, data=data, selection_run=_ref(upstream[LAYER_SELECT]), **options)
    if name == SFT:
        trained = upstream[CPT]
        model_uri = f"store:runs/{trained.run_id}/{trained.stage}/model"
        return sft.SftConfig(model=model_uri, selection_run=_ref(upstream[LAYER_SELECT]), **options)
    if name == EVALUATE:
        return _evaluate_config(config, cpt_run=_ref(upstream[CPT]))
    raise InputError(f"unknown pipeline stage {name}")


def _evaluate_config(config: PipelineConfig, **run: str) -> evaluate.EvaluateConfig:
    options = dict(config.options.get(EVALUATE, {}))
    if "sft_run" in run:
        options.pop("data", None)  # the domain data is cpt's held-out split, evaluated with the cpt run
    return evaluate.EvaluateConfig(**run, **options)
