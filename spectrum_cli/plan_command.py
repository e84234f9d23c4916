"""`spectrum plan MODEL --gpus N --gpu-memory 80GiB …`: what training needs per GPU, before anything runs.

Reads only the model's config.json and builds the model on the meta device (no weights: a 70B
config plans in seconds). Prints per device the weights, gradients, optimizer state, activations
and DeepSpeed's buffers of training the selection (--selection, --selection-run), LoRA adapters
(--lora-rank) or everything (--full), beside those of full fine-tuning, as cpt and sft train on a
GPU (bf16, torch AdamW, DeepSpeed ZeRO); then the cheapest configuration that fits --gpu-memory:
the first, in this order, whose plan fits, from --micro-batch-size down: ZeRO-0 (one GPU), ZeRO-2,
ZeRO-2 with gradient checkpointing, ZeRO-3, ZeRO-3 with checkpointing, then optimizer offload, then
parameter offload. cpt and sft check the same plan before they start.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from stages.base.errors import InputError
from stages.core.cli import add_store_location_arguments, store_from_args
from stages.selection.fit import add_setup_arguments, setup_of

DESCRIPTION = __doc__
SUMMARY = "plan the GPU memory of training a selection, LoRA or the full model (per device, by component) and the cheapest setup that fits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model folder (or its config.json), a hub id, or a stored model URI")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--selection", help="selection.json or unfrozen_parameters.yaml from `spectrum select`")
    chosen.add_argument("--selection-run", metavar="RUN_ID", help="the layer_select run in --store")
    chosen.add_argument("--full", action="store_true", help="plan full fine-tuning only")
    chosen.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank on every linear layer")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 80GB, 24GiB (default 80GiB)")
    add_setup_arguments(parser)  # --gpus, --seq-len, --micro-batch-size, --zero-stage, --gradient-checkpointing, as select's
    add_store_location_arguments(parser)


def run(args: argparse.Namespace) -> str:
    from stages.training.memory_plan import parse_size

    device_memory = parse_size(args.gpu_memory, "--gpu-memory")
    if args.lora_rank < 0:
        raise InputError(f"--lora-rank must be 0 (off) or positive, got {args.lora_rank}")
    setup = setup_of(args)
    models = _planned_models(args)
    lines = [f"per GPU, {args.gpus} GPU(s) of {args.gpu_memory}, {setup.describe()}, bf16:"]
    plans = [model.plan(setup) for model in models]
    lines.extend(_table(plans))
    for model in models:
        lines.append(_fit_line(model, setup, device_memory, args.gpu_memory))
    return "\n".join(lines)


def _planned_models(args: argparse.Namespace) -> list:
    """The trained set asked for, then full fine-tuning (once when --full)."""
    from stages.training.freezing import apply_selection
    from stages.training.memory_plan import PlannedModel, load_config, meta_model, trainable_of

    config = load_config(_config_source(args))
    full = meta_model(config)
    apply_selection(full, None)
    models = [PlannedModel(full, trainable_of(full, "full fine-tuning"))]
    if args.full:
        return models
    if args.lora_rank:
        lora = meta_model(config)
        for parameter in lora.parameters():
            parameter.requires_grad_(False)
        return [PlannedModel(lora, trainable_of(lora, f"LoRA rank {args.lora_rank}", args.lora_rank), args.lora_rank), *models]
    from stages.training.selection import load_selection

    if not args.selection and not args.selection_run:
        raise InputError("name what to train: --selection FILE, --selection-run RUN, --lora-rank R or --full")
    selection = load_selection(args.selection, args.selection_run, store_from_args(args, writable=False) if args.selection_run else None)
    chosen = meta_model(config)
    report = apply_selection(chosen, selection)  # a selection that matches nothing is refused here
    label = f"selection {selection.source} ({report.trainable_parameters / report.total_parameters:.1%})"
    return [PlannedModel(chosen, trainable_of(chosen, label)), *models]


def _config_source(args: argparse.Namespace) -> str:
    """A local path or hub id as given; a stored model's local copy (its files verified)."""
    if args.model.startswith(("store:", "s3://", "file://")):
        from stages.store.trees import local_copy

        folder, _ = local_copy(args.model, store_from_args(args, writable=False))
        return str(folder)
    return args.model


def _table(plans: list) -> list[str]:
    from stages.training.memory_plan import gib

    names = list(plans[0].components())
    width = max(len(plan.trainable.label) for plan in plans)
    header = f"  {'':{width}}  " + "  ".join(f"{name:>16}" for name in names)
    rows = [header]
    for plan in plans:
        rows.append(f"  {plan.trainable.label:{width}}  " + "  ".join(f"{gib(value):>16}" for value in plan.components().values()))
    return rows


def _fit_line(model, setup, device_memory: int, memory_text: str) -> str:
    from stages.training.memory_plan import cheapest_fit, gib

    fit = cheapest_fit(model, replace(setup, micro_batch_size=setup.micro_batch_size), device_memory)
    if fit is None:
        smallest = model.plan(
            replace(setup, zero_stage=3, gradient_checkpointing=True, offload_optimizer=True, offload_params=True, micro_batch_size=1)
        )
        return (
            f"{model.trainable.label}: nothing fits {memory_text} per GPU (at least {gib(smallest.total)} with ZeRO-3, "
            "checkpointing, offload and micro-batch 1): use more GPUs, a shorter --seq-len or train fewer tensors"
        )
    return f"{model.trainable.label}: cheapest that fits {memory_text}: {fit.setup.describe()} ({gib(fit.total)} per GPU)"
