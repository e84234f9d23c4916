"""evaluate stage: perplexity on held-out domain data, a forgetting probe, SFT eval loss and SNR drift.

Both the trained model and its base are measured the same way, so every number has its delta:
perplexity on the domain's held-out split (the documents cpt held out, or --data), perplexity on
a general corpus (the forgetting probe: Python's own documentation, shipped with every CPython,
or --general), the loss on the assistant tokens of held-out chat rows (sft's, or --chat-data),
the SNR drift of every matrix (the snr_scan stage run on both models as steps of this run,
cached like any scan: a tensor whose bytes did not change must show none), and optional
lm-evaluation-harness tasks from a local folder, offline (--task, --tasks-dir). Perplexity follows
one convention (stages/evaluation/perplexity.py). Results: the `evaluation` and `snr_drift`
tables and evaluation.json in the store (and in --out-dir).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import snr_scan
from .core.cli import stage_main
from .core.contracts import (
    CPT,
    EVALUATE,
    EVALUATION_JSON_FILE,
    EVALUATION_TABLE,
    HELDOUT_DATA_FILE,
    MODEL_FOLDER,
    SFT,
    SNR_DRIFT_TABLE,
    SNR_TABLE,
    TRAINING_FILE,
)
from .core.errors import InputError
from .core.execution import StageRun, execute_stage, require_store_in
from .core.files import all_files, ensure_writable, write_atomic
from .core.stage import Stage, StageConfig, StageContext, StageResult, option
from .evaluation.corpus import Corpus, from_path, python_docs
from .evaluation.drift import snr_drift
from .evaluation.harness import require_tasks, run_tasks
from .evaluation.perplexity import Likelihood, assistant_loss, likelihood, token_stream
from .scan.spectra import resolve_device
from .store import (
    ArtifactStore,
    ObjectInfo,
    new_run_id,
    output_key,
    read_output,
    read_table_output,
    resolve_run_reference,
    succeeded_manifest,
)
from .store.trees import file_ref, local_copy
from .training.chat import conversations, read_chat_template, tokenize_conversation
from .training.runner import load_tokenizer

EVALUATION_SCHEMA = pa.schema(
    [
        ("model", pa.string()),  # base, trained, or delta (trained - base)
        ("metric", pa.string()),  # perplexity, nll_per_token, sft_eval_loss
        ("dataset", pa.string()),  # heldout, python-docs, chat-heldout, or the name of a --data/--general file
        ("value", pa.float64()),
        ("tokens", pa.int64()),  # predicted tokens the value is computed over
    ]
)
MODELS = ("base", "trained")


@dataclass
class EvaluateConfig(StageConfig):
    model: str | None = option(
        positional=True, default=None, help="the model to evaluate: a folder or store URI (default: the model of --cpt-run/--sft-run)"
    )
    cpt_run: str | None = option(metavar="RUN", default=None, help="evaluate what this cpt run trained: its model, base and held-out split")
    sft_run: str | None = option(metavar="RUN", default=None, help="evaluate what this sft run trained: its model, base and held-out chats")
    base_model: str | None = option(default=None, help="the model before training, for deltas (default: the run's base model)")
    data: str | None = option(default=None, help="domain text (file or folder) instead of the run's held-out split")
    general: str | None = option(
        default=None, help="general text for the forgetting probe (file or folder; default: Python's documentation, offline)"
    )
    chat_data: str | None = option(default=None, help="held-out chat rows (file or folder) for the SFT eval loss")
    chat_template: str | None = option(metavar="FILE", default=None, help="a Jinja chat template instead of the tokenizer's")
    text_field: str = option(default="text", cache=True, help="the text field of JSON/Parquet records (default text)")
    seq_len: int = option(default=512, cache=True, help="tokens per perplexity window and per chat row (default 512)")
    max_tokens: int = option(default=32768, cache=True, help="tokens evaluated per dataset, the first ones (default 32768)")
    batch_size: int = option(default=4, help="windows per forward pass (default 4)")
    device: str = option(default="cpu", help="cpu, cuda, cuda:N, or auto (GPU when present); default cpu")
    tasks: list[str] = option(
        "--task", default_factory=list, cache=True, metavar="TASK", help="an lm-evaluation-harness task from --tasks-dir (repeatable)"
    )
    tasks_dir: str | None = option(metavar="DIR", default=None, help="local lm-evaluation-harness task YAMLs and their data files")
    snr_drift: bool = option(
        default=True, cache=True, negative=("--no-snr-drift", "skip the rescans"), help="scan both models and compare their SNR"
    )
    out_dir: str | None = option("--out-dir", "-o", default=None, help=f"also write {EVALUATION_JSON_FILE} to this local folder")
    overwrite: bool = option(default=False, help="replace files in --out-dir")


@dataclass(frozen=True)
class Sources:
    """What is evaluated, resolved before the stage starts."""

    trained: str  # location of the trained model
    base: str | None  # location of the base model (None: no deltas, no drift)
    domain: Corpus | None
    general: Corpus
    chats: list[tuple[str, list[dict]]]  # (where, messages) held-out chat rows
    inputs: list[dict]  # manifest inputs of the data (the models' are added when they are fetched)


@dataclass
class EvaluationResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    drift: pa.Table | None


def run(config: EvaluateConfig, context: StageContext) -> StageResult[EvaluationResult]:
    store = require_store_in(context, EVALUATE)
    _validate(config)
    if config.out_dir:
        ensure_writable(Path(config.out_dir) / EVALUATION_JSON_FILE, config.overwrite)
    sources = _resolve(config, store)
    trained_dir, trained_refs = _fetch_model(sources.trained, store, "model")
    base = _fetch_model(sources.base, store, "base model") if sources.base else None
    model_inputs = [trained_refs.get(n) or file_ref(trained_dir / n) for n in all_files(trained_dir)]
    if base:
        model_inputs += [base[1].get(n) or file_ref(base[0] / n) for n in all_files(base[0])]
    template = read_chat_template(config.chat_template)
    parameters = {
        **config.cache_parameters(),
        "general_corpus": {"name": sources.general.name, "source": sources.general.source, "sha256": sources.general.sha256},
        "chat_template": template,
        "has_base": base is not None,
    }
    results: list[EvaluationResult] = []
    context = replace(context, run_id=context.run_id or new_run_id())  # the rescans are steps of this run

    def produce(stage: StageRun) -> list[ObjectInfo]:
        models = {"trained": trained_dir, **({"base": base[0]} if base else {})}
        rows = []
        for label in MODELS:
            if label in models:
                rows += _measure(label, models[label], sources, config, template, context.progress)
        rows += _deltas(rows)
        drift = _drift(config, context, sources) if config.snr_drift and base else None
        summary = _summary(rows, drift, sources, config)
        outputs = [stage.write_table(EVALUATION_TABLE, pa.Table.from_pylist(rows, schema=EVALUATION_SCHEMA))]
        if drift is not None:
            outputs.append(stage.write_table(SNR_DRIFT_TABLE, drift))
        outputs.append(stage.put_bytes(EVALUATION_JSON_FILE, _json(summary)))
        results.append(EvaluationResult(rows, summary, drift))
        return outputs

    outcome = execute_stage(EVALUATE, context, parameters, [*model_inputs, *sources.inputs], produce)
    manifest = outcome.manifest
    data, _ = read_output(store, manifest, EVALUATION_JSON_FILE)
    if config.out_dir:
        write_atomic(Path(config.out_dir) / EVALUATION_JSON_FILE, data, overwrite=config.overwrite)
    summary = json.loads(data)
    result = results[0] if results else EvaluationResult([], summary, None)
    return StageResult(EVALUATE, (*_report(summary), outcome.describe(store)), manifest, outcome.cached, detail=result)


def _validate(config: EvaluateConfig) -> None:
    if config.cpt_run and config.sft_run:
        raise InputError("pass --cpt-run or --sft-run, not both (evaluate one training at a time)")
    if not (config.model or config.cpt_run or config.sft_run):
        raise InputError("nothing to evaluate: pass MODEL, --cpt-run RUN or --sft-run RUN")
    for name in ("seq_len", "max_tokens", "batch_size"):
        if getattr(config, name) < (2 if name == "seq_len" else 1):
            raise InputError(f"--{name.replace('_', '-')} is too small: {getattr(config, name)}")
    resolve_device(config.device)
    require_tasks(config.tasks, config.tasks_dir)


def _resolve(config: EvaluateConfig, store: ArtifactStore) -> Sources:
    trained, base, domain, chats, inputs = config.model, config.base_model, None, [], []
    if config.cpt_run or config.sft_run:
        stage, reference = (CPT, config.cpt_run) if config.cpt_run else (SFT, config.sft_run)
        manifest = succeeded_manifest(store, *resolve_run_reference(reference, stage, f"--{stage}-run"), "trained model to evaluate")
        run_id, step = manifest.run_id, manifest.stage  # the run that trained it (a reuse record is followed)
        record, _ = read_output(store, manifest, TRAINING_FILE)
        trained = trained or f"store:runs/{run_id}/{step}/{MODEL_FOLDER}"
        base = base or json.loads(record).get("model")
        if not any(o["key"] == output_key(run_id, step, HELDOUT_DATA_FILE) for o in manifest.outputs):
            raise InputError(f"run {run_id} has no held-out split ({HELDOUT_DATA_FILE}; trained by an older version): pass --data")
        held, info = read_output(store, manifest, HELDOUT_DATA_FILE)
        lines = [json.loads(line) for line in held.decode("utf-8").splitlines() if line.strip()]
        if stage == CPT and not config.data:
            if not lines:
                raise InputError(f"the held-out split of run {run_id} is empty (no document fell in its --heldout-percent): pass --data")
            domain = Corpus("heldout", [line["text"] for line in lines], f"run {run_id} {step} held-out split")
            inputs.append(info.to_dict())
        if stage == SFT and not config.chat_data:
            if not lines:
                raise InputError(
                    f"the held-out chat rows of run {run_id} are empty (no row fell in its --heldout-percent): pass --chat-data"
                )
            chats = [(f"run {run_id} held-out row {n}", line["messages"]) for n, line in enumerate(lines, start=1)]
            inputs.append(info.to_dict())
    if config.data:
        domain = from_path(Path(config.data), Path(config.data).stem, config.text_field)
        inputs += _file_refs(Path(config.data))
    if config.chat_data:
        chats = list(conversations(Path(config.chat_data)))
        if not chats:
            raise InputError(f"{config.chat_data} holds no chat rows: the evaluation set is empty")
        inputs += _file_refs(Path(config.chat_data))
    general = from_path(Path(config.general), Path(config.general).stem, config.text_field) if config.general else python_docs()
    if config.general:
        inputs += _file_refs(Path(config.general))
    if config.tasks:
        inputs += _file_refs(Path(config.tasks_dir))
    return Sources(trained, base, domain, general, chats, inputs)


def _fetch_model(location: str, store: ArtifactStore, what: str) -> tuple[Path, dict[str, dict]]:
    try:
        folder, refs = local_copy(location, store)
    except InputError as exc:
        raise InputError(f"the {what} {location} cannot be used: {exc}") from exc
    if not any(name.endswith(".safetensors") for name in all_files(folder)):
        raise InputError(f"the {what} {folder} has no weights (*.safetensors): pass a Hugging Face model folder")
    load_tokenizer(folder)  # a clear error for a folder without one
    return folder, refs


def _file_refs(path: Path) -> list[dict]:
    return [file_ref(path)] if path.is_file() else [file_ref(path / name) for name in all_files(path)]


def _measure(label: str, folder: Path, sources: Sources, config: EvaluateConfig, template: str | None, progress) -> list[dict]:
    """Every metric of one model: perplexity on each corpus, the SFT eval loss."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(folder)
    if template is not None:
        tokenizer.chat_template = template
    device = resolve_device(config.device)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
    rows = []
    for corpus in (c for c in (sources.domain, sources.general) if c is not None):
        ids = token_stream(corpus.texts, tokenizer, config.max_tokens)
        measured = likelihood(model, ids, config.seq_len, config.batch_size, f"{label} {corpus.name}", progress)
        rows += _rows(label, corpus.name, measured)
    if sources.chats:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"the {label} model's tokenizer has no chat template; pass --chat-template FILE")
        tokenized = [tokenize_conversation(tokenizer, messages, where) for where, messages in sources.chats]
        rows_in = [(ids[: config.seq_len], labels[: config.seq_len]) for ids, labels in tokenized]
        loss = assistant_loss(model, rows_in, config.batch_size, progress)
        rows.append({"model": label, "metric": "sft_eval_loss", "dataset": "chat-heldout", "value": loss.mean, "tokens": loss.tokens})
    del model
    gc.collect()
    if config.tasks:
        rows += [{"model": label, **row} for row in run_tasks(folder, config.tasks, Path(config.tasks_dir), str(device), config.batch_size)]
    return rows


def _rows(label: str, dataset: str, measured: Likelihood) -> list[dict]:
    return [
        {"model": label, "metric": "perplexity", "dataset": dataset, "value": measured.perplexity, "tokens": measured.tokens},
        {"model": label, "metric": "nll_per_token", "dataset": dataset, "value": measured.mean, "tokens": measured.tokens},
    ]


def _deltas(rows: list[dict]) -> list[dict]:
    base = {(r["metric"], r["dataset"]): r for r in rows if r["model"] == "base"}
    deltas = []
    for row in rows:
        earlier = base.get((row["metric"], row["dataset"]))
        if row["model"] == "trained" and earlier is not None:
            deltas.append({**row, "model": "delta", "value": row["value"] - earlier["value"]})
    return deltas


def _drift(config: EvaluateConfig, context: StageContext, sources: Sources) -> pa.Table:
    """Both models scanned by the snr_scan stage as steps of this run (a scan done before is reused)."""
    tables = []
    own = "_".join(filter(None, (EVALUATE, context.step)))  # evaluate.sft scans as snr_scan.evaluate_sft(_base)
    for qualifier, location in ((f"{own}_base", sources.base), (own, sources.trained)):
        scan = snr_scan.run(snr_scan.ScanConfig(model_dir=location, device=config.device), replace(context, step=qualifier))
        data, _ = read_table_output(context.store, scan.manifest, SNR_TABLE)
        tables.append(pq.read_table(pa.BufferReader(data), use_threads=False))
    return snr_drift(*tables)


def _summary(rows: list[dict], drift: pa.Table | None, sources: Sources, config: EvaluateConfig) -> dict[str, Any]:
    metrics: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = metrics.setdefault(f"{row['metric']}/{row['dataset']}", {"metric": row["metric"], "dataset": row["dataset"]})
        entry[row["model"]] = row["value"]
        entry["tokens"] = row["tokens"]
        if "base" in entry and "trained" in entry and entry["base"]:
            entry["relative_change"] = (entry["trained"] - entry["base"]) / entry["base"]
    summary: dict[str, Any] = {
        "model": sources.trained,
        "base_model": sources.base,
        "seq_len": config.seq_len,
        "max_tokens": config.max_tokens,
        "datasets": {
            c.name: {"source": c.source, "documents": len(c.texts), "sha256": c.sha256} for c in (sources.domain, sources.general) if c
        },
        "metrics": list(metrics.values()),
    }
    if drift is not None:
        changed = [r for r in drift.to_pylist() if r["changed"]]
        summary["snr_drift"] = {
            "matrices": drift.num_rows,
            "changed": len(changed),
            "frozen_with_drift": 0,  # snr_drift raises otherwise
            "mean_relative_change_of_changed": sum(r["relative_snr_change"] or 0 for r in changed) / len(changed) if changed else 0.0,
        }
    return summary


def _report(summary: dict[str, Any]) -> list[str]:
    lines = []
    for entry in summary.get("metrics", []):
        if entry["metric"] == "nll_per_token":
            continue
        base, trained = entry.get("base"), entry.get("trained")
        text = f"{entry['metric']} on {entry['dataset']}: "
        if base is not None and trained is not None:
            text += f"{base:.4g} -> {trained:.4g} ({100 * entry.get('relative_change', 0):+.1f}%)"
        else:
            text += f"{trained:.4g}"
        lines.append(f"{text} over {entry['tokens']:,} tokens")
    drift = summary.get("snr_drift")
    if drift:
        lines.append(f"snr drift: {drift['changed']} of {drift['matrices']} matrices changed; frozen ones show none")
    return lines


def _json(document: dict) -> bytes:
    return (json.dumps(document, indent=2, allow_nan=False) + "\n").encode()


STAGE = Stage(
    name=EVALUATE,
    command="evaluate",
    config=EvaluateConfig,
    run=run,
    summary="perplexity (domain held-out and a general forgetting probe), SFT eval loss and SNR drift, base vs trained",
    description=__doc__,
    check=_validate,
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
