"""layer_select stage: choose the tensors to train from an SNR table or a reference SNR JSON.

Policies: `per-type` (the reference: in each module type, the top `int(count * pct / 100)` by
snr, descending), `global` (top pct across all types) and `budget` (highest snr first while the
trainable parameters stay within a share of the model). `--rank-by` orders the tensors every
policy takes from: `snr` (the default, highest first), `inverse` (lowest snr first) or `random`
(a uniform order from `--rank-seed`): the controls of a comparison, with the same counts and the
same always-trained tensors as the snr ranking. A tensor without an snr (NaN) ranks last in
each. "Always train" entries are roles (`input_embeddings`, `output_embeddings`, resolved
against the model's real tensor names) or regular expressions; each must match something.
Outputs: a Parquet table of every tensor with its rank and the reason it was or was not
selected, an Axolotl `unfrozen_parameters` YAML (byte-identical to the reference tool's for the
reference policy), and a JSON summary.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .base.contracts import (
    LAYER_SELECT,
    SELECTION_JSON_FILE,
    SELECTION_TABLE,
    SELECTION_TABLE_FILE,
    SNR_SCAN,
    SNR_TABLE,
    UNFROZEN_YAML_FILE,
)
from .base.errors import InputError
from .base.files import ensure_writable, write_atomic
from .base.patterns import compile_pattern
from .core.cli import stage_main
from .core.execution import StageRun, execute_stage
from .core.stage import From, Stage, StageConfig, StageContext, StageResult, option
from .scan.table import METADATA_PREFIX, load_reference_json, read_snr_table, read_table_metadata
from .selection.document import SelectionDocument, UnfrozenParameters
from .selection.fit import SETUP_OPTIONS, setup_option
from .selection.matching import PatternSet
from .store import ArtifactStore, ObjectInfo, StageRef, read_table_output, resolve_run_reference, succeeded_manifest
from .store.base import sha256_file
from .weights.checkpoint import structure_fingerprint
from .weights.naming import layer_index, module_bias
from .weights.roles import INPUT_EMBEDDINGS, MODEL_CONFIG, OUTPUT_EMBEDDINGS, ROLES, RoleMap, roles_from_conventional_names

if TYPE_CHECKING:
    from .selection.fit import MemoryFit

POLICIES = ("per-type", "global", "budget")
RANKINGS = ("snr", "inverse", "random")
# What the reference tool always writes for the two embedding roles (Llama names).
REFERENCE_ROLE_PATTERNS = {OUTPUT_EMBEDDINGS: "^lm_head.weight$", INPUT_EMBEDDINGS: "^model.embed_tokens.weight$"}


@dataclass
class Entry:
    """One tensor as the selection sees it."""

    tensor_name: str
    yaml_name: str  # how the reference tool names it: the module, for a module's weight
    module_type: str
    snr: float | None
    parameter_count: int | None
    candidate: bool  # scanned, so it has an snr to rank by
    skip_reason: str | None = None
    picked: bool = False  # chosen by the policy
    always_train: bool = False
    rank: int | None = None
    group_size: int | None = None
    reason: str = ""
    trained_with: str | None = None  # a bias (or another parameter) trained because this selected tensor's YAML line matches it

    @property
    def chosen(self) -> bool:
        """Chosen for its own sake, by the policy or as always-train."""
        return self.picked or self.always_train

    @property
    def selected(self) -> bool:
        """Trained: chosen, or a parameter of a chosen module (its bias)."""
        return self.chosen or self.trained_with is not None


@dataclass
class SnrSource:
    entries: list[Entry]
    roles: RoleMap
    model_id: str | None
    sort_key: Callable[[Entry], float]  # reference JSON keeps Python's own ordering, NaN included
    structure: str | None = None  # structure_fingerprint of the scanned model (None: a reference JSON has no shapes)
    estimator: str | None = None  # the SNR estimator of the scan (None: a reference JSON, the reference formula)
    every_tensor: bool = True  # lists every tensor of the model (a scan's table); a reference JSON lists the scanned weights only


@dataclass
class SelectConfig(StageConfig):
    snr_input: str | None = option(
        positional=True,
        default=None,
        pipeline=False,
        help="SNR table (.parquet from `spectrum scan`) or a reference snr_results JSON (flat or sorted layout)",
    )
    snr_run: StageRef | None = option(
        metavar="RUN_ID", default=None, wired=From(SNR_SCAN), help="instead of a file: the SNR table of this run in --store"
    )
    out_dir: str | None = option(
        "--out-dir",
        "-o",
        default=None,
        pipeline=False,
        help=f"local folder for {SELECTION_TABLE_FILE}, {UNFROZEN_YAML_FILE} and {SELECTION_JSON_FILE}",
    )
    policy: str = option(default="per-type", cache=True, choices=POLICIES, help="per-type (reference, default), global, or budget")
    top_percent: float | None = option(default=50.0, cache=True, help="share of matrices to train, in (0, 100] (default 50)")
    budget_percent: float | None = option(
        default=None, cache=True, help="budget policy: train at most this share of the model's parameters"
    )
    # The memory fit: in the cache key only when asked for (cache_parameters), so other selections keep their keys.
    fit_gpu_memory: str | None = option(
        default=None,
        metavar="SIZE",
        help="budget policy, instead of --budget-percent: the largest budget whose memory plan (as `spectrum plan`, and cpt's "
        "check) fits SIZE per GPU, e.g. 80GiB, at --gpus, --seq-len, --micro-batch-size, --zero-stage, --gradient-checkpointing",
    )
    gpus: int = setup_option("gpus")
    seq_len: int = setup_option("seq_len")
    micro_batch_size: int = setup_option("micro_batch_size")
    zero_stage: int = setup_option("zero_stage")
    gradient_checkpointing: bool = setup_option("gradient_checkpointing")
    model: str | None = option(
        default=None,
        pipeline=False,
        help="with --fit-gpu-memory: the scanned model (folder, config.json or store URI) whose config to plan; "
        "default: the config.json the scan read",
    )
    # The ranking: in the cache key and the records only when not snr (cache_parameters), so other selections keep their keys.
    rank_by: str = option(
        default="snr",
        choices=RANKINGS,
        help="the order policies take tensors in: snr (highest first, default), inverse (lowest snr first) or random "
        "(uniform, from --rank-seed): the latter two are controls with the same counts and always-trained tensors",
    )
    rank_seed: int | None = option(default=None, metavar="N", help="--rank-by random: the seed of the order (default 0)")
    include_types: list[str] = option(
        "--include-type", default_factory=list, cache=True, metavar="REGEX", help="only select from module types matching REGEX"
    )
    exclude_types: list[str] = option(
        "--exclude-type", default_factory=list, cache=True, metavar="REGEX", help="never select module types matching REGEX"
    )
    depth_aware: bool = option(
        default=False,
        cache=True,
        help="per-type share taken from the upper layers (the best snr among the upper 2x share) with the embeddings "
        "frozen, so backward stops early; trains faster than the reference policy for the same share",
    )
    always_train: list[str] | None = option(
        "--always-train",
        default=None,
        cache=True,
        metavar="ROLE|REGEX",
        negative=("--no-always-train", "train only what the policy selects"),
        help=f"always train: a role ({', '.join(ROLES)}) or a regex on tensor names (repeatable; default: both roles, "
        "none with --depth-aware)",
    )
    overwrite: bool = option(default=False, pipeline=False, help="replace existing output files")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.always_train is None:  # the embeddings: trained by the reference policy, frozen when depth-aware
            self.always_train = [] if self.depth_aware else list(ROLES)

    def cache_parameters(self) -> dict[str, Any]:
        parameters = super().cache_parameters()
        if self.fit_gpu_memory is not None:
            from .training.memory_plan import parse_size  # the size in bytes: 80GiB, "80 GiB" and 85899345920 are one request

            memory = parse_size(self.fit_gpu_memory, "--fit-gpu-memory")
            parameters |= {"fit_gpu_memory": memory, **{name: getattr(self, name) for name in SETUP_OPTIONS}}
        return parameters | self.ranking_options()

    def ranking_options(self) -> dict[str, Any]:
        """rank_by (and the seed of a random order) when not the snr ranking: what the cache key and the records add."""
        if self.rank_by == "snr":
            return {}
        return {"rank_by": self.rank_by, **({"rank_seed": self.seed_of_ranking} if self.rank_by == "random" else {})}

    @property
    def seed_of_ranking(self) -> int:
        return 0 if self.rank_seed is None else self.rank_seed


@dataclass(frozen=True)
class Ranking:
    """The order the policies take tensors in: a sort key (highest first) and how the reasons name it."""

    key: Callable[[Entry], float]
    label: str  # "snr", as the reasons have always said, for the default ranking


def ranking_of(config: SelectConfig, source: SnrSource) -> Ranking:
    """`--rank-by` over `source`: snr as the source sorts it; inverse and random keep a tensor without an snr last."""
    if config.rank_by == "snr":
        return Ranking(source.sort_key, "snr")
    if config.rank_by == "inverse":
        return Ranking(lambda e: -math.inf if _no_snr(e) else -e.snr, "inverse snr (lowest first)")
    generator = random.Random(config.seed_of_ranking)
    order = {e.tensor_name: generator.random() for e in source.entries}  # the table's order: the same seed, the same draw
    return Ranking(lambda e: -math.inf if _no_snr(e) else order[e.tensor_name], f"random order (seed {config.seed_of_ranking})")


@dataclass
class SelectResult:
    out_dir: Path | None
    entries: list[Entry]
    document: SelectionDocument  # selection.json
    yaml_text: str  # the Axolotl unfrozen_parameters YAML
    table: pa.Table

    @property
    def summary(self) -> dict:
        """selection.json as a JSON object."""
        return self.document.to_dict()

    def files(self) -> dict[str, bytes]:
        """The three outputs by file name; the JSON summary last (it says the selection is complete)."""
        buffer = io.BytesIO()
        pq.write_table(self.table, buffer, compression="zstd")
        return {
            SELECTION_TABLE_FILE: buffer.getvalue(),
            UNFROZEN_YAML_FILE: self.yaml_text.encode(),
            SELECTION_JSON_FILE: self.document.to_json(),
        }


def run(config: SelectConfig, context: StageContext) -> StageResult[SelectResult]:
    """Select, then write to `config.out_dir` and/or publish to the store as a run's layer_select stage."""
    _validate(config)
    store = context.store
    if config.out_dir is None and store is None:
        raise InputError("nowhere to write the selection: pass --out-dir, --store, or both")
    if config.out_dir is not None:
        for name in (SELECTION_TABLE_FILE, UNFROZEN_YAML_FILE, SELECTION_JSON_FILE):
            ensure_writable(Path(config.out_dir) / name, config.overwrite)
    source, input_ref = _open_source(config, store)
    fit = _open_memory_fit(config, store, source) if config.fit_gpu_memory is not None else None
    result = select(config, source, fit)
    files = result.files()
    if config.out_dir is not None:
        result.out_dir = Path(config.out_dir)
        for name, data in files.items():
            write_atomic(result.out_dir / name, data, overwrite=config.overwrite)
    lines = [report(result)]
    if store is None:
        return StageResult(LAYER_SELECT, tuple(lines), detail=result)

    def publish(run: StageRun) -> list[ObjectInfo]:
        table = run.write_table(SELECTION_TABLE, result.table)
        return [table] + [run.put_bytes(name, data) for name, data in files.items() if name != SELECTION_TABLE_FILE]

    inputs = [input_ref, fit.model_config.ref] if fit is not None else [input_ref]
    outcome = execute_stage(LAYER_SELECT, context, config.cache_parameters(), inputs, publish)
    return StageResult(LAYER_SELECT, (*lines, outcome.describe(store)), outcome.manifest, outcome.cached, detail=result)


def _open_source(config: SelectConfig, store: ArtifactStore | None) -> tuple[SnrSource, dict]:
    """The SNR input and its reference (URI, sha256) for the manifest.

    From a run, the table is the one the scan's manifest recorded (its version, its sha256),
    verified on read; the reference recorded is that of the bytes read.
    """
    if config.snr_run is not None:
        if config.snr_input is not None:
            raise InputError("pass either an SNR file or --snr-run, not both")
        if store is None:
            raise InputError("--snr-run reads the SNR table of a run from the artifact store: pass --store too")
        run_id, step = resolve_run_reference(config.snr_run, SNR_SCAN, "--snr-run")
        data, info = read_table_output(store, succeeded_manifest(store, run_id, step, "SNR table to select from"), SNR_TABLE)
        return _source_from_table(read_snr_table(data, info.uri)), info.to_dict()
    if config.snr_input is None:
        raise InputError("no SNR input: pass a table/JSON file or --snr-run RUN_ID")
    path = Path(config.snr_input)
    source = load_source(path)
    digest, size = sha256_file(path)
    return source, {"uri": path.resolve().as_uri(), "sha256": digest, "size": size}


def select(config: SelectConfig, source: SnrSource, fit: MemoryFit | None = None) -> SelectResult:
    """The selection itself, in memory (`fit`: the memory plan --fit-gpu-memory selects with)."""
    entries = source.entries
    always_lines = _apply_always_train(entries, source.roles, config.always_train)
    groups = _eligible_groups(entries, config)
    ranking = ranking_of(config, source)
    memory_fit = None
    if fit is not None:  # recorded as the budget it came to, which selects the same again (sft --rescan)
        budget_percent, memory_fit = _take_memory_fit(groups, ranking, entries, fit)
        config = replace(config, budget_percent=budget_percent)
    else:
        _apply_policy(groups, config, ranking, entries)
    if not any(e.chosen for e in entries):
        raise InputError(
            f"the selection would train nothing: {config.policy} at {_percent_text(config)} keeps no tensor and no always-train "
            "entry is set; raise the percentage or add --always-train"
        )
    always_lines += _train_module_parameters(entries)
    yaml_text = unfrozen_parameters(always_lines, groups).to_yaml()
    document = _document(config, source, entries, groups, always_lines, memory_fit)
    table = _selection_table(entries, config, memory_fit)
    return SelectResult(out_dir=None, entries=entries, document=document, yaml_text=yaml_text, table=table)


def _validate(config: SelectConfig) -> None:
    if config.depth_aware and config.policy != "per-type":
        raise InputError(f"--depth-aware applies to the per-type policy, not {config.policy}")
    if config.policy not in POLICIES:
        raise InputError(f"unknown policy {config.policy!r}; choose one of {', '.join(POLICIES)}")
    if config.fit_gpu_memory is not None or config.model is not None:
        _validate_memory_fit(config)
    _validate_ranking(config)
    if config.policy == "budget":
        if config.budget_percent is None and config.fit_gpu_memory is None:
            raise InputError(
                "the budget policy needs --budget-percent (the share of the model's parameters to train) "
                "or --fit-gpu-memory SIZE (the largest share whose training fits SIZE per GPU)"
            )
        if config.budget_percent is not None:
            _check_percent("--budget-percent", config.budget_percent)
    else:
        if config.top_percent is None:
            raise InputError(f"the {config.policy} policy needs --top-percent")
        _check_percent("--top-percent", config.top_percent)
        if config.budget_percent is not None:
            raise InputError(f"--budget-percent applies only to --policy budget, not {config.policy}; pass --policy budget or leave it out")
    regex_options = {"--include-type": config.include_types, "--exclude-type": config.exclude_types, "--always-train": config.always_train}
    for flag, patterns in regex_options.items():
        for pattern in patterns:
            compile_pattern(pattern, flag)


def _validate_memory_fit(config: SelectConfig) -> None:
    from .selection.fit import setup_of
    from .training.memory_plan import parse_size

    if config.fit_gpu_memory is None:
        raise InputError("--model names the model --fit-gpu-memory plans; pass --fit-gpu-memory SIZE too, or leave --model out")
    if config.policy != "budget":
        raise InputError(f"--fit-gpu-memory picks the largest budget that fits, so it needs --policy budget, not {config.policy}")
    if config.budget_percent is not None:
        raise InputError("pass either --budget-percent or --fit-gpu-memory, not both: the memory fit chooses the budget")
    parse_size(config.fit_gpu_memory, "--fit-gpu-memory")
    setup_of(config)


def _validate_ranking(config: SelectConfig) -> None:
    if config.rank_by not in RANKINGS:
        raise InputError(f"unknown --rank-by {config.rank_by!r}; choose one of {', '.join(RANKINGS)}")
    if config.rank_seed is not None:
        if config.rank_by != "random":
            raise InputError(f"--rank-seed seeds --rank-by random, not {config.rank_by}; pass --rank-by random or leave it out")
        if isinstance(config.rank_seed, bool) or not isinstance(config.rank_seed, int) or config.rank_seed < 0:
            raise InputError(f"--rank-seed must be a whole number 0 or more, got {config.rank_seed!r}")


def _check_percent(flag: str, value: float) -> None:
    if not (0 < value <= 100) or math.isnan(value):
        raise InputError(f"{flag} must be in (0, 100], got {value:g}")


def load_source(path: Path) -> SnrSource:
    if not path.exists():
        raise InputError(f"SNR input {path} does not exist; pass a Parquet table from `spectrum scan` or a reference snr_results JSON")
    if path.suffix == ".json":
        return _source_from_reference_json(path)
    return _source_from_table(read_snr_table(path))


def _source_from_reference_json(path: Path) -> SnrSource:
    entries = [
        Entry(tensor_name=f"{e.name}.weight", yaml_name=e.name, module_type=e.module_type, snr=e.snr, parameter_count=None, candidate=True)
        for e in load_reference_json(path)
    ]
    roles = roles_from_conventional_names([e.tensor_name for e in entries])
    return SnrSource(entries, roles, model_id=None, sort_key=lambda e: e.snr, every_tensor=False)


def _source_from_table(table: pa.Table) -> SnrSource:
    metadata = read_table_metadata(table)
    entries = []
    for row in table.to_pylist():
        name = row.get("module_name") or row["tensor_name"]
        yaml_name = name if row["tensor_name"] != name else row["tensor_name"]
        entries.append(
            Entry(
                tensor_name=row["tensor_name"],
                yaml_name=yaml_name,
                module_type=row["module_type"],
                snr=row["snr"],
                parameter_count=row.get("parameter_count"),
                candidate=bool(row["scanned"]),
                skip_reason=row.get("skip_reason"),
            )
        )
    roles = _roles_from_table(table, metadata)
    model_ids = set(table.column("model_id").to_pylist()) if "model_id" in table.column_names else set()
    structure = None
    if "shape" in table.column_names:
        structure = structure_fingerprint(zip(table.column("tensor_name").to_pylist(), table.column("shape").to_pylist(), strict=True))
    model_id = next(iter(model_ids)) if len(model_ids) == 1 else None
    estimators = set(table.column("estimator").to_pylist()) - {None} if "estimator" in table.column_names else set()
    estimator = next(iter(estimators)) if len(estimators) == 1 else None
    return SnrSource(entries, roles, model_id=model_id, sort_key=_nan_last, structure=structure, estimator=estimator)


def _roles_from_table(table: pa.Table, metadata: dict[str, str]) -> RoleMap:
    names = table.column("tensor_name").to_pylist()
    if metadata.get("roles_source") == MODEL_CONFIG:
        resolved = {}
        for role, column in ((INPUT_EMBEDDINGS, "is_input_embedding"), (OUTPUT_EMBEDDINGS, "is_output_embedding")):
            flags = table.column(column).to_pylist()
            matches = tuple(n for n, flag in zip(names, flags, strict=False) if flag)
            if matches:
                resolved[role] = matches
        return RoleMap(tensors=resolved, source=MODEL_CONFIG)
    return roles_from_conventional_names(names)


def _nan_last(entry: Entry) -> float:
    return -math.inf if _no_snr(entry) else entry.snr


def _no_snr(entry: Entry) -> bool:
    return entry.snr is None or math.isnan(entry.snr)


def _apply_always_train(entries: list[Entry], roles: RoleMap, requested: list[str]) -> list[str]:
    """Mark always-train tensors; return their YAML lines (`^name$` for roles, the regex as given)."""
    by_name = {e.tensor_name: e for e in entries}
    lines: list[str] = []
    for item in requested:
        if item in ROLES:
            names = [n for n in roles.names(item) if n in by_name]
            if not names:
                raise InputError(
                    f"always-train entry {item!r} matches no tensor of this model (roles resolved from {roles.source}); "
                    "pass --always-train with a regular expression for the real parameter name, or --no-always-train"
                )
            patterns = [f"^{n}$" for n in names]
            if _tied_to_another_role(item, names, roles):
                # The reference tool lists `^lm_head.weight$` and `^model.embed_tokens.weight$`
                # literally; with tied embeddings the first matches nothing (trainers ignore it),
                # and listing it keeps the YAML byte-identical to the reference's.
                patterns.insert(0, REFERENCE_ROLE_PATTERNS[item])
            label = item
        else:
            pattern = PatternSet((item,), "--always-train")
            names = [n for n in by_name if pattern.matches(n)]
            if not names:
                raise InputError(
                    f"always-train pattern {item!r} matches no tensor name; check it against the SNR table's tensor_name column"
                )
            patterns = [item]
            label = f"pattern {item!r}"
        for name in names:
            entry = by_name[name]
            entry.always_train = True
            entry.reason = f"always trained ({label})"
        lines.extend(p for p in patterns if p not in lines)
    return lines


def _tied_to_another_role(role: str, names: list[str], roles: RoleMap) -> bool:
    """True when the role's tensors are another role's, under the reference's (Llama) name for that role."""
    others = {f"^{n}$" for other in ROLES if other != role for n in roles.names(other) if n in names}
    return bool(names) and len(others) == len(names) and others <= set(REFERENCE_ROLE_PATTERNS.values())


def _eligible_groups(entries: list[Entry], config: SelectConfig) -> dict[str, list[Entry]]:
    """Candidates grouped by module type, in order of first appearance, after type filters."""
    types = list(dict.fromkeys(e.module_type for e in entries if e.candidate))
    for flag, patterns in (("--include-type", config.include_types), ("--exclude-type", config.exclude_types)):
        for pattern in patterns:
            if not any(re.search(pattern, t) for t in types):
                raise InputError(f"{flag} {pattern!r} matches no module type; the types are: {', '.join(types)}")
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        if not entry.candidate:
            entry.reason = entry.reason or f"not scanned: {entry.skip_reason}"
            continue
        kind = entry.module_type
        if config.include_types and not any(re.search(p, kind) for p in config.include_types):
            entry.reason = entry.reason or f"type {kind!r} not in --include-type"
            continue
        excluded = next((p for p in config.exclude_types if re.search(p, kind)), None)
        if excluded:
            entry.reason = entry.reason or f"type {kind!r} excluded by --exclude-type {excluded!r}"
            continue
        groups.setdefault(kind, []).append(entry)
    if not groups:
        raise InputError("no module type is left to select from after --include-type/--exclude-type")
    return groups


def _apply_policy(groups: dict[str, list[Entry]], config: SelectConfig, ranking: Ranking, entries: list[Entry]) -> None:
    if config.policy == "per-type" and config.depth_aware:
        for kind, members in groups.items():
            _take_top_of_upper_layers(members, ranking, config.top_percent, f"in {kind}")
    elif config.policy == "per-type":
        for kind, members in groups.items():
            _take_top(members, ranking, config.top_percent, f"in {kind}")
    elif config.policy == "global":
        _take_top([e for members in groups.values() for e in members], ranking, config.top_percent, "across all selected types")
    else:
        _take_budget(groups, config.budget_percent, ranking, entries)


def _take_top(members: list[Entry], ranking: Ranking, percent: float, scope: str) -> None:
    ranked = sorted(members, key=ranking.key, reverse=True)
    keep = int(len(ranked) * percent / 100)
    for rank, entry in enumerate(ranked, start=1):
        entry.rank, entry.group_size = rank, len(ranked)
        where = f"rank {rank} of {len(ranked)} {scope} by {ranking.label}; the top {percent:g}% keeps {keep}"
        if rank <= keep:
            entry.picked = True
            entry.reason = f"{entry.reason}; also {where}" if entry.always_train else f"selected: {where}"
        elif not entry.always_train:
            entry.reason = f"frozen: {where}"


def _take_top_of_upper_layers(members: list[Entry], ranking: Ranking, percent: float, scope: str) -> None:
    """The same share as the reference, chosen by snr among the upper 2x share of layers.

    Backward stops at the lowest trainable tensor, so the deepest trainable layer sets the cost
    of every step; picking from the upper layers bounds it, and snr still decides within them.
    """
    keep = int(len(members) * percent / 100)
    by_depth = sorted(members, key=lambda e: layer_index(e.tensor_name) if layer_index(e.tensor_name) is not None else -1, reverse=True)
    pool = {id(e) for e in by_depth[: min(len(members), 2 * keep)]}
    ranked = sorted(members, key=ranking.key, reverse=True)
    chosen = {id(e) for e in [e for e in ranked if id(e) in pool][:keep]}
    kept = f"depth-aware keeps the best {keep} of the upper {len(pool)} layers"
    for rank, entry in enumerate(ranked, start=1):
        entry.rank, entry.group_size = rank, len(ranked)
        where = f"rank {rank} of {len(ranked)} {scope} by {ranking.label}; {kept}"
        if id(entry) in chosen:
            entry.picked = True
            entry.reason = f"{entry.reason}; also {where}" if entry.always_train else f"selected: {where}"
        elif not entry.always_train:
            entry.reason = f"frozen: {where}"


def _take_budget(groups: dict[str, list[Entry]], percent: float, ranking: Ranking, entries: list[Entry]) -> None:
    cost = _budget_cost(entries)
    total = sum(e.parameter_count for e in entries)
    budget = total * percent / 100
    used = sum(cost(e) for e in entries if e.always_train)
    if used > budget:
        raise InputError(
            f"the always-train tensors alone hold {used:,} parameters, more than the {percent:g}% budget ({int(budget):,} of {total:,}); "
            "raise --budget-percent or change --always-train"
        )
    ranked = sorted((e for members in groups.values() for e in members), key=ranking.key, reverse=True)
    for rank, entry in enumerate(ranked, start=1):
        entry.rank, entry.group_size = rank, len(ranked)
        if entry.always_train:
            continue
        if used + cost(entry) <= budget:
            used += cost(entry)
            entry.picked = True
            entry.reason = f"selected: rank {rank} of {len(ranked)} by {ranking.label}, fits the {percent:g}% parameter budget"
        else:
            entry.reason = f"frozen: rank {rank} of {len(ranked)} by {ranking.label}, would exceed the {percent:g}% parameter budget"


def _require_parameter_counts(entries: list[Entry]) -> None:
    if any(e.parameter_count is None for e in entries):
        raise InputError("the budget policy needs parameter counts, which a reference JSON lacks; use an SNR table from `spectrum scan`")


def _budget_cost(entries: list[Entry]) -> Callable[[Entry], int]:
    """The budget's cost rule: a module trains its weight and its bias (an always-trained bias counts as always-train)."""
    _require_parameter_counts(entries)
    biases = _module_biases(entries)

    def cost(entry: Entry) -> int:
        bias = biases.get(entry.tensor_name)
        return entry.parameter_count + (bias.parameter_count if bias is not None and not bias.always_train else 0)

    return cost


def _open_memory_fit(config: SelectConfig, store: ArtifactStore | None, source: SnrSource) -> MemoryFit:
    """The model of the SNR input on the meta device, checked against the table, and the setup and memory to fit."""
    from .selection.fit import MemoryFit, find_model_config, setup_of
    from .training.memory_plan import parse_size

    _require_parameter_counts(source.entries)
    model_config = find_model_config(config.model, config.snr_input, config.snr_run, store)
    fit = MemoryFit(model_config, setup_of(config), parse_size(config.fit_gpu_memory, "--fit-gpu-memory"), config.fit_gpu_memory)
    fit.check_structure([e.tensor_name for e in source.entries], source.structure)
    return fit


def _take_memory_fit(
    groups: dict[str, list[Entry]], ranking: Ranking, entries: list[Entry], fit: MemoryFit
) -> tuple[float, dict[str, Any]]:
    """The budget policy's ranking trained from the top while the memory plan fits: (the budget it comes to, the fit's record).

    Each pick trains its weight and its module's bias (the budget's cost rule), after the always-train tensors.
    """
    from .training.memory_plan import gib

    cost = _budget_cost(entries)
    biases = _module_biases(entries)

    def trained(entry: Entry) -> tuple[str, ...]:
        bias = biases.get(entry.tensor_name)
        return (entry.tensor_name, bias.tensor_name) if bias is not None else (entry.tensor_name,)

    ranked = sorted((e for members in groups.values() for e in members), key=ranking.key, reverse=True)
    for rank, entry in enumerate(ranked, start=1):
        entry.rank, entry.group_size = rank, len(ranked)
    order = [e for e in ranked if not e.always_train]
    always = [name for e in entries if e.always_train for name in trained(e)]
    found = fit.largest(always, [trained(e) for e in order], [e.tensor_name for e in order])
    per_gpu = f"{fit.memory_text} per GPU"
    for position, entry in enumerate(order):
        where = f"rank {entry.rank} of {len(ranked)} by {ranking.label}"
        if position < found.count:
            entry.picked = True
            entry.reason = f"selected: {where}; the top {found.count} plan {gib(found.plan.total)}, within {per_gpu}"
        elif position == found.count:
            entry.reason = f"frozen: {where}; training it too plans {gib(found.next_plan.total)}, more than {per_gpu}"
        else:
            entry.reason = f"frozen: {where}, below the largest selection that fits {per_gpu}"
    used, total = sum(cost(e) for e in entries if e.chosen), sum(e.parameter_count for e in entries)
    next_tensor = order[found.count].tensor_name if found.next_plan is not None else None
    return _percent_covering(used, total), fit.record(found, next_tensor)


def _percent_covering(used: int, total: int) -> float:
    """The smallest percentage whose budget (total * percent / 100, as the budget policy computes it) holds `used`."""
    percent = 100 * used / total
    while total * percent / 100 < used:
        percent = math.nextafter(percent, math.inf)
    return percent


def _module_biases(entries: list[Entry]) -> dict[str, Entry]:
    """`<module>.weight` -> the entry of `<module>.bias`, for the modules that have one."""
    by_name = {e.tensor_name: e for e in entries}
    pairs = ((e.tensor_name, by_name.get(bias)) for e in entries if (bias := module_bias(e.tensor_name)) is not None)
    return {name: bias for name, bias in pairs if bias is not None}


def _train_module_parameters(entries: list[Entry]) -> list[str]:
    """Mark what the YAML trains beyond the chosen tensors, so that the selection has one meaning; return lines to add.

    Axolotl applies each line with `re.match`: a policy pick's line is its module's name, which
    matches the module's `.weight` and its `.bias` (and any name it is a prefix of). A module
    line that would also match another module's tensor (`…mlp.gate` of `…mlp.gate_proj.weight`)
    is written `^<module>\\.` instead. An always-train tensor's line names it alone, so its
    module's bias gets an exact line of its own.
    """
    by_name = {e.tensor_name: e for e in entries}
    names = sorted(by_name)
    biases = _module_biases(entries)
    lines: list[str] = []
    matched = _names_matched([e.yaml_name for e in entries if e.picked], names)
    narrowed: dict[str, str] = {}  # a module line that would also match another module's tensor -> `^<module>\.`
    for entry in [e for e in entries if e.picked]:
        module = entry.tensor_name.removesuffix(".weight") if entry.tensor_name.endswith(".weight") else None
        if module is not None and any(n != module and not n.startswith(f"{module}.") for n in matched[entry.yaml_name]):
            narrowed[entry.tensor_name] = entry.yaml_name = f"^{re.escape(module)}\\."
    matched.update(_names_matched(list(narrowed.values()), names))
    for entry in [e for e in entries if e.chosen]:
        module = entry.tensor_name.removesuffix(".weight") if entry.tensor_name.endswith(".weight") else None
        if entry.picked:
            prefixed = matched[entry.yaml_name]
        else:
            bias = biases.get(entry.tensor_name)
            prefixed = [bias.tensor_name] if bias is not None and not bias.chosen else []
            lines.extend(f"^{re.escape(name)}$" for name in prefixed)
        for name in prefixed:
            other = by_name[name]
            if other.selected:
                continue
            other.trained_with = entry.tensor_name
            if module is not None and name == f"{module}.bias":
                other.reason = f"trained with its module {module}: its weight is {entry.reason}"
            else:
                line = entry.yaml_name if entry.picked else f"^{re.escape(name)}$"
                other.reason = f"trained: the unfrozen_parameters line {line!r} of {entry.tensor_name} matches it (re.match, as Axolotl)"
    return lines


def _names_matched(lines: list[str], names: list[str]) -> dict[str, list[str]]:
    """Each YAML line -> the names it re.matches (in the order of `names`), as training will apply it."""
    matcher = PatternSet(lines, "the unfrozen_parameters YAML")
    matched: dict[str, list[str]] = {line: [] for line in lines}
    for name in names:
        for line in matcher.matching(name):
            matched[line].append(name)
    return matched


def unfrozen_parameters(always_lines: list[str], groups: dict[str, list[Entry]]) -> UnfrozenParameters:
    """The reference tool's layout: always-train patterns, then `# <type> layers` and names by snr rank."""
    lines = list(always_lines)
    headings = []
    for kind, members in groups.items():
        headings.append((len(lines), kind))
        lines.extend(e.yaml_name for e in sorted((e for e in members if e.picked), key=lambda e: e.rank))
    return UnfrozenParameters(tuple(lines), tuple(headings))


def _percent_text(config: SelectConfig) -> str:
    return f"{config.budget_percent:g}% budget" if config.policy == "budget" else f"top {config.top_percent:g}%"


def _document(
    config: SelectConfig,
    source: SnrSource,
    entries: list[Entry],
    groups: dict[str, list[Entry]],
    always_lines: list[str],
    memory_fit: dict[str, Any] | None = None,
) -> SelectionDocument:
    selected = [e for e in entries if e.selected]
    counts_known = all(e.parameter_count is not None for e in entries)
    total = sum(e.parameter_count for e in entries) if counts_known else None
    trainable = sum(e.parameter_count for e in selected) if counts_known else None
    policy = {
        "policy": config.policy,
        "top_percent": config.top_percent if config.policy != "budget" else None,
        "budget_percent": config.budget_percent if config.policy == "budget" else None,
        "include_types": config.include_types,
        "exclude_types": config.exclude_types,
        "depth_aware": config.depth_aware,
        "always_train": config.always_train,
        **config.ranking_options(),  # only when not the snr ranking: other selection.json bytes unchanged
    }
    return SelectionDocument(
        trainable_tensors=tuple(e.tensor_name for e in entries if e.chosen),
        # What training updates: the chosen tensors and their modules' biases, exactly the names the YAML's lines match.
        # A reference JSON lists the scanned weights only, so the biases are not known: null (trainers add each module's bias).
        parameters=tuple(e.tensor_name for e in selected) if source.every_tensor else None,
        unfrozen_parameters=(*always_lines, *(e.yaml_name for members in groups.values() for e in members if e.picked)),
        recorded_policy=policy,
        stage=LAYER_SELECT,
        code_version=__version__,
        source=str(config.snr_input) if config.snr_input else f"run {config.snr_run}",
        model_id=source.model_id,
        model_structure=source.structure,
        estimator=source.estimator,
        roles_source=source.roles.source,
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_fraction=(trainable / total) if counts_known and total else None,
        by_type={kind: {"selected": sum(e.selected for e in members), "candidates": len(members)} for kind, members in groups.items()},
        memory_fit=memory_fit,
    )


def _selection_table(entries: list[Entry], config: SelectConfig, memory_fit: dict[str, Any] | None = None) -> pa.Table:
    schema = pa.schema(
        [
            ("tensor_name", pa.string()),
            ("yaml_name", pa.string()),
            ("module_type", pa.string()),
            ("snr", pa.float64()),
            ("parameter_count", pa.int64()),
            ("selected", pa.bool_()),
            ("picked_by_policy", pa.bool_()),
            ("always_train", pa.bool_()),
            ("rank", pa.int64()),
            ("group_size", pa.int64()),
            ("reason", pa.string()),
            ("trained_with", pa.string()),
            ("policy", pa.string()),
            ("top_percent", pa.float64()),
            ("budget_percent", pa.float64()),
        ]
    )
    rows = [
        {
            "tensor_name": e.tensor_name,
            "yaml_name": e.yaml_name,
            "module_type": e.module_type,
            "snr": e.snr,
            "parameter_count": e.parameter_count,
            "selected": e.selected,
            "picked_by_policy": e.picked,
            "always_train": e.always_train,
            "rank": e.rank,
            "group_size": e.group_size,
            "reason": e.reason,
            "trained_with": e.trained_with,
            "policy": config.policy,
            "top_percent": config.top_percent if config.policy != "budget" else None,
            "budget_percent": config.budget_percent if config.policy == "budget" else None,
        }
        for e in entries
    ]
    metadata = {}
    if memory_fit is not None:  # what was asked and what the selection plans, beside the rows it explains
        metadata[f"{METADATA_PREFIX}memory_fit"] = json.dumps(memory_fit)
    if config.ranking_options():  # a control's ranking (inverse, random and its seed); none for the snr ranking
        metadata[f"{METADATA_PREFIX}ranking"] = json.dumps(config.ranking_options())
    if metadata:
        schema = schema.with_metadata(metadata)
    return pa.Table.from_pylist(rows, schema=schema)


def report(result: SelectResult) -> str:
    s = result.summary
    params = ""
    if s["trainable_parameters"] is not None:
        params = f", {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters ({100 * s['trainable_fraction']:.1f}%)"
    extra = len(s["parameters"]) - len(s["trainable_tensors"]) if s["parameters"] is not None else 0
    with_modules = f" (and {extra} bias{'es' if extra != 1 else ''} of their modules)" if extra else ""
    fit = s.get("memory_fit")
    if fit is not None:
        params += f"; plans {fit['planned_bytes']['total'] / 2**30:.2f} GiB per GPU of the {fit['gpu_memory']} it was fitted to"
    return f"selected {len(s['trainable_tensors'])} tensors{with_modules}{params}" + (f" -> {result.out_dir}" if result.out_dir else "")


STAGE = Stage(
    name=LAYER_SELECT,
    command="select",
    config=SelectConfig,
    run=run,
    description=__doc__,
    check=_validate,
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
