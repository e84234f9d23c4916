"""compare: the same CPT budget for full fine-tuning, Spectrum selections and LoRA, each an auditable run, tabulated.

The methods, the config of each arm's stages, and the tabulation (the compare stage's own work,
committed as the comparison run) live here; running the arms is the compare flow's job
(flows/compare.py), over the same stage tasks as the pipeline, so an arm's stages run in any
execution mode (`--execution cpt=deployment` sends its training to the GPU pool).

Every arm goes through the real stages: layer_select (for a Spectrum arm, from the scan of MODEL
that this comparison run records: `snr_scan` with the reference estimator, the step
`snr_scan.gavish_donoho` for the Gavish–Donoho arm), cpt (by default in a process of its own, `python
-m stages.cpt`, exactly what a container runs, so its peak memory is its own) and evaluate, under
the run id `<run>-<method>`. The `comparison` table then holds per method: trainable parameters,
median time per step after warm-up, total training time, peak memory, final loss, held-out and
general perplexity (base and trained), and ratios to full fine-tuning. Arms already committed are
reused through the stages' cache keys, so an interrupted comparison resumes where it stopped.

The controls: `spectrum-25-random` and `spectrum-25-inverse` select Spectrum-25's per-type counts
and always-trained embeddings by a seeded random order and by the lowest snr (layer_select
--rank-by); `spectrum-25-no-embeddings` is Spectrum-25's selection with the embeddings frozen.
With `--seeds N` every arm runs N times, with the training seeds --seed … --seed+N-1 (the data
order, and the random arm's draw), as the runs `<run>-<method>-s<seed>`; the table keeps a row per
arm and seed, and comparison.json/.md add each arm's mean ± standard deviation and its paired 95%
interval to Spectrum-25 (stages/compare_stats.py).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import compare_stats, cpt
from .base.contracts import (
    COMPARE,
    COMPARISON_TABLE,
    CPT,
    EVALUATE,
    EVALUATION_JSON_FILE,
    EVALUATION_TABLE,
    LAYER_SELECT,
    SNR_SCAN,
    TRAINING_FILE,
    TRAINING_METRICS_TABLE,
)
from .base.errors import InputError
from .base.files import ensure_writable, write_atomic
from .core.execution import StageRun, execute_stage, require_store_in
from .core.stage import StageConfig, StageContext, StageResult, option, options_of
from .store import ArtifactStore, Manifest, ObjectInfo, output_key, read_output, read_table
from .store.uri import uri_scheme

COMPARISON_JSON_FILE = "comparison.json"
COMPARISON_MARKDOWN_FILE = "comparison.md"
WARMUP_STEPS = 2  # steps left out of the median step time


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    top_percent: float | None = None  # a Spectrum selection of this share per module type
    estimator: str = "reference"
    depth_aware: bool = False
    full: bool = False
    lora: bool = False
    rank_by: str = "snr"  # layer_select --rank-by: inverse and random are the controls of the snr ranking
    embeddings: bool = True  # the embeddings and lm_head always trained (layer_select's default always-train roles)


METHODS = {
    m.name: m
    for m in (
        Method("full", "full fine-tuning (every parameter)", full=True),
        Method("spectrum-50", "Spectrum, top 50% per module type (reference policy)", top_percent=50.0),
        Method("spectrum-25", "Spectrum, top 25% per module type (reference policy)", top_percent=25.0),
        Method("spectrum-25-no-embeddings", "Spectrum-25's selection, embeddings and lm_head frozen", top_percent=25.0, embeddings=False),
        Method("spectrum-25-depth-aware", "Spectrum-25 from the upper layers, embeddings frozen", top_percent=25.0, depth_aware=True),
        Method("spectrum-25-gavish-donoho", "Spectrum-25 ranked by the Gavish–Donoho SNR", top_percent=25.0, estimator="gavish-donoho"),
        Method("spectrum-25-random", "control: Spectrum-25's per-type counts, chosen at random", top_percent=25.0, rank_by="random"),
        Method("spectrum-25-inverse", "control: Spectrum-25's per-type counts, the lowest SNR", top_percent=25.0, rank_by="inverse"),
        Method("lora", "LoRA adapters on every linear layer (peft), merged after training", lora=True),
    )
}
COMPARISON_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("seed", pa.int64()),  # the arm's training seed (the data order; the random arm's draw)
        ("cpt_run", pa.string()),
        ("evaluate_run", pa.string()),
        ("trainable_parameters", pa.int64()),
        ("total_parameters", pa.int64()),
        ("trainable_share", pa.float64()),
        ("step_seconds", pa.float64()),
        ("train_seconds", pa.float64()),
        ("peak_memory_mib", pa.float64()),
        ("final_loss", pa.float64()),
        ("heldout_perplexity_base", pa.float64()),
        ("heldout_perplexity", pa.float64()),
        ("general_perplexity_base", pa.float64()),
        ("general_perplexity", pa.float64()),
        ("time_ratio", pa.float64()),  # to full fine-tuning
        ("memory_ratio", pa.float64()),
    ]
)


ARM_STAGES = (SNR_SCAN, LAYER_SELECT, CPT, EVALUATE)
# The options every arm's cpt takes from the comparison as they are (--lora-rank goes to the LoRA arm only).
TRAINING_OPTIONS = (
    "max_steps",
    "seq_len",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "warmup_steps",
    "seed",
    "zero_stage",
    "heldout_percent",
    "text_field",
)


def _training_option(name: str, default: Any, help: str | None = None) -> Any:
    """cpt's option `name` (its flag and cache role) with the comparison's default: the option is declared once, by cpt."""
    spec = next(spec for f, spec in options_of(cpt.CptConfig) if f.name == name)
    text = help or re.sub(r"\s*\(default [^)]*\)$", "", spec.help)
    return option(
        *spec.flags, default=default, cache=spec.cache, choices=spec.choices, metavar=spec.metavar, help=f"{text} (default {default})"
    )


@dataclass
class CompareConfig(StageConfig):
    model: str = option(positional=True, help="base model: a Hugging Face folder or a stored model URI")
    data: str | None = option(default=None, help="the data drop every arm trains on (folder or stored URI)")
    methods: list[str] = option(
        "--method", default_factory=list, cache=True, metavar="METHOD", help=f"an arm (repeatable; default all): {', '.join(METHODS)}"
    )
    max_steps: int = _training_option("max_steps", 20)
    seq_len: int = _training_option("seq_len", 256, "tokens per sequence, training and evaluation")
    micro_batch_size: int = _training_option("micro_batch_size", 1)
    gradient_accumulation_steps: int = _training_option("gradient_accumulation_steps", 1)
    learning_rate: float = _training_option("learning_rate", 1e-4)
    warmup_steps: int = _training_option("warmup_steps", 2)
    seed: int = _training_option("seed", 0)
    seeds: int = option(
        default=1,
        metavar="N",
        help="run every arm N times, with the training seeds --seed … --seed+N-1 (the data order; the random arm's draw), "
        "and report each arm's mean ± sd and its paired 95-percent t-interval to spectrum-25 (default 1)",
    )
    zero_stage: int = _training_option("zero_stage", 2)
    lora_rank: int = _training_option("lora_rank", 16, "rank of the LoRA arm")
    heldout_percent: float = _training_option("heldout_percent", 5.0)
    text_field: str = _training_option("text_field", "text")
    eval_max_tokens: int = option(default=16384, cache=True, help="tokens evaluated per dataset (default 16384)")
    general: str | None = option(default=None, help="general text for the forgetting probe (default: Python's documentation)")
    out_dir: str | None = option("--out-dir", "-o", default=None, help="also write comparison.json and comparison.md here")
    overwrite: bool = option(default=False, help="replace files in --out-dir")
    execution: list[str] = option(
        default_factory=list,
        metavar="STAGE=MODE",
        help="how an arm's stage runs: in-process, subprocess or deployment (its work pool: cpt=deployment for the GPU pool); "
        "repeatable; default cpt=subprocess, the others in-process",
    )

    def cache_parameters(self) -> dict[str, Any]:
        """--seeds is in the cache key only when more than one, so a one-seed comparison keeps its key."""
        parameters = super().cache_parameters()
        return parameters | {"seeds": self.seeds} if self.seeds != 1 else parameters

    @property
    def training_seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))


@dataclass(frozen=True)
class Arm:
    method: Method
    seed: int
    training: Manifest
    evaluation: Manifest


def check(config: CompareConfig) -> list[Method]:
    """The comparison's options, before any arm runs; returns its methods."""
    methods = _methods(config)
    if config.data is None:
        raise InputError("no data: pass --data (the drop every arm trains on)")
    if isinstance(config.seeds, bool) or not isinstance(config.seeds, int) or config.seeds < 1:
        raise InputError(f"--seeds must be a whole number 1 or more (the runs of each arm), got {config.seeds!r}")
    if config.seed < 0:
        raise InputError(f"--seed must be 0 or more, got {config.seed}")
    if config.out_dir:
        for name in (COMPARISON_JSON_FILE, COMPARISON_MARKDOWN_FILE):
            ensure_writable(Path(config.out_dir) / name, config.overwrite)
    for what, location in (("MODEL", config.model), ("--data", config.data)):
        if _local(location) and not Path(location).expanduser().is_dir():  # before any arm starts
            raise InputError(f"{location} is not a folder (or does not exist): pass {what} as a folder or a store URI")
    return methods


def execution_modes(config: CompareConfig, modes: tuple[str, ...]) -> dict[str, str]:
    """--execution STAGE=MODE options -> stage -> mode (default: cpt in a process of its own, so its peak memory is its own)."""
    chosen = {CPT: "subprocess"}
    for item in config.execution:
        stage, _, mode = item.partition("=")
        if stage not in ARM_STAGES or mode not in modes:
            raise InputError(
                f"--execution {item!r}: expected STAGE=MODE with STAGE one of {', '.join(ARM_STAGES)} and MODE one of {', '.join(modes)}"
            )
        chosen[stage] = mode
    if "deployment" in chosen.values():  # a deployment's worker (the GPU pool) sees the store, not this machine's folders
        for flag, location in (("MODEL", config.model), ("--data", config.data), ("--general", config.general)):
            if location is not None and _local(location):
                raise InputError(
                    f"{flag} {location} is a local path, but an arm's stage runs as a deployment on another machine: "
                    "store it first (spectrum download … --store S) and pass its store URI"
                )
    return chosen


def _local(location: str) -> bool:
    """A local path (not store:…, s3://… or file://…)."""
    return not location.startswith("store:") and uri_scheme(location) is None


def scan_step(estimator: str) -> str | None:
    """The step of the comparison run that holds the scan by `estimator` (the reference scan is snr_scan itself)."""
    return None if estimator == "reference" else estimator.replace("-", "_")


def arm_run_id(run_id: str, method: Method, seed: int, config: CompareConfig) -> str:
    """`<run>-<method>`, and `-s<seed>` after it when the comparison runs more than one seed."""
    return f"{run_id}-{method.name}" if config.seeds == 1 else f"{run_id}-{method.name}-s{seed}"


def stage_options(method: Method, config: CompareConfig, seed: int | None = None) -> dict[str, dict[str, Any]]:
    """The own options of each stage an arm runs with training seed `seed` (default --seed); its inputs come from the
    steps before, as the stages declare them.

    snr_scan is the comparison run's scan by the method's estimator; layer_select runs for a Spectrum arm only (the random
    arm draws with the training seed).
    """
    seed = config.seed if seed is None else seed
    options: dict[str, dict[str, Any]] = {
        CPT: {
            "full": method.full,
            "lora_rank": config.lora_rank if method.lora else 0,
            **{name: getattr(config, name) for name in TRAINING_OPTIONS},
            "seed": seed,
        },
        EVALUATE: {
            "general": config.general,
            "text_field": config.text_field,
            "seq_len": config.seq_len,
            "max_tokens": config.eval_max_tokens,
            "snr_drift": False,
        },
    }
    if method.top_percent is not None:
        options[SNR_SCAN] = {"estimator": method.estimator}
        options[LAYER_SELECT] = {"top_percent": method.top_percent, "depth_aware": method.depth_aware}
        if method.rank_by != "snr":
            options[LAYER_SELECT] |= {"rank_by": method.rank_by, **({"rank_seed": seed} if method.rank_by == "random" else {})}
        if not method.embeddings:
            options[LAYER_SELECT]["always_train"] = []
    return options


def tabulate(config: CompareConfig, context: StageContext, arms: list[Arm]) -> StageResult[list[dict[str, Any]]]:
    """The compare stage's own work: the arms' records tabulated and committed as the comparison run."""
    store = require_store_in(context, COMPARE)
    rows = _rows(store, arms)
    inputs = [
        recorded
        for arm in arms
        for manifest, name in ((arm.training, TRAINING_FILE), (arm.evaluation, EVALUATION_JSON_FILE))
        for recorded in [manifest.recorded_output(output_key(manifest.run_id, manifest.stage, name))]
    ]
    summary = compare_stats.summarize(rows) if config.seeds > 1 else None
    markdown = markdown_table(rows) if summary is None else summary_markdown(summary) + "\n" + markdown_table(rows)
    document = {"methods": rows} if summary is None else {"methods": rows, "baseline": compare_stats.BASELINE, "summary": summary}
    document_bytes = (json.dumps(document, indent=2) + "\n").encode()

    def produce(stage: StageRun) -> list[ObjectInfo]:
        return [
            stage.write_table(COMPARISON_TABLE, pa.Table.from_pylist(rows, schema=COMPARISON_SCHEMA)),
            stage.put_bytes(COMPARISON_JSON_FILE, document_bytes),
            stage.put_bytes(COMPARISON_MARKDOWN_FILE, markdown.encode()),
        ]

    outcome = execute_stage(COMPARE, context, config.cache_parameters(), inputs, produce)
    if config.out_dir:
        write_atomic(Path(config.out_dir) / COMPARISON_JSON_FILE, document_bytes, True)
        write_atomic(Path(config.out_dir) / COMPARISON_MARKDOWN_FILE, markdown.encode(), overwrite=True)
    return StageResult(COMPARE, (markdown.rstrip(), outcome.describe(store)), outcome.manifest, outcome.cached, detail=rows)


def _methods(config: CompareConfig) -> list[Method]:
    names = config.methods or list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise InputError(f"unknown comparison method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise InputError(f"--method lists a method twice: {', '.join(names)}")
    return [METHODS[n] for n in names]


def _rows(store: ArtifactStore, arms: list[Arm]) -> list[dict[str, Any]]:
    """One row per arm and seed; the ratios are to full fine-tuning with the same seed."""
    rows = [_row(store, arm) for arm in arms]
    fulls = {r["seed"]: r for r in rows if r["method"] == "full"}
    for row in rows:
        full = fulls.get(row["seed"])
        row["time_ratio"] = row["step_seconds"] / full["step_seconds"] if full and full["step_seconds"] else None
        row["memory_ratio"] = row["peak_memory_mib"] / full["peak_memory_mib"] if full and full["peak_memory_mib"] else None
    return rows


def _row(store: ArtifactStore, arm: Arm) -> dict[str, Any]:
    training_manifest, evaluation_manifest = arm.training, arm.evaluation
    record, _ = read_output(store, training_manifest, TRAINING_FILE)
    training = json.loads(record)
    metrics = _rows_of(store, TRAINING_METRICS_TABLE, training_manifest)
    metrics.sort(key=lambda m: m["step"])
    timed = metrics[WARMUP_STEPS:] or metrics
    evaluation = _rows_of(store, EVALUATION_TABLE, evaluation_manifest)
    values = {(r["model"], r["metric"], r["dataset"]): r["value"] for r in evaluation}
    general = next((r["dataset"] for r in evaluation if r["metric"] == "perplexity" and r.get("role") == "general"), None)
    return {
        "method": arm.method.name,
        "seed": arm.seed,
        "cpt_run": training_manifest.run_id,
        "evaluate_run": evaluation_manifest.run_id,
        "trainable_parameters": training["trainable_parameters"],
        "total_parameters": training["total_parameters"],
        "trainable_share": training["trainable_parameters"] / training["total_parameters"],
        "step_seconds": statistics.median(m["step_seconds"] for m in timed),
        "train_seconds": training["seconds"],
        "peak_memory_mib": max(m["peak_memory_bytes"] for m in metrics) / 2**20,
        "final_loss": metrics[-1]["loss"],
        "heldout_perplexity_base": values.get(("base", "perplexity", "heldout")),
        "heldout_perplexity": values.get(("trained", "perplexity", "heldout")),
        "general_perplexity_base": values.get(("base", "perplexity", general)),
        "general_perplexity": values.get(("trained", "perplexity", general)),
    }


def _rows_of(store: ArtifactStore, table: str, manifest: Manifest) -> list[dict[str, Any]]:
    return [r for r in read_table(store, table, run_id=manifest.run_id).to_pylist() if r["stage"] == manifest.stage]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per arm; a seed column after the method when the rows hold more than one seed."""
    seeded = len({r.get("seed") for r in rows}) > 1
    columns = "trainable | s/step | time | peak MiB | memory | final loss | held-out ppl | general ppl |"
    header = f"| method | {'seed | ' * seeded}{columns}\n|---|{'---|' * seeded}---|---|---|---|---|---|---|---|\n"

    def ratio(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}×"

    lines = [
        f"| {r['method']} | {_seed_cell(r) * seeded}{r['trainable_share']:.1%} | {r['step_seconds']:.3f} | "
        f"{ratio(r['time_ratio'])} | {r['peak_memory_mib']:.0f} | {ratio(r['memory_ratio'])} | {r['final_loss']:.3f} | "
        f"{_pair(r['heldout_perplexity_base'], r['heldout_perplexity'])} | {_pair(r['general_perplexity_base'], r['general_perplexity'])} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def _seed_cell(row: dict[str, Any]) -> str:
    return f"{row.get('seed')} | "


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    """Mean ± sd per arm over its seeds, then each arm's paired difference to the baseline with its 95% t-interval."""
    seeds = max(len(entry["seeds"]) for entry in summary)
    lines = [f"Mean ± standard deviation over {seeds} seeds:", "", *_markdown_rows(*compare_stats.spread_table(summary))]
    base = compare_stats.BASELINE
    differences = compare_stats.difference_table(summary)
    if differences is None:
        return "\n".join([*lines, "", f"No paired differences: {base} is not among the arms."]) + "\n"
    lines += ["", f"Paired difference to {base} (arm − {base}, paired by seed): mean [95% t-interval]; * marks an interval"]
    lines += ["that excludes 0 (significant at 95% for that interval alone: no correction for the many intervals tested).", ""]
    return "\n".join([*lines, *_markdown_rows(*differences)]) + "\n"


def _markdown_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(row)} |" for row in rows)]


def _pair(before: float | None, after: float | None) -> str:
    return "–" if before is None or after is None else f"{before:.2f} → {after:.2f}"
