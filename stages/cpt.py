"""cpt stage: continued pre-training with DeepSpeed on a data drop, training only the selected tensors.

The drop's documents are tokenised with the model's tokenizer, joined with EOS and packed to
--seq-len; a deterministic share of documents (chosen by the sha256 of their text) is held out
for the evaluate stage and recorded in heldout.json (the documents themselves in heldout.jsonl). Every parameter is frozen except the
selection (--selection selection.json or unfrozen_parameters.yaml, or --selection-run RUN;
--full trains everything, the baseline). Checkpoints every --save-steps go to a work folder
named by the cache key and into the store, so a killed run resumes from the last one, on this
machine or another. The result is a Hugging Face model (safetensors in the base model's dtype,
tokenizer beside it), the trained_tensors table (sha256 of every tensor before and after: a
frozen tensor that changed fails the stage) and the training_metrics table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base.contracts import CPT, DOWNLOAD
from .core.cli import stage_main
from .core.stage import From, Stage, StageContext, StageResult, option
from .training.packing import pack
from .training.runner import (
    DATA_HELP,
    MODEL_HELP,
    PreparedData,
    TrainingConfig,
    TrainingResult,
    check,
    run_training,
    trained_model,
)
from .training.settings import TrainingArrays


@dataclass
class CptConfig(TrainingConfig):
    model: str = option(positional=True, wired=From(DOWNLOAD, "model"), help=MODEL_HELP)
    data: str | None = option(default=None, wired=From(DOWNLOAD, "data"), help=DATA_HELP)
    text_field: str = option(default="text", cache=True, help="the text field of JSON/Parquet records (default text)")


def run(config: CptConfig, context: StageContext) -> StageResult[TrainingResult]:
    check(config)

    def prepare(data_dir: Path, tokenizer: Any, data_digest: str, work_root: Path) -> PreparedData:
        packed = pack(data_dir, tokenizer, config.seq_len, config.heldout_percent, config.text_field, work_root, data_digest)
        record = {**packed.heldout, "training_documents": packed.documents, "training_tokens": packed.tokens, "blocks": packed.count}
        return PreparedData(TrainingArrays(packed.blocks), record, packed.heldout_file)

    return run_training(CPT, config, context, prepare)


STAGE = Stage(
    name=CPT,
    command="cpt",
    config=CptConfig,
    run=run,
    description=__doc__,
    check=check,
    outputs={"model": trained_model},
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
