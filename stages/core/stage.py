"""The stage contract: every stage of the pipeline has the same shape.

A stage module (`stages/<stage>.py`) defines

    @dataclass
    class XConfig(StageConfig):                 # what the stage computes, and its CLI options
        model: str = option(positional=True, help="...")
        top_percent: float = option(default=50.0, cache=True, help="...")

    def run(config: XConfig, context: StageContext) -> StageResult: ...

    STAGE = Stage(name=contracts.X, command="x", config=XConfig, run=run, summary="...", description=__doc__)

    if __name__ == "__main__":
        raise SystemExit(stage_main(STAGE))      # `python -m stages.x`, the container entrypoint

- Config fields declared with `option()` are the stage's command-line options: `spectrum x` and
  `python -m stages.x` build their parsers from the dataclass (stages.core.cli), so they cannot
  drift apart. Fields marked `cache=True` are the parameters that form the store's cache key
  (`config.cache_parameters()`), together with the sha256 of every input.
- The context carries what is the same for every stage: the artifact store (None: local
  outputs only), the run id, force, the work folder and progress bars. Its options (--store,
  --run-id, --force, --work-dir, --progress, --s3-endpoint-url) are added to every stage.
- A stage publishes through `stages.core.execution.execute_stage` (cache lookup, outputs under
  `runs/<run>/<stage>/`, manifest last) and returns a `StageResult`: the committed or reused
  manifest, whether it was reused, the lines to print, and a stage-specific `detail`.

The flows call every stage the same way: `STAGE.run(config, context)`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..base import settings
from ..base.contracts import STEP_SEPARATOR, step_name
from ..base.errors import InputError
from ..base.library_output import follow_progress
from ..store import ArtifactStore, Manifest
from ..store.keys import NAME, validate_name
from ..store.scrub import check_values

OPTION = "spectrum_option"


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
) -> Any:
    """A config field that is also a command-line option (see the module docstring)."""
    meta = {OPTION: Option(flags, help, cache, positional, tuple(choices) if choices else None, metavar, negative)}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def options_of(config_class: type) -> list[tuple[dataclasses.Field, Option]]:
    return [(f, f.metadata[OPTION]) for f in dataclasses.fields(config_class) if OPTION in f.metadata]


@dataclass
class StageConfig:
    """Base of every stage's config dataclass."""

    def cache_parameters(self) -> dict[str, Any]:
        """The parameters that, with the inputs' sha256, determine the stage's outputs (the cache key)."""
        return {f.name: getattr(self, f.name) for f, spec in options_of(type(self)) if spec.cache}


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage runs; the same for every stage."""

    store: ArtifactStore | None = None  # None: the stage writes local outputs only
    run_id: str | None = None  # None: a fresh run id
    force: bool = False  # recompute even when a committed run has the same cache key
    work_dir: Path | None = None  # None: $SPECTRUM_WORK_DIR or ~/.cache/spectrum/work
    progress: bool | None = None  # None: progress bars when stderr is a terminal
    step: str | None = None  # run the stage as the step `<stage>.<step>` of the run (a second scan, say)

    def __post_init__(self) -> None:
        """Names are checked before any work, so a bad or secret-looking run id never leaves outputs behind."""
        if self.run_id is not None:
            validate_name(self.run_id, "run id")
            check_values({"run_id": self.run_id}, "--run-id")
        if self.step is not None and (STEP_SEPARATOR in self.step or not NAME.fullmatch(self.step)):
            raise InputError(f"invalid step qualifier {self.step!r}: letters, digits, '_' or '-'")
        follow_progress(self.progress)  # the libraries' own bars (loading weights, writing shards) follow ours

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
    summary: str  # one line for `spectrum --help`
    description: str | None = None  # the module docstring, for `spectrum <command> --help`
    # The checks of the options alone, before any input is read: `run` calls them first, and a
    # pipeline calls them for every stage before the first one starts.
    check: Callable[[ConfigT], None] | None = None

    @property
    def module(self) -> str:
        return f"stages.{self.name}"
