"""`select --policy budget --fit-gpu-memory SIZE`: the largest budget whose memory plan fits one GPU.

The budget policy ranks the candidates by snr, highest first; a memory fit trains the always-train
tensors and the first k of that ranking (each with its module's bias, the budget's cost rule), for
the largest k whose plan (stages.training.memory_plan, the estimate cpt and sft check before they
start) fits SIZE per GPU at the planning setup. The plan only grows with the trained set, so k is
found by binary search: the model is built once on the meta device and re-frozen for each k.

The model's config.json is the one the scan read (its manifest's input, verified by sha256), the one
in the folder the local SNR table names, or --model. The planning options are defined here once, for
`spectrum plan` and `spectrum select`.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import InputError
from ..core.stage import option

if TYPE_CHECKING:
    from ..store import ArtifactStore
    from ..training.memory_plan import MemoryPlan, Setup


@dataclass(frozen=True)
class SetupOption:
    """A planning option: `--<name>` on `spectrum plan` and `spectrum select`."""

    name: str  # the memory_plan.Setup field, and the option's dest
    default: int | bool
    help: str

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"


SETUP_OPTIONS = {
    spec.name: spec
    for spec in (
        SetupOption("gpus", 1, "GPUs training together (default 1)"),
        SetupOption("seq_len", 512, "tokens per sequence (default 512)"),
        SetupOption("micro_batch_size", 1, "sequences per forward pass (default 1)"),
        SetupOption("zero_stage", 2, "DeepSpeed ZeRO stage 0-3 to plan for (default 2)"),
        SetupOption("gradient_checkpointing", False, "plan with activation checkpointing"),
    )
}


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The planning options on an argparse parser (`spectrum plan`)."""
    for spec in SETUP_OPTIONS.values():
        if isinstance(spec.default, bool):
            parser.add_argument(spec.flag, action="store_true", help=spec.help)
        else:
            parser.add_argument(spec.flag, type=int, default=spec.default, help=spec.help)


def setup_option(name: str) -> Any:
    """The planning option `name` as a stage config field (`spectrum select`)."""
    spec = SETUP_OPTIONS[name]
    return option(default=spec.default, help=f"with --fit-gpu-memory: {spec.help}")


def setup_of(values: Any) -> Setup:
    """The GPU setup (bf16, as cpt and sft train on a GPU) that `values` (parsed arguments or a config) name, checked."""
    from ..training.memory_plan import Setup, check_setup

    setup = Setup(bf16=True, **{name: getattr(values, name) for name in SETUP_OPTIONS})
    check_setup(setup)
    return setup


# --- the model's config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The config.json planned with, and its reference (uri, sha256, size) for the manifest's inputs."""

    data: bytes
    ref: dict[str, Any]


def find_model_config(model: str | None, snr_input: str | None, snr_run: Any, store: ArtifactStore | None) -> ModelConfig:
    """The scanned model's config.json: --model's, else the scan run's input, else the one in the folder a local table names."""
    if model is not None:
        return _given_config(model, store)
    if snr_run is not None:
        return _scanned_config(snr_run, store)
    return _table_config(Path(snr_input))


def _given_config(model: str, store: ArtifactStore | None) -> ModelConfig:
    from ..store.trees import STORE_SCHEME, as_tree, file_ref, local_copy, read_listing, resolve_uri, tree_prefix

    if model.startswith((STORE_SCHEME, "s3://", "file://")):
        located = resolve_uri(model, store)
        tree = None if isinstance(located, Path) else as_tree(located)
        if tree is None:  # a local folder by URI, or a run's output folder
            folder, stored = local_copy(model, store)
            return _local_config(folder, model, stored.get("config.json"))
        entry = next((f for f in read_listing(tree).files if f.path == "config.json"), None)
        if entry is None:
            raise InputError(f"--model {model} has no config.json; pass the scanned model (a Hugging Face model folder)")
        key = f"{tree_prefix(tree.kind, tree.tree)}/config.json"
        ref = {"uri": tree.store.uri(key), "sha256": entry.sha256, "size": entry.size}
        data, _ = tree.store.read_recorded({"key": key, **ref})
        return ModelConfig(data, ref)
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(f"--model {model} does not exist; pass the scanned model's folder, its config.json or its store URI")
    return _local_config(path, model, None) if path.is_dir() else ModelConfig(path.read_bytes(), file_ref(path))


def _local_config(folder: Path, model: str, ref: dict[str, Any] | None) -> ModelConfig:
    from ..store.trees import file_ref

    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"--model {model} has no config.json; pass the scanned model (a Hugging Face model folder) or its config.json")
    return ModelConfig(path.read_bytes(), ref or file_ref(path))


def _scanned_config(snr_run: Any, store: ArtifactStore | None) -> ModelConfig:
    """The config.json the scan read, as its manifest recorded it (sha256 checked)."""
    from ..base.contracts import SNR_SCAN
    from ..store import resolve_run_reference, succeeded_manifest
    from ..store.base import sha256_bytes
    from ..store.trees import resolve_uri

    run_id, step = resolve_run_reference(snr_run, SNR_SCAN, "--snr-run")
    manifest = succeeded_manifest(store, run_id, step, "SNR table to select from")
    ref = next((r for r in manifest.inputs if str(r.get("uri", "")).endswith("/config.json")), None)
    if ref is None:
        raise InputError(f"the scan of run {snr_run} read no config.json, so its model cannot be planned; pass --model MODEL")
    located = resolve_uri(ref["uri"], store)
    if not isinstance(located, Path):
        data, _ = located.store.read_recorded({"key": located.key, **ref})
        return ModelConfig(data, ref)
    if not located.is_file() or sha256_bytes(data := located.read_bytes()) != ref["sha256"]:
        raise InputError(
            f"{located}, the config.json the scan of run {snr_run} read, is gone or changed since; pass --model MODEL (the scanned model)"
        )
    return ModelConfig(data, ref)


def _table_config(table: Path) -> ModelConfig:
    """The config.json in the model folder a local SNR table names (its `model_dir` metadata)."""
    import pyarrow.parquet as pq

    from ..scan.table import METADATA_PREFIX

    metadata = pq.read_schema(table).metadata or {}
    folder = metadata.get(f"{METADATA_PREFIX}model_dir".encode(), b"").decode()
    if not folder or not (Path(folder) / "config.json").is_file():
        where = f"the folder it names, {folder}, has no config.json" if folder else "it names no model folder"
        raise InputError(f"cannot find the config.json of the model {table} scanned ({where}); pass --model MODEL (the scanned model)")
    return _local_config(Path(folder), folder, None)


# --- the fit ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """The largest prefix of the ranking whose plan fits, and the plan of one more (None: the whole ranking fits)."""

    count: int
    plan: MemoryPlan
    next_plan: MemoryPlan | None


class MemoryFit:
    """Plans trained sets of one model at one setup against the memory of one GPU."""

    def __init__(self, model_config: ModelConfig, setup: Setup, memory: int, memory_text: str):
        from ..training.memory_plan import load_config, meta_model

        with tempfile.TemporaryDirectory(prefix="spectrum-config-") as folder:
            (Path(folder) / "config.json").write_bytes(model_config.data)
            self.skeleton = meta_model(load_config(folder))  # built once, re-frozen for each trained set
        self.model_config, self.setup, self.memory, self.memory_text = model_config, setup, memory, memory_text

    def check_structure(self, names: Sequence[str], structure: str | None) -> None:
        """The config must describe the scanned model: every tensor the table lists, with the shapes it scanned (`structure`)."""
        from ..weights.checkpoint import structure_fingerprint

        shapes = {name: tuple(p.shape) for name, p in self.skeleton.named_parameters(remove_duplicate=False)}
        missing = [name for name in names if name not in shapes]
        if missing:
            problem = f"it has no {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} ({len(missing)} of the scanned tensors)"
        elif structure is not None and structure_fingerprint((name, shapes[name]) for name in names) != structure:
            problem = "its tensors have other shapes than the scanned ones"
        else:
            return
        raise InputError(
            f"the model config {self.model_config.ref['uri']} does not describe the scanned model: {problem}; "
            "pass --model with the model that was scanned"
        )

    def plan(self, names: Sequence[str]) -> MemoryPlan:
        """The memory plan per GPU of training exactly `names` (frozen as cpt and sft freeze them)."""
        from ..training.freezing import apply_selection
        from ..training.memory_plan import PlannedModel, trainable_of
        from ..training.selection import Selection
        from .matching import exact_pattern

        names = tuple(dict.fromkeys(names))
        apply_selection(self.skeleton, Selection(tuple(exact_pattern(n) for n in names), "--fit-gpu-memory", {}, exact_names=names))
        return PlannedModel(self.skeleton, trainable_of(self.skeleton, f"{len(names)} tensors")).plan(self.setup)

    def largest(self, base: Sequence[str], steps: Sequence[tuple[str, ...]], labels: Sequence[str]) -> Fit:
        """The largest k such that `base` and `steps[:k]` fit (`labels`: each step's name, for the error when none does)."""
        plans: dict[int, MemoryPlan] = {}
        if not base and not steps:
            raise InputError("nothing to fit to --fit-gpu-memory: no always-trained tensor and no tensor the policy may train")

        def fits(k: int) -> bool:
            if k not in plans:
                plans[k] = self.plan([*base, *(name for step in steps[:k] for name in step)])
            return plans[k].total <= self.memory

        low = 0 if base else 1  # training nothing is no selection (with no always-train tensor, every candidate is a step)
        if not fits(low):
            what = "the always-trained tensors alone" if base else f"only the top-ranked tensor ({labels[0]})"
            raise InputError(self._nothing_fits(what, plans[low]))
        if fits(len(steps)):
            return Fit(len(steps), plans[len(steps)], None)
        high = len(steps)  # fits(low) and not fits(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return Fit(low, plans[low], plans[high])

    def _nothing_fits(self, what: str, smallest: MemoryPlan) -> str:
        from ..training.memory_plan import PlannedModel, cheapest_fit, gib

        text = (
            f"nothing fits --fit-gpu-memory {self.memory_text}: training {what} needs {gib(smallest.total)} per GPU "
            f"on {self.setup.gpus} GPU(s) at {self.setup.describe()}"
        )
        cheaper = cheapest_fit(PlannedModel(self.skeleton, smallest.trainable), self.setup, self.memory)
        if cheaper is not None:
            return f"{text}; {cheaper.setup.describe()} would fit that ({gib(cheaper.total)}; see `spectrum plan`)"
        return f"{text}; give more --gpus or memory per GPU, a shorter --seq-len, or fewer --always-train tensors"

    def record(self, fit: Fit, next_label: str | None) -> dict[str, Any]:
        """What was asked and what the chosen selection plans: selection.json's `memory_fit`, the table's metadata."""
        return {
            "gpu_memory": self.memory_text,
            "gpu_memory_bytes": self.memory,
            **{name: getattr(self.setup, name) for name in SETUP_OPTIONS},
            "bf16": self.setup.bf16,
            "model_config": self.model_config.ref,
            "planned_bytes": fit.plan.components(),
            "next_tensor": next_label,
            "next_planned_bytes": fit.next_plan.total if fit.next_plan is not None else None,
        }
