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

Deltas subtract per-token numbers, so both models must predict the same tokens: evaluate refuses a
base whose tokenizer has a different vocabulary or tokenizes the evaluated text differently (it
compares the token ids of every dataset, not the tokenizer files). Spectrum training never changes
the tokenizer, so such a pair is not a model and its training; a per-byte measure would hide that
and would not be the perplexity the rest of the pipeline (cpt's loss) reports.
Every dataset has a role (domain, general, chat, task) and a name unique within the evaluation
(stages/evaluation/corpus.py). A model with non-finite weights or losses (a diverged training) is
refused before anything is committed (exit 3).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import snr_scan
from .base.contracts import (
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
from .base.errors import CorruptWeightsError, InputError
from .base.files import all_files, ensure_writable, write_atomic
from .base.parquet import read_parquet
from .core.cli import stage_main
from .core.execution import Produced, StageRun, execute_plan, plan_stage, require_store_in
from .core.stage import From, Stage, StageConfig, StageContext, StageResult, option
from .evaluation.corpus import CHAT, DOMAIN, GENERAL, TASK, Corpus, dataset_name, from_path, python_docs
from .evaluation.drift import snr_drift
from .evaluation.harness import require_tasks, run_tasks
from .evaluation.measurements import measured_once, step_slug, tokens_digest
from .evaluation.perplexity import Likelihood, assistant_loss, likelihood, token_stream
from .scan.spectra import resolve_device
from .store import (
    ArtifactStore,
    StageRef,
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
        # unique within an evaluation: heldout, python-docs, chat-heldout, <role>:<file name> of a --data/--general/--chat-data
        # file or folder, or an lm-evaluation-harness task
        ("dataset", pa.string()),
        ("value", pa.float64()),
        ("tokens", pa.int64()),  # predicted tokens the value is computed over
        ("role", pa.string()),  # domain, general, chat or task
        ("dataset_sha256", pa.string()),  # of the dataset's documents or chat rows (None for a task)
    ]
)
MODELS = ("trained", "base")  # measured in this order: a diverged trained model is refused before the base is measured
CHAT_HELDOUT = "chat-heldout"  # the dataset name of a run's held-out chat rows


@dataclass
class EvaluateConfig(StageConfig):
    model: str | None = option(
        positional=True,
        default=None,
        pipeline=False,
        help="the model to evaluate: a folder or store URI (default: the model of --cpt-run/--sft-run)",
    )
    cpt_run: StageRef | None = option(
        metavar="RUN", default=None, wired=From(CPT), help="evaluate what this cpt run trained: its model, base and held-out split"
    )
    sft_run: StageRef | None = option(
        metavar="RUN", default=None, wired=From(SFT), help="evaluate what this sft run trained: its model, base and held-out chats"
    )
    base_model: str | None = option(
        default=None, pipeline=False, help="the model before training, for deltas (default: the run's base model)"
    )
    data: str | None = option(default=None, path=True, help="domain text (file or folder) instead of the run's held-out split")
    general: str | None = option(
        default=None, path=True, help="general text for the forgetting probe (file or folder; default: Python's documentation, offline)"
    )
    chat_data: str | None = option(default=None, path=True, help="held-out chat rows (file or folder) for the SFT eval loss")
    chat_template: str | None = option(metavar="FILE", default=None, path=True, help="a Jinja chat template instead of the tokenizer's")
    text_field: str = option(default="text", cache=True, help="the text field of JSON/Parquet records (default text)")
    seq_len: int = option(default=512, cache=True, help="tokens per perplexity window and per chat row (default 512)")
    max_tokens: int = option(default=32768, cache=True, help="tokens evaluated per dataset, the first ones (default 32768)")
    batch_size: int = option(default=4, help="windows per forward pass (default 4)")
    device: str = option(default="cpu", help="cpu, cuda, cuda:N, or auto (GPU when present); default cpu")
    tasks: list[str] = option(
        "--task", default_factory=list, cache=True, metavar="TASK", help="an lm-evaluation-harness task from --tasks-dir (repeatable)"
    )
    tasks_dir: str | None = option(
        metavar="DIR", default=None, path=True, help="local lm-evaluation-harness task YAMLs and their data files"
    )
    snr_drift: bool = option(
        default=True, cache=True, negative=("--no-snr-drift", "skip the rescans"), help="scan both models and compare their SNR"
    )
    out_dir: str | None = option(
        "--out-dir", "-o", default=None, pipeline=False, help=f"also write {EVALUATION_JSON_FILE} to this local folder"
    )
    overwrite: bool = option(default=False, pipeline=False, help="replace files in --out-dir")


@dataclass(frozen=True)
class Sources:
    """What is evaluated, resolved before the stage starts."""

    trained: str  # location of the trained model
    base: str | None  # location of the base model (None: no deltas, no drift)
    domain: Corpus | None
    general: Corpus
    chats: ChatSet | None
    inputs: list[dict]  # manifest inputs of the data (the models' are added when they are fetched)

    @property
    def corpora(self) -> list[Corpus]:
        return [c for c in (self.domain, self.general) if c is not None]


@dataclass(frozen=True)
class ChatSet:
    """Held-out chat rows for the SFT eval loss, named like a corpus."""

    name: str  # chat-heldout, or chat:<file name> of --chat-data
    rows: list[tuple[str, list[dict]]]  # (where, messages)
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([m for _, m in self.rows], ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tokenized:
    """One model's tokens of everything evaluated: what its per-token numbers are computed over."""

    vocab: dict[str, int]
    streams: dict[str, list[int]]  # dataset name -> the token stream of its documents (token_stream)
    chats: list[tuple[list[int], list[int]]]  # (ids, labels) of each chat row, cut to --seq-len


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
    models = {"trained": _fetch_model(sources.trained, store, "model")}
    if sources.base:
        models["base"] = _fetch_model(sources.base, store, "base model")
    files = {label: [refs.get(n) or file_ref(folder / n) for n in all_files(folder)] for label, (folder, refs) in models.items()}
    model_inputs = [*files["trained"], *files.get("base", [])]
    base = models.get("base")
    trained_dir = models["trained"][0]
    template = read_chat_template(config.chat_template)
    parameters = {
        **config.cache_parameters(),
        "general_corpus": {"name": sources.general.name, "source": sources.general.source, "sha256": sources.general.sha256},
        "chat_template": template,
        "has_base": base is not None,
    }
    context = context.with_run_id()  # the rescans are steps of this run
    plan = plan_stage(EVALUATE, context, parameters, [*model_inputs, *sources.inputs])

    def tokenized() -> dict[str, Tokenized]:
        found = {"trained": _tokenize("trained", trained_dir, sources, config, template)}
        if base:
            found["base"] = _tokenize("base", base[0], sources, config, template)
            _require_same_tokens(sources, found["base"], found["trained"])
        return found

    # Everything that can be wrong with the inputs is found before the stage starts: nothing is recorded for it.
    # A reused evaluation needs no tokenizer (transformers' import) and no tokens.
    tokens = tokenized() if context.force or plan.committed() is None else {}

    def produce(stage: StageRun) -> Produced[EvaluationResult]:
        measured = tokens or tokenized()  # the run found at planning vanished (a cleaned store): computed after all
        rows = []
        for label in MODELS:
            if label in models:
                rows += _measure(label, models[label][0], files[label], measured[label], sources, config, context)
        rows += _deltas(rows)
        drift = _drift(config, context, sources) if config.snr_drift and base else None
        summary = _summary(rows, drift, sources, config)
        outputs = [stage.write_table(EVALUATION_TABLE, pa.Table.from_pylist(rows, schema=EVALUATION_SCHEMA))]
        if drift is not None:
            outputs.append(stage.write_table(SNR_DRIFT_TABLE, drift))
        outputs.append(stage.put_bytes(EVALUATION_JSON_FILE, _json(summary)))
        return Produced(outputs, EvaluationResult(rows, summary, drift))

    outcome = execute_plan(plan, produce)
    manifest = outcome.manifest
    data, _ = read_output(store, manifest, EVALUATION_JSON_FILE)
    if config.out_dir:
        write_atomic(Path(config.out_dir) / EVALUATION_JSON_FILE, data, overwrite=config.overwrite)
    summary = json.loads(data)
    result = outcome.detail or EvaluationResult([], summary, None)
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
    trained, base, domain, chats, inputs = config.model, config.base_model, None, None, []
    if config.cpt_run or config.sft_run:
        stage, reference = (CPT, config.cpt_run) if config.cpt_run else (SFT, config.sft_run)
        manifest = succeeded_manifest(store, *resolve_run_reference(reference, stage, f"--{stage}-run"), "trained model to evaluate")
        run_id, step = manifest.run_id, manifest.stage  # the run that trained it (a reuse record is followed)
        record, _ = read_output(store, manifest, TRAINING_FILE)
        trained = trained or StageRef.of(manifest).output_uri(MODEL_FOLDER)
        base = base or json.loads(record).get("model")
        held, info = read_output(store, manifest, HELDOUT_DATA_FILE)
        lines = [json.loads(line) for line in held.decode("utf-8").splitlines() if line.strip()]
        if stage == CPT and not config.data:
            if not lines:
                raise InputError(f"the held-out split of run {run_id} is empty (no document fell in its --heldout-percent): pass --data")
            domain = Corpus("heldout", [line["text"] for line in lines], f"run {run_id} {step} held-out split", DOMAIN)
            inputs.append(info.to_dict())
        if stage == SFT and not config.chat_data:
            if not lines:
                raise InputError(
                    f"the held-out chat rows of run {run_id} are empty (no row fell in its --heldout-percent): pass --chat-data"
                )
            rows = [(f"run {run_id} held-out row {n}", line["messages"]) for n, line in enumerate(lines, start=1)]
            chats = ChatSet(CHAT_HELDOUT, rows, f"run {run_id} {step} held-out chat rows")
            inputs.append(info.to_dict())
    if config.data:
        domain = from_path(Path(config.data), DOMAIN, config.text_field)
        inputs += _file_refs(Path(config.data))
    if config.chat_data:
        chats = ChatSet(dataset_name(CHAT, Path(config.chat_data)), list(conversations(Path(config.chat_data))), config.chat_data)
        if not chats.rows:
            raise InputError(f"{config.chat_data} holds no chat rows: the evaluation set is empty")
        inputs += _file_refs(Path(config.chat_data))
    general = from_path(Path(config.general), GENERAL, config.text_field) if config.general else python_docs()
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
    return folder, refs


def _file_refs(path: Path) -> list[dict]:
    return [file_ref(path)] if path.is_file() else [file_ref(path / name) for name in all_files(path)]


def _tokenize(label: str, folder: Path, sources: Sources, config: EvaluateConfig, template: str | None) -> Tokenized:
    """The model's token ids of every dataset and chat row, as its perplexities and losses count them."""
    tokenizer = load_tokenizer(folder)
    if template is not None:
        tokenizer.chat_template = template
    streams = {corpus.name: token_stream(corpus.texts, tokenizer, config.max_tokens) for corpus in sources.corpora}
    chats = []
    if sources.chats is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"the {label} model's tokenizer has no chat template; pass --chat-template FILE")
        tokenized = [tokenize_conversation(tokenizer, messages, where) for where, messages in sources.chats.rows]
        chats = [(ids[: config.seq_len], labels[: config.seq_len]) for ids, labels in tokenized]
    return Tokenized(dict(tokenizer.get_vocab()), streams, chats)


def _require_same_tokens(sources: Sources, base: Tokenized, trained: Tokenized) -> None:
    """Refuse deltas of per-token numbers over different tokenizations (see the module docstring)."""
    difference = _token_difference(base, trained)
    if difference:
        raise InputError(
            f"the base model {sources.base} and the model {sources.trained} have different tokenizers ({difference}): "
            "their per-token perplexities and losses cannot be compared; pass as --base-model the model it was trained from"
        )


def _token_difference(base: Tokenized, trained: Tokenized) -> str | None:
    """What first differs between two models' tokens of the same data, or None."""
    if base.vocab != trained.vocab:
        differing = sorted(t for t in base.vocab.keys() | trained.vocab.keys() if base.vocab.get(t) != trained.vocab.get(t))
        examples = ", ".join(repr(t) for t in differing[:3])
        return f"their vocabularies differ in {len(differing):,} tokens, e.g. {examples}"
    for name, ids in base.streams.items():
        if ids != trained.streams[name]:
            return f"they tokenize {name} differently from token {_first_difference(ids, trained.streams[name]):,} on"
    for row, (ids, other) in enumerate(zip(base.chats, trained.chats, strict=True), start=1):
        if ids != other:
            return f"they tokenize chat row {row} differently"
    return None


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _measure(
    label: str, folder: Path, files: list[dict], tokens: Tokenized, sources: Sources, config: EvaluateConfig, context: StageContext
) -> list[dict]:
    """Every metric of one model: perplexity on each corpus, the SFT eval loss; each measured once per store (measurements.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(resolve_device(config.device))
    loaded: list = []

    def model():  # loaded for the first measurement not made before; a model measured before on everything is not loaded
        if not loaded:
            loaded.append(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device))
            _require_finite_weights(label, folder, loaded[0])
        return loaded[0]

    def once(qualifier: str, metric: str, ids: Any, dataset: str, compute: Callable[[Any], Likelihood]) -> Likelihood:
        settings = {"metric": metric, "tokens_sha256": tokens_digest(ids), "seq_len": config.seq_len, "batch_size": config.batch_size}
        settings["device"] = device.type
        return measured_once(context, f"{label}_{qualifier}", files, settings, lambda: _finite(label, dataset, compute(model())))

    rows = []
    for corpus in sources.corpora:
        ids = tokens.streams[corpus.name]
        measure = functools.partial(_likelihood_of, ids=ids, config=config, what=f"{label} {corpus.name}", progress=context.progress)
        rows += _rows(label, corpus.name, corpus.role, corpus.sha256, once(step_slug(corpus.name), "perplexity", ids, corpus.name, measure))
    if sources.chats is not None:
        chats = tokens.chats
        measure = functools.partial(_assistant_loss_of, rows=chats, config=config, progress=context.progress)
        loss = once("chat", "sft_eval_loss", chats, sources.chats.name, measure)
        rows.append(_row(label, "sft_eval_loss", sources.chats.name, CHAT, sources.chats.sha256, loss.mean, loss.tokens))
    loaded.clear()
    gc.collect()
    if config.tasks:
        tasks = run_tasks(folder, config.tasks, Path(config.tasks_dir), str(device), config.batch_size)
        rows += [{"model": label, "role": TASK, "dataset_sha256": None, **row} for row in tasks]
    return rows


def _likelihood_of(model: Any, ids: list[int], config: EvaluateConfig, what: str, progress: bool | None) -> Likelihood:
    return likelihood(model, ids, config.seq_len, config.batch_size, what, progress)


def _assistant_loss_of(model: Any, rows: list, config: EvaluateConfig, progress: bool | None) -> Likelihood:
    return assistant_loss(model, rows, config.batch_size, progress)


def _require_finite_weights(label: str, folder: Path, model) -> None:
    import torch

    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise CorruptWeightsError(
                f"the {label} model {folder} has NaN or Inf values in {name}: it diverged in training or is damaged, so it has "
                "no perplexity; train again (e.g. with a lower --learning-rate) or evaluate an earlier checkpoint"
            )


def _finite(label: str, dataset: str, measured: Likelihood) -> Likelihood:
    """A loss that is NaN or infinite (finite weights that overflow) is refused like non-finite weights."""
    if not math.isfinite(measured.perplexity):
        raise CorruptWeightsError(
            f"the {label} model's loss on {dataset} is not finite ({measured.mean} nats per token): the model has diverged, "
            "so it has no perplexity; train again (e.g. with a lower --learning-rate) or evaluate an earlier checkpoint"
        )
    return measured


def _rows(label: str, dataset: str, role: str, sha256: str, measured: Likelihood) -> list[dict]:
    return [
        _row(label, "perplexity", dataset, role, sha256, measured.perplexity, measured.tokens),
        _row(label, "nll_per_token", dataset, role, sha256, measured.mean, measured.tokens),
    ]


def _row(label: str, metric: str, dataset: str, role: str, sha256: str | None, value: float, tokens: int) -> dict:
    return {"model": label, "metric": metric, "dataset": dataset, "value": value, "tokens": tokens, "role": role, "dataset_sha256": sha256}


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
        scan = snr_scan.STAGE.run_as_step(snr_scan.ScanConfig(model_dir=location, device=config.device), context, qualifier)
        data, _ = read_table_output(context.store, scan.manifest, SNR_TABLE)
        tables.append(read_parquet(data))
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
        "datasets": _datasets(sources),
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


def _datasets(sources: Sources) -> dict[str, dict[str, Any]]:
    """Every dataset evaluated, by its unique name: role, where it came from, size and sha256."""
    found = {c.name: {"role": c.role, "source": c.source, "documents": len(c.texts), "sha256": c.sha256} for c in sources.corpora}
    if sources.chats is not None:
        chats = sources.chats
        found[chats.name] = {"role": CHAT, "source": chats.source, "rows": len(chats.rows), "sha256": chats.sha256}
    return found


def _report(summary: dict[str, Any]) -> list[str]:
    lines = []
    for entry in summary.get("metrics", []):
        if entry["metric"] == "nll_per_token":
            continue
        base, trained = entry.get("base"), entry.get("trained")
        text = f"{entry['metric']} on {entry['dataset']}: "
        if base is not None and trained is not None:
            change = entry.get("relative_change")
            text += f"{_g(base)} -> {_g(trained)}" + (f" ({100 * change:+.1f}%)" if change is not None else "")
        else:
            text += _g(trained)
        lines.append(f"{text} over {entry['tokens']:,} tokens")
    drift = summary.get("snr_drift")
    if drift:
        lines.append(f"snr drift: {drift['changed']} of {drift['matrices']} matrices changed; frozen ones show none")
    return lines


def _g(value: float | None) -> str:
    return "not computed" if value is None else f"{value:.4g}"


def _json(document: dict) -> bytes:
    return (json.dumps(_plain(document), indent=2, allow_nan=False) + "\n").encode()


def _plain(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite number (an lm-evaluation-harness score it could not compute) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


STAGE = Stage(
    name=EVALUATE,
    command="evaluate",
    config=EvaluateConfig,
    run=run,
    description=__doc__,
    check=_validate,
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
