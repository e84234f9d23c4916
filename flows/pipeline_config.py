"""The pipeline config (YAML): what to train, where, and each stage's options, checked before anything runs.

    model: HuggingFaceTB/SmolLM2-135M-Instruct   # a hub id (with revision), a folder or a store URI
    revision: <commit>                           # hub ids only
    data: drops/2026-11                          # the CPT drop: a folder or a store URI
    store: s3://spectrum-artifacts/prod          # default: $SPECTRUM_STORE
    stages:                                      # options of each stage, named as its config fields
      layer_select: {top_percent: 25}
      cpt: {max_steps: 200, seq_len: 1024}
      sft: {data: chats/, max_steps: 100}        # leave sft out to skip it
      evaluate: {max_tokens: 32768}
    report: true                                 # write report.html beside the config (default true)
    execution: in-process                        # subprocess, deployment, or per stage: {cpt: deployment}
    gate:                                        # the promote stage after evaluate: the rules a model must pass
      heldout_perplexity: {max_relative_change: -0.01}
      general_perplexity: {max_relative_change: 0.05}
    line: {name: acme-legal, continue_from: promoted}   # each drop continues from the line's promoted model
    pin: {layer_select: RUN}                     # use RUN's committed selection instead of selecting again
    tracking: {mlflow: {tracking_uri: http://mlflow:5000, experiment: spectrum}}   # an MLflow run per pipeline run
    notify: {webhook: https://hooks.example.com/…, on: [failed, completed]}        # a JSON summary posted at the end
    cost: {price_per_device_hour: {cuda: 4.5, cpu: 0.05}, currency: "$"}           # GPU-hours priced

Every stage runs, in pipeline order (flows/pipeline_definition.py), except sft, which runs only
when it is configured. The options a pipeline wires from one stage to the next (MODEL, --snr-run,
--selection-run, --cpt-run …: declared on the stages' options) and those for local files only
(--out-dir, a selection file) cannot be set here. A mistake names the field: `stages.cpt.max_step: not an option
of cpt (did you mean max_steps?)`. `execution: subprocess` runs a stage as
`python -m stages.<stage> …` in a process of its own, exactly the command its container runs;
`execution: deployment` runs it as a flow run of its `spectrum-stage/<stage>` deployment, on
that deployment's work pool (the GPU pool for cpt, sft and evaluate). tracking:, notify: and cost:
are optional and off when absent (flows/integration_settings.py).
"""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from stages.base.contracts import CPT, LAYER_SELECT, PROMOTE, SFT
from stages.base.documents import clip, load_yaml_file, shown
from stages.base.errors import InputError
from stages.core.stage import PIPELINE_INPUTS, Stage, options_of
from stages.promotion.gate import parse_gate
from stages.selection.fit import SETUP_OPTIONS
from stages.store import StageRef
from stages.store.keys import validate_name
from stages.store.uri import parse_store_uri, uri_scheme
from stages.tracking import MlflowTarget
from stages.weights.hub import HUB_ID

from .config_keys import key_name, suggest
from .integration_settings import CostSettings, NotifySettings, parse_cost, parse_notify, parse_tracking
from .pipeline_definition import STAGE_BY_NAME, PipelineStep, path_options, settable_options, steps_of

TOP_KEYS = (
    "model", "revision", "data", "store", "run_id", "stages", "report", "execution", "line", "gate", "pin", "tracking", "notify", "cost",
)  # fmt: skip
PINNABLE = ("snr_scan", "layer_select")  # steps a config may fix to a committed run instead of running them
LINE_KEYS = ("name", "continue_from")
CONTINUE_FROM = ("promoted", "base")
EXECUTIONS = ("in-process", "subprocess", "deployment")
MAX_CONFIG_BYTES = 1024 * 1024  # a pipeline config is a page of YAML
MAX_CONFIG_VALUES = 100_000  # values with every YAML alias expanded
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # a URI (store:, s3://, https://, a mistyped one): not a path


@dataclass(frozen=True)
class LineSettings:
    """`line: {name: acme-legal, continue_from: promoted}`: each drop continues from the line's promoted model."""

    name: str
    continue_from: str = "promoted"  # or base: every drop from the config's model


@dataclass(frozen=True)
class PipelineConfig:
    model: str
    data: str
    source: Path  # the config file (the report goes beside it)
    revision: str | None = None
    store: str | None = None
    run_id: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its options as written
    report: bool = True
    execution: dict[str, str] = field(default_factory=dict)  # stage -> how it runs (default in-process)
    line: LineSettings | None = None  # the model line whose next generation this pipeline trains
    pins: dict[str, StageRef] = field(default_factory=dict)  # step -> the committed run it is fixed to (pin:)
    tracking: MlflowTarget | None = None  # tracking.mlflow: an MLflow run per pipeline run, a nested run per stage
    notify: NotifySettings | None = None  # a webhook posted at the run's end
    cost: CostSettings | None = None  # the price per device-hour the run's totals are priced with

    def execution_of(self, stage: str) -> str:
        return self.execution.get(stage, "in-process")

    @property
    def steps(self) -> list[PipelineStep]:
        """The steps this pipeline runs, in order (sft and the evaluation of its model only when sft is configured)."""
        return steps_of(set(self.options))

    @property
    def stages(self) -> list[str]:
        """The stages this pipeline runs, in order: what --only, --from and --force name."""
        return list(dict.fromkeys(step.group for step in self.steps))

    @property
    def inputs(self) -> dict[str, str | None]:
        """The pipeline's own inputs, which the first stage takes (From(PIPELINE_INPUTS, name))."""
        return {"model": self.model, "revision": self.revision, "data": self.data}


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise InputError(f"the pipeline config {path} does not exist")
    document = load_yaml_file(path, max_bytes=MAX_CONFIG_BYTES, max_nodes=MAX_CONFIG_VALUES)
    return parse_pipeline_config(document, path)


def parse_pipeline_config(document: Any, source: Path) -> PipelineConfig:
    where = str(source)
    if not isinstance(document, dict):
        raise InputError(f"{where}: a pipeline config is a mapping (model:, data:, stages: …), not {type(document).__name__}")
    unknown = [k for k in document if k not in TOP_KEYS]
    if unknown:
        raise InputError(
            f"{where}: {key_name(unknown[0])}: not a pipeline setting{suggest(unknown[0], TOP_KEYS)}; "
            f"the settings are {', '.join(TOP_KEYS)}"
        )
    for key in ("model", "data"):
        if not isinstance(document.get(key), str) or not document[key].strip():
            raise InputError(f"{where}: {key}: missing; name the {'base model' if key == 'model' else 'data drop'} (a folder or store URI)")
    for key in ("revision", "store", "run_id"):
        if document.get(key) is not None and not isinstance(document[key], str):
            raise InputError(f"{where}: {key}: expected text, found {shown(document[key])}")
    if not isinstance(document.get("report", True), bool):
        raise InputError(f"{where}: report: expected true or false, found {shown(document['report'])}")
    stages = document.get("stages") or {}
    if not isinstance(stages, dict):
        raise InputError(f"{where}: stages: expected a mapping of stage name to options")
    options = {}
    for name, values in stages.items():
        if name not in STAGE_BY_NAME:
            raise InputError(
                f"{where}: stages.{key_name(name)}: not a stage{suggest(name, STAGE_BY_NAME)}; the stages are {', '.join(STAGE_BY_NAME)}"
            )
        options[name] = _stage_options(STAGE_BY_NAME[name], values or {}, f"{where}: stages.{name}")
    if PROMOTE in options:
        raise InputError(f"{where}: stages.promote: the promotion gate is declared at the top, as gate: (its rules per metric)")
    if document.get("gate") is not None:
        options[PROMOTE] = {"rules": parse_gate(document["gate"], f"{where}: gate").to_rules()}
    if document.get("line") is not None and PROMOTE not in options:
        raise InputError(f"{where}: gate: missing; a model line promotes a generation only when it passes a gate (its rules per metric)")
    if SFT in options and "data" not in options[SFT]:
        raise InputError(f"{where}: stages.sft.data: missing; sft trains on chat data (a folder or store URI)")
    _fit_at_training_setup(options, where)
    folder = source.parent
    for name, values in options.items():
        for key in path_options(STAGE_BY_NAME[name]) & values.keys():
            values[key] = _path_value(values[key], folder)
    inputs = {"model": document["model"], "revision": document.get("revision"), "data": document["data"]}
    for step in steps_of(set(options)):  # every step's own checks, the ones left at their defaults too
        _check(step, options.get(step.stage.name, {}), inputs, f"{where}: stages.{step.stage.name}")
    return PipelineConfig(
        execution=_execution(document.get("execution", "in-process"), where),
        model=_path_value(document["model"], folder, hub_id=True),
        data=_path_value(document["data"], folder),
        source=source,
        revision=document.get("revision"),
        store=_store_value(document.get("store"), folder, where),
        run_id=document.get("run_id"),
        options=options,
        report=document.get("report", True),
        line=_line(document.get("line"), where),
        pins=_pins(document.get("pin"), options, where),
        tracking=parse_tracking(document.get("tracking"), folder, where),
        notify=parse_notify(document.get("notify"), where),
        cost=parse_cost(document.get("cost"), where),
    )


def _fit_at_training_setup(options: dict[str, dict[str, Any]], where: str) -> None:
    """A selection fit to GPU memory plans at the setup cpt trains with: stated once, in stages.cpt.

    layer_select's setup options (seq_len, micro_batch_size, zero_stage, gradient_checkpointing) are
    filled from cpt's; one stated in both with another value is refused (the fit would plan a run
    that never happens). gpus stays layer_select's own: cpt's launcher decides it.
    """
    select = options.get(LAYER_SELECT)
    if not select or select.get("fit_gpu_memory") is None:
        return
    defaults = {f.name: f.default for f, _ in options_of(STAGE_BY_NAME[CPT].config)}
    training = {**defaults, **options.get(CPT, {})}
    for name in SETUP_OPTIONS.keys() & training.keys():
        if name in select and select[name] != training[name]:
            raise InputError(
                f"{where}: stages.layer_select.{name}: {shown(select[name])}, but cpt trains with {name} {shown(training[name])}; "
                f"the memory fit plans cpt's run: state {name} once, in stages.cpt"
            )
        select[name] = training[name]


def _path_value(value: str | None, folder: Path, hub_id: bool = False) -> str | None:
    """A relative path against the config's folder (not the working directory); URIs, absolute paths and hub ids as written."""
    if value is None or _SCHEME.match(value) or Path(value).expanduser().is_absolute():
        return os.path.expanduser(value) if value is not None and value.startswith("~") else value
    if hub_id and HUB_ID.fullmatch(value) and not value.startswith(".") and not (folder / value).exists():
        return value  # org/name: a Hugging Face hub id, unless the config's folder holds such a folder
    return os.path.abspath(folder / value)


def _store_value(value: str | None, folder: Path, where: str) -> str | None:
    if value is None:
        return None
    try:
        if uri_scheme(value) is None:
            value = os.path.abspath(folder / os.path.expanduser(value))
        parse_store_uri(value)
    except InputError as exc:
        raise InputError(f"{where}: store: {clip(str(exc), 300)}") from None
    return value


def check_rerun(
    config: PipelineConfig, only: str | None, from_stage: str | None, force: list[str] | tuple[str, ...], run: str | None
) -> None:
    """--only/--from/--force name stages of this pipeline, and re-runs name the committed run they build on."""
    stages = config.stages
    for name, flag in ((only, "--only"), (from_stage, "--from"), *((f, "--force") for f in force)):
        if name is not None and name not in stages:
            raise InputError(f"{flag} {key_name(name)}: not a stage of this pipeline; its stages are {', '.join(stages)}")
    if only and from_stage:
        raise InputError("pass --only or --from, not both")
    if (only or from_stage) and not run:
        raise InputError(f"{'--only' if only else '--from'} re-runs a stage of a committed run: name it with --run RUN")


def _pins(value: Any, options: dict[str, dict[str, Any]], where: str) -> dict[str, StageRef]:
    """`pin: {layer_select: RUN}`: the step is not run; its output is the committed run's (recorded as reused)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: pin: expected a mapping of step to a committed run, e.g. {{layer_select: RUN}}")
    pins = {}
    for name, run in value.items():
        if name not in PINNABLE:
            raise InputError(
                f"{where}: pin.{key_name(name)}: not a step that can be pinned{suggest(name, PINNABLE)}; they are {', '.join(PINNABLE)}"
            )
        if not isinstance(run, str):
            raise InputError(f"{where}: pin.{name}: expected a run id (RUN or RUN/STEP), found {shown(run)}")
        pins[name] = StageRef.parse(run, name, f"{where}: pin.{name}")
        if options.get(name):
            raise InputError(f"{where}: stages.{name}: the step is pinned (pin.{name}) and does not run; leave its options out")
    return pins


def _line(value: Any, where: str) -> LineSettings | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise InputError(f"{where}: line: expected a mapping (name:, continue_from:) or a line name, found {shown(value)}")
    unknown = [k for k in value if k not in LINE_KEYS]
    if unknown:
        raise InputError(
            f"{where}: line.{key_name(unknown[0])}: not a line setting{suggest(unknown[0], LINE_KEYS)}; they are name, continue_from"
        )
    name, source = value.get("name"), value.get("continue_from", "promoted")
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: line.name: missing; name the model line (letters, digits, '.', '_' or '-')")
    try:
        validate_name(name, "line name")
    except InputError as exc:
        raise InputError(f"{where}: line.name: {exc}") from None
    if source not in CONTINUE_FROM:
        raise InputError(f"{where}: line.continue_from: {shown(source)} is not one of {', '.join(CONTINUE_FROM)}")
    return LineSettings(name, source)


def _execution(value: Any, where: str) -> dict[str, str]:
    """`execution: MODE` (every stage) or `execution: {stage: MODE}` -> stage -> mode."""
    modes = {name: value for name in STAGE_BY_NAME} if isinstance(value, str) else value
    if not isinstance(modes, dict):
        raise InputError(f"{where}: execution: expected {' or '.join(EXECUTIONS)}, or a mapping of stage to one of them")
    for name, mode in modes.items():
        if name not in STAGE_BY_NAME:
            raise InputError(f"{where}: execution.{key_name(name)}: not a stage{suggest(name, STAGE_BY_NAME)}")
        if not isinstance(mode, str) or mode not in EXECUTIONS:
            raise InputError(f"{where}: execution.{name}: {shown(mode)} is not one of {', '.join(EXECUTIONS)}")
    return dict(modes)


def _stage_options(stage: Stage, values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise InputError(f"{where}: expected a mapping of option to value, found {shown(values)}")
    specs = {f.name: (f, spec) for f, spec in options_of(stage.config)}
    allowed = settable_options(stage)
    hints = typing.get_type_hints(stage.config)
    checked = {}
    for key, value in values.items():
        wired = specs[key][1].wired if key in specs else None
        if wired is not None and wired.stage == PIPELINE_INPUTS:
            raise InputError(f"{where}.{key}: set from the config's top-level {wired.output}:; leave it out here")
        if wired is not None:
            raise InputError(f"{where}.{key}: set by the pipeline from the stage before ({wired}); leave it out")
        if key in specs and not specs[key][1].pipeline:
            raise InputError(f"{where}.{key}: an option for local files on the command line; a pipeline works in the store: leave it out")
        if key not in specs:
            raise InputError(
                f"{where}.{key_name(key)}: not an option of {stage.name}{suggest(key, allowed)}; "
                f"its options are {', '.join(sorted(allowed))}"
            )
        checked[key] = _typed(value, hints[key], f"{where}.{key}")
    missing = [n for n in allowed if specs[n][0].default is MISSING and specs[n][0].default_factory is MISSING]
    if missing:
        raise InputError(f"{where}.{missing[0]}: missing")
    return checked


def _check(step: PipelineStep, values: dict[str, Any], inputs: dict[str, Any], where: str) -> None:
    """The stage's own checks of its options (bad percent, unknown device, …), before anything runs."""
    if step.stage.check is None:
        return
    try:
        step.stage.check(step.placeholder_config(values, inputs))
    except InputError as exc:
        raise InputError(f"{where}: {clip(str(exc), 400)}") from exc


def _typed(value: Any, hint: Any, where: str) -> Any:
    """The value if it has the option's type (int where a float is expected is fine); otherwise a clear error."""
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if optional:
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, found {shown(value)}")
        return [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise InputError(f"{where}: expected {hint.__name__}, found {shown(value)}")
    return value
