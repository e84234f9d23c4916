"""compare as a flow: every arm's stages as the same stage tasks as the pipeline, then the comparison table.

For each estimator a Spectrum arm needs, the scan of MODEL is a step of the comparison run
(`snr_scan`, `snr_scan.gavish_donoho`); each arm is the run `<run>-<method>`: layer_select (a
Spectrum arm), cpt and evaluate, each waiting on the step whose output it takes, in the execution
mode `--execution` gives its stage (default: cpt in a process of its own, so its peak memory is
its own). stages.compare decides what each arm runs and tabulates the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from prefect import flow
from prefect.states import State

from stages import compare
from stages.base.contracts import CPT, EVALUATE, LAYER_SELECT, SNR_SCAN
from stages.core.stage import StageContext, StageResult
from stages.store import StageRef, open_store

from .prefect_api import install_scrubbing, redacted, scrub
from .stage_tasks import EXECUTIONS, IN_PROCESS, run_step


def run_compare(config: compare.CompareConfig, context: StageContext) -> StageResult[list[dict[str, Any]]]:
    """Run every arm (reusing what is committed) and commit the comparison run."""
    methods = compare.check(config)
    modes = compare.execution_modes(config, EXECUTIONS)
    context = context.with_run_id()
    scans: dict[str, tuple[StageRef, State]] = {}
    for estimator in sorted({m.estimator for m in methods if m.top_percent is not None}):
        scan_context = context.as_step(compare.scan_step(estimator))
        result, state = _step(SNR_SCAN, compare.scan_config(config, estimator), scan_context, modes)
        scans[estimator] = (StageRef.of(result.manifest), state)
    arms = []
    for method in methods:
        arm_context = replace(context, run_id=compare.arm_run_id(context.run_id, method), step=None)
        selection, after = None, []
        if method.top_percent is not None:
            scan, scanned = scans[method.estimator]
            selected, state = _step(LAYER_SELECT, compare.selection_config(method, scan), arm_context, modes, [scanned])
            selection, after = StageRef.of(selected.manifest), [state]
        trained, state = _step(CPT, compare.training_config(method, config, selection), arm_context, modes, after)
        evaluated, _ = _step(EVALUATE, compare.evaluation_config(config, StageRef.of(trained.manifest)), arm_context, modes, [state])
        arms.append(compare.Arm(method, trained.manifest, evaluated.manifest))
    return compare.tabulate(config, context, arms)


def _step(stage: str, config, context: StageContext, modes: Mapping[str, str], after: list[State] = ()) -> tuple[StageResult, State]:
    return run_step(stage, config, context, modes.get(stage, IN_PROCESS), after)


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
