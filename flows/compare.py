"""compare as a flow: every arm's stages as the same stage tasks as the pipeline, then the comparison table.

For each estimator a Spectrum arm needs, the scan of MODEL is a step of the comparison run
(`snr_scan`, `snr_scan.gavish_donoho`); each arm is the run `<run>-<method>` (with --seeds over 1,
`<run>-<method>-s<seed>` per seed): layer_select (a Spectrum arm), cpt and evaluate. Each stage's
inputs come from the steps before it exactly as the stages declare them
(flows/pipeline_definition.py), MODEL and --data standing where the pipeline has its download;
each task waits on the steps whose outputs it takes, and runs in the execution mode `--execution`
gives its stage (default: cpt in a process of its own, so its peak memory is its own).
stages.compare decides each arm's own options and tabulates the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from prefect import flow
from prefect.states import State

from stages import compare, cpt, evaluate, layer_select, snr_scan
from stages.base.contracts import DOWNLOAD, SNR_SCAN
from stages.core.stage import PIPELINE_INPUTS, From, StageContext, StageResult
from stages.store import ArtifactStore, Manifest, open_store

from .pipeline_definition import STAGE_BY_NAME, PipelineStep
from .prefect_api import install_scrubbing, redacted, scrub
from .stage_tasks import EXECUTIONS, IN_PROCESS, run_step

SCAN = PipelineStep(snr_scan.STAGE)
ARM = (PipelineStep(layer_select.STAGE), PipelineStep(cpt.STAGE), PipelineStep(evaluate.STAGE, inputs=("cpt_run",)))


def run_compare(config: compare.CompareConfig, context: StageContext) -> StageResult[list[dict[str, Any]]]:
    """Run every arm (reusing what is committed) and commit the comparison run."""
    methods = compare.check(config)
    modes = compare.execution_modes(config, EXECUTIONS)
    context = context.with_run_id()
    store = context.store
    scans: dict[str, tuple[Manifest, State]] = {}
    for estimator in sorted({m.estimator for m in methods if m.top_percent is not None}):
        scan_config = SCAN.config({"estimator": estimator}, _inputs(config, store, {}))
        result, state = _step(SCAN, scan_config, context.as_step(compare.scan_step(estimator)), modes)
        scans[estimator] = (result.manifest, state)
    arms = []
    for seed in config.training_seeds:  # every arm of one seed before the next: an interrupted comparison has whole seeds
        for method in methods:
            arm_context = replace(context, run_id=compare.arm_run_id(context.run_id, method, seed, config), step=None)
            options = compare.stage_options(method, config, seed)
            done: dict[str, tuple[Manifest, State]] = {SNR_SCAN: scans[method.estimator]} if SNR_SCAN in options else {}
            for step in ARM:
                if step.stage.name not in options:
                    continue
                stage_config = step.config(options[step.stage.name], _inputs(config, store, {k: m for k, (m, _) in done.items()}))
                after = [done[name][1] for name in step.upstream if name in done]
                result, state = _step(step, stage_config, arm_context, modes, after)
                done[step.name] = (result.manifest, state)
            arms.append(compare.Arm(method, seed, done[cpt.STAGE.name][0], done[evaluate.STAGE.name][0]))
    return compare.tabulate(config, context, arms)


def _inputs(config: compare.CompareConfig, store: ArtifactStore, manifests: Mapping[str, Manifest]):
    """The value of a wired input in an arm: MODEL and --data where a pipeline has its download, else an earlier step's
    output (None when the arm has no such step: a full or LoRA arm has no selection)."""

    def value_of(wire: From) -> Any:
        if wire.stage in (PIPELINE_INPUTS, DOWNLOAD):
            return {"model": config.model, "data": config.data}.get(wire.output)
        manifest = manifests.get(wire.stage)
        return None if manifest is None else STAGE_BY_NAME[wire.stage].output(wire.output, store, manifest)

    return value_of


def _step(
    step: PipelineStep, config, context: StageContext, modes: Mapping[str, str], after: list[State] = ()
) -> tuple[StageResult, State]:
    return run_step(step.stage.name, config, context, modes.get(step.stage.name, IN_PROCESS), after)


@flow(name="spectrum-compare")
@redacted
def compare_flow(
    options: dict[str, Any], store: str, run_id: str | None = None, force: bool = False, work_dir: str | None = None
) -> dict[str, Any]:
    """The comparison of `options` (CompareConfig's fields) in `store`; returns its run and rows."""
    install_scrubbing()
    config = compare.CompareConfig(**options)
    context = StageContext(open_store(store), run_id=run_id, force=force, work_dir=work_dir, progress=False)
    result = run_compare(config, context)
    return {"run_id": result.run_id, "cached": result.cached, "rows": result.detail, "lines": [scrub(line) for line in result.lines]}
