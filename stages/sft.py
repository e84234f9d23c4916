"""sft stage: supervised fine-tuning on chat data with DeepSpeed, training only the selected tensors.

Chat rows (`messages`, or `prompt`/`completion`; .jsonl, .json or .parquet) are rendered with the
tokenizer's chat template or --chat-template FILE; the loss is on assistant tokens only. The same
selection as cpt (--selection, --selection-run, or --full), the same checkpoints in the store and
resume, trained_tensors audit, training_metrics and determinism: both stages run one runner
(stages.training.runner). A deterministic share of rows is held out for the evaluate stage.

--rescan re-selects for the model being trained (typically the cpt output, whose SNR moved): the
snr_scan and layer_select stages run on MODEL with the estimator and policy the given selection
was made with, recorded in the run as the steps snr_scan.sft and layer_select.sft, and sft
trains that selection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import layer_select, snr_scan
from .base.contracts import CPT, SFT
from .base.errors import InputError
from .core.cli import stage_main
from .core.execution import require_store_in
from .core.stage import From, Stage, StageContext, StageResult, option
from .store import StageRef
from .training.chat import MODEL_TEMPLATE, prepare_chat, read_chat_template
from .training.runner import MODEL_HELP, PreparedData, TrainingConfig, TrainingResult, check, run_training, trained_model
from .training.selection import load_selection


@dataclass
class SftConfig(TrainingConfig):
    model: str = option(positional=True, wired=From(CPT, "model"), help=MODEL_HELP)
    chat_template: str | None = option(
        metavar="FILE", default=None, path=True, help="a Jinja chat template to use instead of the tokenizer's"
    )
    rescan: bool = option(
        default=False,
        help="scan and select MODEL again with the estimator and policy of --selection/--selection-run (a selection.json), "
        "as the run's steps snr_scan.sft and layer_select.sft, and train that selection",
    )


def run(config: SftConfig, context: StageContext) -> StageResult[TrainingResult]:
    check(config)
    template = read_chat_template(config.chat_template)
    rescan_lines: tuple[str, ...] = ()
    if config.rescan:
        config, context, rescan_lines = _rescan(config, context)

    def prepare(data_dir: Path, tokenizer: Any, data_digest: str, work_root: Path) -> PreparedData:
        if template is not None:
            tokenizer.chat_template = template
        heldout_file = work_root / f"heldout-{data_digest[:16]}.jsonl"
        source = f"the chat template {config.chat_template}" if template is not None else MODEL_TEMPLATE
        chat = prepare_chat(data_dir, tokenizer, config.seq_len, config.heldout_percent, heldout_file, source)
        return PreparedData(chat.arrays, chat.record, heldout_file)

    # The template decides the labels, so its text (not its path) is a parameter of the run.
    result = run_training(SFT, config, context, prepare, extra_parameters={"chat_template": template})
    return replace(result, lines=(*rescan_lines, *result.lines))


def _rescan(config: SftConfig, context: StageContext) -> tuple[SftConfig, StageContext, tuple[str, ...]]:
    """Scan and select MODEL as steps of this run; the returned config trains the new selection."""
    store = require_store_in(context, SFT)
    if config.full or config.lora_rank:
        raise InputError("--rescan re-selects tensors; it cannot be combined with --full or --lora-rank")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("--rescan runs in a single process: rescan first (one process), then launch sft with --selection-run")
    previous = load_selection(config.selection, config.selection_run, store)
    if previous.document is None:
        raise InputError(
            f"--rescan needs the policy the selection was made with: {previous.source} is an unfrozen_parameters YAML, "
            "which does not record it; pass its selection.json or --selection-run"
        )
    policy = previous.document.policy  # the layer_select options it was made with, as recorded
    context = context.with_run_id()  # the scan, the selection and sft share one run
    scan_config = snr_scan.ScanConfig(model_dir=config.model, estimator=previous.document.estimator or "reference")
    scan = snr_scan.STAGE.run_as_step(scan_config, context, SFT)
    select_config = layer_select.SelectConfig(snr_run=StageRef.of(scan.manifest), **policy)
    selected = layer_select.STAGE.run_as_step(select_config, context, SFT)
    rescanned = replace(config, selection=None, selection_run=StageRef.of(selected.manifest))
    return rescanned, context, (*scan.lines, *selected.lines)


STAGE = Stage(
    name=SFT,
    command="sft",
    config=SftConfig,
    run=run,
    description=__doc__,
    check=check,
    outputs={"model": trained_model},
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
