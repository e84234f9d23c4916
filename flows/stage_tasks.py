"""A stage as a Prefect task, in each of the three ways it can run; the pipeline, compare and the stage flow all use these.

- in-process: the stage's own `run` in this process;
- subprocess: `python -m stages.<stage> …` in a process of its own, exactly what its container runs;
- deployment: a flow run of its `spectrum-stage/<stage>` deployment, on that deployment's work pool
  (the GPU pool for cpt, sft and evaluate).

Each task run is named after its step (`cpt`, `evaluate.sft`), and `run_step` passes the upstream
steps' task states as `wait_for`, so a flow run's graph in Prefect is the pipeline's graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import State

from stages.base.errors import InputError
from stages.core.process import StageProcessError, run_in_own_process
from stages.core.stage import StageConfig, StageContext, StageResult
from stages.store import StageRef, StoreUnavailableError

from .pipeline_definition import STAGE_BY_NAME
from .prefect_api import redacted, scrub

IN_PROCESS, SUBPROCESS, DEPLOYMENT = "in-process", "subprocess", "deployment"
EXECUTIONS = (IN_PROCESS, SUBPROCESS, DEPLOYMENT)


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


def _step_run_name(parameters: dict[str, Any]) -> str:
    """A task run is named after the stage or step it runs (`cpt`, `evaluate.sft`), so Prefect's UI shows which failed."""
    return parameters["context"].step_name(parameters["stage_name"])


def _stage(stage_name: str):
    if stage_name not in STAGE_BY_NAME:
        raise InputError(f"unknown stage {stage_name!r}; the stages are {', '.join(STAGE_BY_NAME)}")
    return STAGE_BY_NAME[stage_name]


@task(name="stage", task_run_name=_step_run_name, cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient)
@redacted
def run_stage(stage_name: str, config: StageConfig, context: StageContext) -> StageResult:
    return _logged(_stage(stage_name).run(config, context))


@task(name="stage-process", task_run_name=_step_run_name, cache_policy=NONE)
@redacted
def run_stage_process(stage_name: str, config: StageConfig, context: StageContext) -> StageResult:
    """Not retried here: the child's own failure is all the parent sees (StageProcessError), so it cannot tell a store
    outage from a bad input; running again reuses what it committed."""
    return _logged(run_in_own_process(_stage(stage_name), config, context, context.step_name(stage_name)))


@task(name="stage-deployment", task_run_name=_step_run_name, cache_policy=NONE)
@redacted
def run_stage_deployment(stage_name: str, config: StageConfig, context: StageContext) -> StageResult:
    """A flow run of the stage's deployment; its outcome is what the store holds for the run afterwards.

    run_deployment does not return the child's result, so the manifest is read from the store (the
    stage's own, or the reuse record of a committed one); it was reused when it is another run's.
    """
    from prefect.deployments import run_deployment

    context = context.with_run_id()
    parameters = {
        "stage": stage_name,
        "options": config.plain_options(),
        "store": context.store.root_uri,
        "run_id": context.run_id,
        "step": context.step,
        "force": context.force,
        "tracking": context.tracking.to_dict() if context.tracking else None,
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
    manifest = StageRef(context.run_id, context.step_name(stage_name)).manifest(context.store)
    line = f"{manifest.stage}: flow run {flow_run.name} of deployment spectrum-stage/{stage_name} -> run {manifest.run_id}"
    return _logged(StageResult(stage_name, (line,), manifest, cached=manifest.run_id != context.run_id))


TASKS = {IN_PROCESS: run_stage, SUBPROCESS: run_stage_process, DEPLOYMENT: run_stage_deployment}


def run_step(
    stage_name: str, config: StageConfig, context: StageContext, execution: str, wait_for: Sequence[State] = ()
) -> tuple[StageResult, State]:
    """Run one step as the task of its execution mode, after its upstream steps; returns its result and its task state."""
    state = TASKS[execution](stage_name, config, context, wait_for=list(wait_for), return_state=True)
    return state.result(), state
