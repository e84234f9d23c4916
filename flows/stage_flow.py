"""One stage as a flow of its own, deployable alone: `spectrum-stage` with the stage's name and options.

A deployment per stage (prefect.yaml) fixes `stage`; a run passes the stage's options as its
config fields (the same names as in a pipeline config), the store and the run to record under.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.store import open_store
from stages.tracking import MlflowTarget

from .pipeline_definition import STAGE_BY_NAME
from .prefect_api import install_scrubbing, redacted
from .stage_tasks import IN_PROCESS, run_step


@flow(name="spectrum-stage")
@redacted
def stage_flow(
    stage: str,
    options: dict[str, Any],
    store: str,
    run_id: str | None = None,
    step: str | None = None,
    force: bool = False,
    tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `stage` with `options` in `store`; returns where its manifest is and whether it was reused.

    `tracking`: {tracking_uri, experiment, parent_run_id} of the MLflow run to log the stage in (MlflowTarget.to_dict).
    """
    install_scrubbing()
    if stage not in STAGE_BY_NAME:
        raise InputError(f"unknown stage {stage!r}; the stages are {', '.join(STAGE_BY_NAME)}")
    definition = STAGE_BY_NAME[stage]
    try:
        config = definition.config(**options)
    except TypeError as exc:
        raise InputError(f"options of {stage}: {exc}") from exc
    if definition.check is not None:
        definition.check(config)
    target = MlflowTarget(**tracking) if tracking else None
    context = StageContext(open_store(store), run_id=run_id, step=step, force=force, progress=False, tracking=target)
    result, _ = run_step(stage, config, context, IN_PROCESS)
    return {"run_id": result.manifest.run_id, "stage": result.manifest.stage, "cached": result.cached, "lines": list(result.lines)}
