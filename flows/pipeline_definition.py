"""The pipeline, declared once: its steps in order. What flows between them comes from the stages' own declarations.

Each stage states, on its options, which upstream output fills them (`option(wired=From(...))`,
stages.core.stage). A step here is a stage, possibly as a qualified step (`evaluate.sft`), and
the wired options it takes; everything else — the pipeline config's checks, each step's config,
the order and the Prefect graph — is derived from these two declarations.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from stages import cpt, download, evaluate, layer_select, promote, sft, snr_scan
from stages.base.contracts import SFT, step_name
from stages.core.stage import PIPELINE_INPUTS, From, Stage, StageConfig, is_stage_ref, options_of, wires_of
from stages.store import StageRef


@dataclass(frozen=True)
class PipelineStep:
    stage: Stage
    qualifier: str | None = None  # the step `<stage>.<qualifier>` (evaluate.sft: the evaluation of what sft trained)
    inputs: tuple[str, ...] | None = None  # the wired options it fills (None: all of the stage's)
    leaves_out: tuple[str, ...] = ()  # options of the stage's config section this step does not take
    optional: bool = False  # runs only when its stage has a section in the pipeline config

    @property
    def name(self) -> str:
        return step_name(self.stage.name, self.qualifier)

    @property
    def group(self) -> str:
        """The stage a user names for it (--only, --from, --force): a step qualified by an upstream stage goes with that stage."""
        return self.qualifier if self.qualifier in STAGE_BY_NAME else self.stage.name

    @property
    def wires(self) -> dict[str, From]:
        return {name: wire for name, wire in wires_of(self.stage.config).items() if self.inputs is None or name in self.inputs}

    @property
    def upstream(self) -> list[str]:
        """The steps whose outputs it takes, in pipeline order."""
        return sorted({w.stage for w in self.wires.values() if w.stage != PIPELINE_INPUTS}, key=STEP_ORDER.index)

    def config(self, options: Mapping[str, Any], value_of: Callable[[From], Any]) -> StageConfig:
        """Its config: the options from the pipeline config, and each wired input's value."""
        taken = {k: v for k, v in options.items() if k not in self.leaves_out}
        return self.stage.config(**{name: value_of(wire) for name, wire in self.wires.items()}, **taken)

    def placeholder_config(self, options: Mapping[str, Any], inputs: Mapping[str, Any]) -> StageConfig:
        """Its config before anything ran (for the stage's own checks): stand-ins for what upstream stages will produce."""
        hints = typing.get_type_hints(self.stage.config)
        names = {wire: name for name, wire in self.wires.items()}

        def stand_in(wire: From) -> Any:
            if wire.stage == PIPELINE_INPUTS:
                return inputs.get(wire.output)
            return StageRef("run", wire.stage) if is_stage_ref(hints[names[wire]]) else wire.output

        return self.config(options, stand_in)


PIPELINE = (
    PipelineStep(download.STAGE),
    PipelineStep(snr_scan.STAGE),
    PipelineStep(layer_select.STAGE),
    PipelineStep(cpt.STAGE),
    PipelineStep(sft.STAGE, optional=True),
    # The sft model is evaluated too; its domain numbers are cpt's (its own held-out chats are its data).
    PipelineStep(evaluate.STAGE, qualifier=SFT, inputs=("sft_run",), leaves_out=("data",)),
    PipelineStep(evaluate.STAGE, inputs=("cpt_run",)),
    # The promotion gate, when the config declares one (gate:): its decision advances a model line.
    PipelineStep(promote.STAGE, optional=True),
)
STAGE_BY_NAME: dict[str, Stage] = {step.stage.name: step.stage for step in PIPELINE}
STEP_ORDER = [step.name for step in PIPELINE]


def steps_of(configured: set[str]) -> list[PipelineStep]:
    """The steps a pipeline with these stage sections runs: optional stages only when configured, and a step only
    when every step it takes an output from runs too."""
    steps: list[PipelineStep] = []
    for step in PIPELINE:
        present = {s.name for s in steps}
        if (not step.optional or step.stage.name in configured) and all(u in present for u in step.upstream):
            steps.append(step)
    return steps


def settable_options(stage: Stage) -> list[str]:
    """The options a pipeline config may set for a stage: neither wired nor for local files only."""
    return [f.name for f, spec in options_of(stage.config) if spec.settable_in_pipeline]


def path_options(stage: Stage) -> set[str]:
    return {f.name for f, spec in options_of(stage.config) if spec.path}
