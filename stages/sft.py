"""sft stage: supervised fine-tuning on chat data with DeepSpeed, training only the selected tensors.

Chat rows (`messages`, or `prompt`/`completion`; .jsonl, .json or .parquet) are rendered with the
tokenizer's chat template or --chat-template FILE; the loss is on assistant tokens only. The same
selection as cpt (--selection, --selection-run, or --full), the same checkpoints in the store and
resume, trained_tensors audit, training_metrics and determinism: both stages run one runner
(stages.training.runner). A deterministic share of rows is held out for the evaluate stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.cli import stage_main
from .core.contracts import SFT
from .core.errors import InputError
from .core.stage import Stage, StageContext, StageResult, option
from .training.chat import prepare_chat
from .training.runner import PreparedData, TrainingConfig, TrainingResult, run_training

HELDOUT_FILE = "heldout.json"


@dataclass
class SftConfig(TrainingConfig):
    chat_template: str | None = option(metavar="FILE", default=None, help="a Jinja chat template to use instead of the tokenizer's")
    heldout_percent: float = option(default=5.0, cache=True, help="share of chat rows held out for evaluation (default 5)")


def run(config: SftConfig, context: StageContext) -> StageResult[TrainingResult]:
    if not 0 <= config.heldout_percent < 100:
        raise InputError(f"--heldout-percent must be in [0, 100), got {config.heldout_percent:g}")
    template = _read_template(config.chat_template)

    def prepare(data_dir: Path, tokenizer: Any, data_digest: str, work_root: Path) -> PreparedData:
        if template is not None:
            tokenizer.chat_template = template
        chat = prepare_chat(data_dir, tokenizer, config.seq_len, config.heldout_percent)
        return PreparedData(chat.arrays, HELDOUT_FILE, chat.record)

    # The template decides the labels, so its text (not its path) is a parameter of the run.
    return run_training(SFT, config, context, prepare, extra_parameters={"chat_template": template})


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"--chat-template {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"--chat-template {path} is not UTF-8 text (a Jinja template)") from exc


STAGE = Stage(
    name=SFT,
    command="sft",
    config=SftConfig,
    run=run,
    summary="supervised fine-tuning with DeepSpeed of the selected tensors on chat data (loss on assistant tokens)",
    description=__doc__,
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
