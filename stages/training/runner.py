"""What cpt and sft share: their common options, and one run from inputs to a published, audited model.

A training stage supplies only how its data becomes token arrays (`prepare`); this module
resolves the model, data and selection (local folders or stored trees), checks everything that
can be wrong with them before the stage starts (selection against the model built on the meta
device, the memory estimate, the data), then inside `execute_stage` restores an unfinished run's
checkpoint, trains with DeepSpeed, saves a Hugging Face model in the base model's dtypes,
audits every tensor from the files and publishes model, checkpoints, tables and records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..base.contracts import (
    HELDOUT_DATA_FILE,
    HELDOUT_FILE,
    LAYER_SELECT,
    MODEL_FOLDER,
    TRAINED_TENSORS_TABLE,
    TRAINING_FILE,
    TRAINING_METRICS_TABLE,
)
from ..base.environment import cuda_available
from ..base.errors import InputError, OutputExistsError
from ..base.files import all_files, ensure_writable_folder
from ..core.execution import Produced, StageRun, execute_plan, plan_stage, require_store_in
from ..core.stage import From, StageConfig, StageContext, StageResult, option, options_of
from ..store import ArtifactStore, Manifest, ObjectInfo, StageRef
from ..store.trees import file_ref, local_copy
from ..weights.checkpoint import ModelWeights
from .checkpoints import CHECKPOINTS, publish_checkpoint, restore_latest
from .selection import Selection, load_selection
from .settings import TrainingArrays, TrainSettings, deepspeed_config
from .tensor_audit import audit_tensors
from .worklock import work_folder_lock

if TYPE_CHECKING:  # torch, DeepSpeed and the training loop are imported where a run trains: a reused run needs none of them
    from .freezing import FreezeReport

ZERO_STAGES = (0, 1, 2, 3)
FP32_MAX = 3.4028234663852886e38
PRECISIONS = ("auto", "fp32", "bf16")


MODEL_HELP = "base model: a Hugging Face folder (safetensors + tokenizer) or a stored model URI"
DATA_HELP = "training data: a folder or a stored drop URI"


@dataclass
class TrainingConfig(StageConfig):
    model: str = option(positional=True, help=MODEL_HELP)
    data: str | None = option(default=None, path=True, help=DATA_HELP)
    selection: str | None = option(default=None, pipeline=False, help="selection.json or unfrozen_parameters.yaml from `spectrum select`")
    selection_run: StageRef | None = option(
        metavar="RUN_ID", default=None, wired=From(LAYER_SELECT), help="instead of --selection: the layer_select run in --store"
    )
    full: bool = option(default=False, cache=True, help="train every parameter (the full fine-tuning baseline)")
    lora_rank: int = option(
        default=0, cache=True, help="instead of a selection: LoRA adapters of this rank on every linear layer (a baseline; 0: off)"
    )
    out_dir: str | None = option("--out-dir", "-o", default=None, pipeline=False, help="also write the trained model to this local folder")
    max_steps: int = option(default=100, cache=True, help="optimizer steps (default 100)")
    seq_len: int = option(default=512, cache=True, help="tokens per packed sequence (default 512)")
    micro_batch_size: int = option(default=1, cache=True, help="sequences per forward pass (default 1)")
    gradient_accumulation_steps: int = option(default=1, cache=True, help="micro-batches per optimizer step (default 1)")
    learning_rate: float = option(default=1e-5, cache=True, help="peak learning rate (default 1e-5)")
    warmup_steps: int = option(default=10, cache=True, help="linear warm-up steps before the cosine decay (default 10)")
    weight_decay: float = option(default=0.0, cache=True, help="AdamW weight decay (default 0)")
    seed: int = option(default=0, cache=True, help="seed of the data order (default 0)")
    save_steps: int = option(default=50, cache=True, help="checkpoint every N steps for resuming; 0: none (default 50)")
    zero_stage: int = option(default=2, cache=True, help="DeepSpeed ZeRO stage 0-3 (default 2)")
    precision: str = option(default="auto", cache=True, choices=PRECISIONS, help="auto: bf16 on a GPU, fp32 on the CPU")
    offload_optimizer: bool = option(default=False, cache=True, help="ZeRO 1-3: keep optimizer state in CPU memory")
    offload_params: bool = option(default=False, cache=True, help="ZeRO 3: keep parameters in CPU memory")
    gradient_checkpointing: bool = option(default=False, cache=True, help="non-reentrant activation checkpointing (less memory)")
    overwrite: bool = option(default=False, pipeline=False, help="replace files in --out-dir")
    heldout_percent: float = option(
        default=5.0, cache=True, help="share of documents (cpt) or chat rows (sft) held out for evaluation (default 5)"
    )


@dataclass(frozen=True)
class PreparedData:
    """A stage's data as training arrays, and the record it publishes about them (e.g. the held-out split)."""

    arrays: TrainingArrays
    record: dict[str, Any]  # published as heldout.json
    heldout_file: Path  # the held-out items, published as heldout.jsonl for the evaluate stage


# (data folder, tokenizer, digest of the data's files, the run's work folder) -> the prepared data
Prepare = Callable[[Path, Any, str, Path], PreparedData]


@dataclass
class TrainingResult:
    model_dir: Path | None  # the local copy in --out-dir, if asked for
    freeze: FreezeReport | None
    data: PreparedData | None
    metrics: list[dict[str, Any]]
    resumed_from_step: int


def run_training(
    stage_name: str, config: TrainingConfig, context: StageContext, prepare: Prepare, extra_parameters: dict[str, Any] | None = None
) -> StageResult[TrainingResult]:
    """The training run of a stage whose options were checked (its `check`)."""
    store = require_store_in(context, stage_name)
    model_dir, model_refs = local_copy(config.model, store)
    data_dir, data_refs = local_copy(config.data, store)
    selection = None if config.full or config.lora_rank else load_selection(config.selection, config.selection_run, store)
    if selection is not None and selection.model_structure:
        structure = ModelWeights.open(model_dir).structure()
        if structure != selection.model_structure:
            raise InputError(
                f"the selection {selection.source} was made for another model (model {selection.model_id}: its tensor names "
                f"and shapes differ from those of {config.model}); scan and select this model, or pass the selection made for it"
            )
    settings = _settings(config)
    data_inputs = [data_refs.get(name) or file_ref(data_dir / name) for name in all_files(data_dir)]
    model_inputs = [model_refs.get(name) or file_ref(model_dir / name) for name in all_files(model_dir)]
    inputs = [*model_inputs, *data_inputs, *([selection.ref] if selection else [])]
    parameters = {**config.cache_parameters(), **(extra_parameters or {}), "deepspeed_config": deepspeed_config(settings)}
    # The work folder is named by the cache key: a failed run's packed data and checkpoints are
    # found there again, and it is removed once the run is committed.
    plan = plan_stage(stage_name, context, parameters, inputs)
    key = plan.cache_key
    rank = int(os.environ.get("RANK", "0"))
    # Rank 0 holds the work folder's lock until its commit: an identical run on this machine waits, then reuses it.
    with work_folder_lock(context.work_root(), key) if rank == 0 else contextlib.nullcontext():
        reused = not context.force and plan.committed() is not None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one decision, however the ranks timed it
            from .loop import same_on_every_rank

            reused = same_on_every_rank(reused)
        if reused:  # execute_stage returns the committed run: no tokenizer (transformers' import) is needed for it
            data = tokenizer = None
        else:
            # Everything that can be wrong with the inputs is found before the stage starts: nothing is recorded for it.
            tokenizer = load_tokenizer(model_dir)
            _check_fit(model_dir, selection, config, settings, len(tokenizer))
            data = prepare(data_dir, tokenizer, _digest_of(data_inputs), context.work_root() / key)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and rank != 0:
            return _train_as_worker(stage_name, config, context, key, model_dir, selection, settings, data, rank, reused)

        def produce(stage: StageRun) -> Produced[TrainingResult]:
            from .freezing import with_aliases
            from .loop import disk_errors, train

            work = context.work_root() / stage.cache_key
            checkpoints = work / CHECKPOINTS
            restored = restore_latest(store, stage_name, stage.cache_key, checkpoints)  # an unfinished run's work, from any machine
            model, freeze = _load_model(model_dir, selection, config)
            published: list[ObjectInfo] = []

            def on_checkpoint(step: int) -> None:
                published.extend(publish_checkpoint(stage, checkpoints, step))

            outcome = train(model, data.arrays, settings, checkpoints, context.progress, on_checkpoint)
            trained_dir = work / MODEL_FOLDER
            state = outcome.state_dict
            if config.lora_rank:  # the adapters merged into the weights they adapt: a plain Hugging Face model again
                model = model.merge_and_unload()
                state = model.state_dict()
            trained = with_aliases(model, set(freeze.trainable))  # a tied weight trains under both its names
            with disk_errors(trained_dir):
                _save_model(model, state, model_dir, trained_dir, tokenizer, trained)
            audit = audit_tensors(model_dir, trained_dir, trained)
            training = {
                "model": _location(config.model, model_refs),  # the base model, for evaluate (deltas, forgetting)
                "data": _location(config.data, data_refs),
                "resumed_from_step": outcome.resumed_from_step,
                "restored_from": restored,  # {run_id, step} of an unfinished run's checkpoint in the store, or None
                "steps": outcome.steps,
                "seconds": round(outcome.seconds, 3),
                "trainable_parameters": freeze.trainable_parameters,
                "total_parameters": freeze.total_parameters,
                "selection": _selection_record(selection),  # what was trained, for the tracker and the card
            }
            # The model card, from the records about to be published: one of the model's files (model/README.md).
            # Imported here: the report package loads matplotlib, which no other training path needs.
            from ..report.card import CARD_FILE, training_card

            card = training_card(store, plan.manifest, training, audit.to_pylist(), selection.ref if selection else None)
            with disk_errors(trained_dir):
                (trained_dir / CARD_FILE).write_text(card, encoding="utf-8")
            outputs = published + [stage.put_file(f"{MODEL_FOLDER}/{name}", trained_dir / name) for name in all_files(trained_dir)]
            outputs.append(stage.write_table(TRAINED_TENSORS_TABLE, audit))
            outputs.append(stage.write_table(TRAINING_METRICS_TABLE, pa.Table.from_pylist(outcome.metrics)))
            outputs.append(stage.put_bytes(HELDOUT_FILE, (json.dumps(data.record, indent=2) + "\n").encode()))
            outputs.append(stage.put_file(HELDOUT_DATA_FILE, data.heldout_file))
            outputs.append(stage.put_bytes(TRAINING_FILE, (json.dumps(training, indent=2) + "\n").encode()))
            return Produced(outputs, TrainingResult(None, freeze, data, outcome.metrics, outcome.resumed_from_step))

        outcome = execute_plan(plan, produce)
        torch = sys.modules.get("torch")  # not imported: no process group
        if torch is not None and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the workers wait for the commit (or its failure) before they exit
        work = context.work_root() / key
        try:
            if config.out_dir:  # after the commit: a model in --out-dir is always a committed one
                trained = work / MODEL_FOLDER if outcome.detail else _committed_model(store, outcome.manifest)
                _write_out_dir(trained, Path(config.out_dir), config.overwrite)
        finally:
            if outcome.detail:
                shutil.rmtree(work, ignore_errors=True)
    result = replace(outcome.detail, model_dir=Path(config.out_dir) if config.out_dir else None) if outcome.detail else None
    lines = [_summary_line(result)] if result else []
    if config.out_dir:
        lines.append(f"wrote the trained model to {config.out_dir}")
    return StageResult(stage_name, (*lines, outcome.describe(store)), outcome.manifest, outcome.cached, detail=result)


def _selection_record(selection: Selection | None) -> dict[str, Any] | None:
    """The selection a training used (None: full or LoRA): where, its sha256, and the policy and estimator it records."""
    if selection is None:
        return None
    document = selection.document
    return {
        "uri": selection.ref["uri"],
        "sha256": selection.ref["sha256"],
        "policy": document.recorded_policy.get("policy") if document else None,
        "estimator": document.estimator if document else None,
    }


def _committed_model(store, manifest) -> Path:
    """The verified local copy of a committed run's model (a reused run's, for --out-dir)."""
    folder, _ = local_copy(f"store:runs/{manifest.run_id}/{manifest.stage}/{MODEL_FOLDER}", store)
    return folder


def _write_out_dir(trained: Path, out_dir: Path, overwrite: bool) -> None:
    """The model copied into `out_dir` beside it first, then swapped in: no mix of an old and a new model's files."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(trained, staging)
    if out_dir.exists():
        if not overwrite and any(out_dir.iterdir()):  # appeared while training
            shutil.rmtree(staging)
            raise OutputExistsError(f"--out-dir {out_dir} appeared during training; the run is committed, pass --overwrite to write it")
        previous = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.previous")
        os.replace(out_dir, previous)
        os.replace(staging, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def check_out_dir(config: TrainingConfig) -> None:
    """--out-dir is checked before any work: not a file, not an existing model unless --overwrite, writable."""
    if not config.out_dir:
        return
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file; give a folder for the trained model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not config.overwrite:
        raise OutputExistsError(f"--out-dir {out_dir} already exists and is not empty; choose another folder or pass --overwrite")
    ensure_writable_folder(out_dir, f"--out-dir {out_dir}")


def _train_as_worker(stage_name, config, context, key, model_dir, selection, settings, data, rank, reused) -> StageResult:
    """Ranks other than 0 of a multi-process launch: the same decision and the same training, no publishing.

    Every rank computes the same cache key from the same inputs, so all of them reuse a committed
    run or all of them train; rank 0 alone writes to the store (execute_stage).
    """
    if reused:
        return StageResult(stage_name, (f"rank {rank}: reusing the committed run",), cached=True)
    import torch

    from .loop import train

    checkpoints = context.work_root() / key / CHECKPOINTS
    model, _ = _load_model(model_dir, selection, config)
    train(model, data.arrays, settings, checkpoints, progress=False)
    torch.distributed.barrier()
    return StageResult(stage_name, (f"rank {rank}: trained; rank 0 publishes the run",))


def trained_model(store: ArtifactStore, manifest: Manifest) -> str:
    """The `model` output of cpt and sft: the trained Hugging Face model's store URI."""
    return StageRef.of(manifest).output_uri(MODEL_FOLDER)


def check(config: TrainingConfig) -> None:
    """The options of both training stages, checked alone (no input is read)."""
    if config.data is None:
        raise InputError("no data: pass --data (a folder or a stored drop)")
    if config.full and (config.selection or config.selection_run):
        raise InputError("--full trains everything; leave out --selection/--selection-run, or drop --full")
    if config.lora_rank < 0:
        raise InputError(f"--lora-rank must be 0 (off) or positive, got {config.lora_rank}")
    if config.lora_rank and (config.full or config.selection or config.selection_run):
        raise InputError("--lora-rank trains adapters instead of a selection; leave out --full/--selection/--selection-run")
    if config.lora_rank and config.zero_stage == 3:
        raise InputError("--lora-rank is supported with --zero-stage 0, 1 or 2 (the adapters are merged on one rank)")
    if config.zero_stage not in ZERO_STAGES:
        raise InputError(f"unknown --zero-stage {config.zero_stage}; choose one of 0, 1, 2, 3")
    if config.offload_params and config.zero_stage != 3:
        raise InputError("--offload-params needs --zero-stage 3")
    if config.offload_optimizer and config.zero_stage == 0:
        raise InputError("--offload-optimizer needs --zero-stage 1, 2 or 3")
    for name in ("max_steps", "seq_len", "micro_batch_size", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.save_steps < 0 or config.warmup_steps < 0:
        raise InputError("--save-steps and --warmup-steps must be 0 or more")
    for name, value in _float_options(config).items():
        if not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
    if not config.learning_rate > 0:
        raise InputError(f"--learning-rate must be positive, got {config.learning_rate:g}")
    if config.weight_decay < 0:
        raise InputError(f"--weight-decay must be 0 or more, got {config.weight_decay:g}")
    if config.learning_rate > FP32_MAX:  # torch's AdamW refuses it with a traceback
        raise InputError(f"--learning-rate {config.learning_rate:g} is beyond the optimizer's fp32 range ({FP32_MAX:.1e}); lower it")
    check_out_dir(config)
    if not 0 <= config.heldout_percent < 100:
        raise InputError(f"--heldout-percent must be in [0, 100), got {config.heldout_percent:g}")


def _float_options(config: TrainingConfig) -> dict[str, float]:
    """Every float option of the stage's config (cpt and sft add their own, e.g. --heldout-percent)."""
    return {f.name: getattr(config, f.name) for f, _ in options_of(type(config)) if isinstance(getattr(config, f.name), float)}


def _settings(config: TrainingConfig) -> TrainSettings:
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda_available())
    return TrainSettings(
        max_steps=config.max_steps,
        micro_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        warmup_steps=min(config.warmup_steps, config.max_steps),
        weight_decay=config.weight_decay,
        seed=config.seed,
        save_steps=config.save_steps,
        zero_stage=config.zero_stage,
        bf16=bf16,
        offload_optimizer=config.offload_optimizer,
        offload_params=config.offload_params,
    )


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise InputError(
            f"{model_dir} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); save the tokenizer beside the model"
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise InputError(f"the tokenizer in {model_dir} cannot be loaded: {exc}") from exc


def _check_fit(model_dir: Path, selection: Selection | None, config: TrainingConfig, settings: TrainSettings, tokens: int) -> None:
    """The tokenizer's `tokens` and the selection checked against the model built on the meta device (no weights read),
    and its memory plan per device."""
    import torch
    from transformers import AutoConfig

    from .loop import require_fits
    from .memory_plan import PlannedModel, Setup, meta_model, trainable_of

    skeleton = meta_model(AutoConfig.from_pretrained(str(model_dir)))
    rows = getattr(skeleton.get_input_embeddings(), "num_embeddings", None)
    if rows is not None and tokens > rows:
        raise InputError(
            f"the tokenizer in {model_dir} has {tokens:,} tokens but the model's embedding has {rows:,} rows: token ids from "
            f"{rows:,} on have no embedding; save the model's own tokenizer beside it (or resize its embeddings to the tokenizer)"
        )
    freeze = _freeze(skeleton, selection, config)
    if config.lora_rank:  # the adapters train, the model's own parameters stay frozen
        for parameter in skeleton.parameters():
            parameter.requires_grad_(False)
    on_gpu = torch.cuda.is_available()
    setup = Setup(
        gpus=int(os.environ.get("WORLD_SIZE", "1")),
        zero_stage=settings.zero_stage,
        bf16=settings.bf16,
        offload_optimizer=settings.offload_optimizer,
        offload_params=settings.offload_params,
        micro_batch_size=settings.micro_batch_size,
        seq_len=config.seq_len,
        gradient_checkpointing=config.gradient_checkpointing,
        device="cuda" if on_gpu else "cpu",
    )
    plan = PlannedModel(skeleton, trainable_of(skeleton, "this run", config.lora_rank), config.lora_rank).plan(setup)
    needed = plan.total if on_gpu else plan.total + plan.host  # offloaded state lives in the same memory on the CPU
    require_fits(needed, f"training {freeze.trainable_parameters:,} of {freeze.total_parameters:,} parameters")


def _load_model(model_dir: Path, selection: Selection | None, config: TrainingConfig):
    import torch
    from transformers import AutoModelForCausalLM

    from .freezing import enable_checkpointing

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False
    if config.lora_rank:
        freeze = _freeze(model, selection, config)
        model = _with_lora(model, config.lora_rank)
    else:
        freeze = _freeze(model, selection, config)  # after from_pretrained, which sets requires_grad on everything
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    return model, freeze


def _freeze(model, selection: Selection | None, config: TrainingConfig) -> FreezeReport:
    """The selection applied; with LoRA, the report names the weights the adapters change (merged after training)."""
    from .freezing import FreezeReport, apply_selection

    if not config.lora_rank:
        return apply_selection(model, selection)
    from peft import LoraConfig, get_peft_model

    probe = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, target_modules="all-linear"))
    wrapped = [name for name, module in probe.named_modules() if hasattr(module, "lora_A")]
    adapted = tuple(f"{name.removeprefix('base_model.model.')}.weight" for name in wrapped)
    adapters = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    total = sum(p.numel() for p in probe.parameters()) - adapters
    probe.unload()  # the model as it was, without the probe's adapters
    return FreezeReport(trainable=adapted, frozen=(), trainable_parameters=adapters, total_parameters=total, unmatched_patterns=())


def _with_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"))


def _save_model(model, state_dict: dict, base_dir: Path, out_dir: Path, tokenizer, trained: set[str]) -> None:
    """The trained weights in the base checkpoint's dtypes; every frozen tensor byte for byte as the base holds it.

    `trained`: the names of the tensors training may change, a tied weight's second name included.

    bf16 training holds the whole model in bf16, so a frozen fp32 or fp16 tensor rounded there and back
    would differ from the base. A frozen tensor is therefore checked against the base (equal once
    rounded to the dtype it trained in: training did not touch it) and written from the base's bytes.
    """
    import torch
    from safetensors import safe_open

    from .freezing import aliases
    from .tensor_audit import FrozenTensorChangedError

    stored = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    base = {info.name: info for info in ModelWeights.open(base_dir).tensors}
    # A tied weight's second name (lm_head of tied embeddings) is saved only where the base stores it too.
    second_names = aliases(model)
    state_dict = {name: tensor for name, tensor in state_dict.items() if name in base or name not in second_names}
    converted, touched = {}, []
    with contextlib.ExitStack() as files:
        shard_names = {info.shard for info in base.values()}
        shards = {shard: files.enter_context(safe_open(str(base_dir / shard), framework="pt")) for shard in shard_names}
        for name, tensor in state_dict.items():
            info = base.get(name)
            dtype = stored.get(info.dtype) if info is not None else None
            if name in trained or dtype is None:
                converted[name] = tensor.to(dtype or tensor.dtype).contiguous()
                continue
            original = shards[info.shard].get_tensor(name)
            if not torch.equal(original.to(tensor.dtype), tensor.detach().cpu()):  # a merged LoRA model's state stays on its GPU
                touched.append(name)
            converted[name] = original
    if touched:
        raise FrozenTensorChangedError(
            f"{len(touched)} frozen tensor(s) changed during training ({', '.join(touched[:5])}); the run is not trusted "
            "and nothing was committed"
        )
    model.save_pretrained(str(out_dir), state_dict=converted, safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def _location(given: str, stored_refs: dict) -> str:
    """Where an input can be found again: a stored location as given, a local folder as an absolute path."""
    return given if stored_refs else str(Path(given).expanduser().resolve())


def _digest_of(refs: list[dict]) -> str:
    return hashlib.sha256("".join(ref["sha256"] for ref in refs).encode()).hexdigest()


def _summary_line(result: TrainingResult) -> str:
    metrics = result.metrics
    first, last = (metrics[0]["loss"], metrics[-1]["loss"]) if metrics else (float("nan"), float("nan"))
    freeze = result.freeze
    share = f"{freeze.trainable_parameters:,} of {freeze.total_parameters:,} parameters" if freeze else ""
    resumed = f", resumed from step {result.resumed_from_step}" if result.resumed_from_step else ""
    return f"trained {share} for {len(metrics)} steps{resumed}: loss {first:.4f} -> {last:.4f}"
