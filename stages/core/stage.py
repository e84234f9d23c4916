"""The stage contract: every stage of the pipeline has the same shape.

A stage module (`stages/<stage>.py`) defines

    @dataclass
    class XConfig(StageConfig):                 # what the stage computes, and its CLI options
        model: str = option(positional=True, help="...")
        top_percent: float = option(default=50.0, cache=True, help="...")

    def run(config: XConfig, context: StageContext) -> StageResult: ...

    STAGE = Stage(name=contracts.X, command="x", config=XConfig, run=run, description=__doc__)

    if __name__ == "__main__":
        raise SystemExit(stage_main(STAGE))      # `python -m stages.x`, the container entrypoint

- Config fields declared with `option()` are the stage's command-line options: `spectrum x` and
  `python -m stages.x` build their parsers from the dataclass (stages.core.cli), so they cannot
  drift apart. Fields marked `cache=True` are the parameters that form the store's cache key
  (`config.cache_parameters()`), together with the sha256 of every input.
- The context carries what is the same for every stage: the artifact store (None: local
  outputs only), the run id, force, the work folder, progress bars and the experiment tracker.
  Its options (--store, --run-id, --force, --work-dir, --progress, --s3-endpoint-url,
  --mlflow-*) are added to every stage.
- Inputs that a pipeline fills from an upstream stage are declared on the option itself:
  `option(wired=From(SNR_SCAN), …)` takes the upstream stage's run (a typed StageRef; on the
  command line `RUN` or `RUN/STEP`), `From(DOWNLOAD, "model")` one of its named outputs
  (`Stage.outputs`). Options for local files only (`--out-dir`, a selection file) say
  `pipeline=False`. The pipeline, its config checks, the command lines of a stage in its own
  process or deployment and compare all derive from these declarations.
- A stage publishes through `stages.core.execution.execute_stage` (cache lookup, outputs under
  `runs/<run>/<stage>/`, manifest last) and returns a `StageResult`: the committed or reused
  manifest, whether it was reused, the lines to print, and a stage-specific `detail`.

The flows call every stage the same way: `STAGE.run(config, context)`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..base import settings
from ..base.contracts import STEP_SEPARATOR, step_name
from ..base.errors import InputError
from ..base.library_output import follow_progress
from ..store import ArtifactStore, Manifest, StageRef, new_run_id
from ..store.keys import NAME, validate_name
from ..store.scrub import check_values
from ..tracking import MlflowTarget

OPTION = "spectrum_option"
PIPELINE_INPUTS = "pipeline"  # From(PIPELINE_INPUTS, "model"): the pipeline config's own model:, revision: or data:
RUN_OUTPUT = "run"  # every stage's output: its run in the store, as a StageRef


@dataclass(frozen=True)
class From:
    """Where a pipeline takes an input from: an upstream stage's output, by the output's name."""

    stage: str
    output: str = RUN_OUTPUT

    def __str__(self) -> str:
        return f"{self.stage}.{self.output}"


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line (argparse settings beyond the field's type)."""

    flags: tuple[str, ...]  # empty: --field-name
    help: str
    cache: bool  # part of the cache key
    positional: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    negative: tuple[str, str] | None = None  # (flag, help) of a flag that empties a list option (e.g. --no-always-train)
    wired: From | None = None  # a pipeline fills it from this upstream output
    pipeline: bool = True  # False: a command-line option for local files; a pipeline works in the store only
    path: bool = False  # names a local file or folder: in a pipeline config, relative to the config's folder

    @property
    def settable_in_pipeline(self) -> bool:
        return self.pipeline and self.wired is None


def option(
    *flags: str,
    help: str,
    default: Any = dataclasses.MISSING,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    cache: bool = False,
    positional: bool = False,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    negative: tuple[str, str] | None = None,
    wired: From | None = None,
    pipeline: bool = True,
    path: bool = False,
) -> Any:
    """A config field that is also a command-line option (see the module docstring)."""
    meta = {OPTION: Option(flags, help, cache, positional, tuple(choices) if choices else None, metavar, negative, wired, pipeline, path)}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def options_of(config_class: type) -> list[tuple[dataclasses.Field, Option]]:
    return [(f, f.metadata[OPTION]) for f in dataclasses.fields(config_class) if OPTION in f.metadata]


def wires_of(config_class: type) -> dict[str, From]:
    """The options a pipeline fills, each with the upstream output it comes from."""
    return {f.name: spec.wired for f, spec in options_of(config_class) if spec.wired is not None}


def flag_of(config_field: dataclasses.Field, spec: Option) -> str:
    return spec.flags[0] if spec.flags else f"--{config_field.name.replace('_', '-')}"


def is_stage_ref(hint: Any) -> bool:
    """`StageRef` or `StageRef | None`."""
    return hint is StageRef or StageRef in typing.get_args(hint)


@dataclass
class StageConfig:
    """Base of every stage's config dataclass."""

    def __post_init__(self) -> None:
        """An upstream run given as text (`RUN`, `RUN/STEP`, from a command line or a deployment's parameters) becomes a StageRef."""
        hints = typing.get_type_hints(type(self))
        for config_field, spec in options_of(type(self)):
            value = getattr(self, config_field.name)
            if value is not None and is_stage_ref(hints[config_field.name]) and spec.wired is not None:
                setattr(self, config_field.name, StageRef.parse(value, spec.wired.stage, flag_of(config_field, spec)))

    def cache_parameters(self) -> dict[str, Any]:
        """The parameters that, with the inputs' sha256, determine the stage's outputs (the cache key)."""
        return {f.name: getattr(self, f.name) for f, spec in options_of(type(self)) if spec.cache}

    def plain_options(self) -> dict[str, Any]:
        """The options as plain values (a StageRef as `RUN/STEP`): what a deployment's parameters carry."""
        return {f.name: _plain(getattr(self, f.name)) for f, _ in options_of(type(self))}


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, StageRef) else value


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage runs; the same for every stage."""

    store: ArtifactStore | None = None  # None: the stage writes local outputs only
    run_id: str | None = None  # None: a fresh run id
    force: bool = False  # recompute even when a committed run has the same cache key
    work_dir: Path | None = None  # None: $SPECTRUM_WORK_DIR or ~/.cache/spectrum/work
    progress: bool | None = None  # None: progress bars when stderr is a terminal
    step: str | None = None  # run the stage as the step `<stage>.<step>` of the run (a second scan, say)
    tracking: MlflowTarget | None = None  # log the stage to MLflow (stages.tracking); None: not tracked

    def __post_init__(self) -> None:
        """Names are checked before any work, so a bad or secret-looking run id never leaves outputs behind."""
        if self.run_id is not None:
            validate_name(self.run_id, "run id")
            check_values({"run_id": self.run_id}, "--run-id")
        if self.step is not None and (STEP_SEPARATOR in self.step or not NAME.fullmatch(self.step)):
            raise InputError(f"invalid step qualifier {self.step!r}: letters, digits, '_' or '-'")
        follow_progress(self.progress)  # the libraries' own bars (loading weights, writing shards) follow ours

    def with_run_id(self) -> StageContext:
        """This context with its run id fixed: the given one, or a new one (the one place a stage mints run ids)."""
        return self if self.run_id else replace(self, run_id=new_run_id())

    def as_step(self, step: str | None) -> StageContext:
        """The context in which another stage runs as the step `<stage>.<step>` of this run (sft's rescan, say)."""
        return replace(self.with_run_id(), step=step)

    def step_name(self, stage: str) -> str:
        """Where `stage` writes in the run: its own name, or `<stage>.<step>`."""
        return step_name(stage, self.step)

    def work_root(self) -> Path:
        root = Path(self.work_dir) if self.work_dir else settings.work_root()
        root.mkdir(parents=True, exist_ok=True)
        return root

    @contextmanager
    def scratch(self, prefix: str) -> Iterator[Path]:
        """A private temporary folder under the work root, removed afterwards."""
        with tempfile.TemporaryDirectory(prefix=f".{prefix}-", dir=self.work_root()) as folder:
            yield Path(folder)


DetailT = TypeVar("DetailT")


@dataclass(frozen=True)
class StageResult(Generic[DetailT]):
    """What a stage did: the run it committed or reused (if it used a store) and what to tell the user."""

    stage: str
    lines: tuple[str, ...]
    manifest: Manifest | None = None  # None: run without a store
    cached: bool = False  # True: an earlier committed run was reused and nothing was computed
    detail: DetailT | None = None  # stage-specific: the scan's rows, the selection, ...

    @property
    def run_id(self) -> str | None:
        return self.manifest.run_id if self.manifest else None

    @property
    def message(self) -> str:
        return "\n".join(self.lines)


ConfigT = TypeVar("ConfigT", bound=StageConfig)


@dataclass(frozen=True)
class Stage(Generic[ConfigT]):
    """A stage as the CLI and the flows see it."""

    name: str  # the stage's name in the store (stages.base.contracts)
    command: str  # `spectrum <command>`
    config: type[ConfigT]
    run: Callable[[ConfigT, StageContext], StageResult]
    description: str | None = None  # the module docstring, for `spectrum <command> --help`
    # The checks of the options alone, before any input is read: `run` calls them first, and a
    # pipeline calls them for every stage before the first one starts.
    check: Callable[[ConfigT], None] | None = None
    # Its named outputs beyond its run (RUN_OUTPUT), which downstream options take with From(stage, name).
    outputs: Mapping[str, Callable[[ArtifactStore, Manifest], Any]] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    def output(self, name: str, store: ArtifactStore, manifest: Manifest) -> Any:
        """The value of an output of a committed (or reused) run of this stage."""
        if name == RUN_OUTPUT:
            return StageRef.of(manifest)
        if name not in self.outputs:
            raise KeyError(f"the {self.name} stage has no output {name!r}; its outputs are {RUN_OUTPUT}, {', '.join(self.outputs)}")
        return self.outputs[name](store, manifest)

    def run_as_step(self, config: ConfigT, context: StageContext, step: str | None) -> StageResult:
        """Run this stage as the step `<stage>.<step>` of the context's run: how one stage runs another (sft's rescan)."""
        return self.run(config, context.as_step(step))
