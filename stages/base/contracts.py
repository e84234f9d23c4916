"""Names that travel between modules: stages, tables, output files and statuses.

Every cross-module reference to a stage, a table, a well-known output file or a run status
uses these constants, so renaming one is a one-line change and a typo is an import error.
"""

from __future__ import annotations

# The stages, in pipeline order.
DOWNLOAD = "download"
SNR_SCAN = "snr_scan"
LAYER_SELECT = "layer_select"
CPT = "cpt"
SFT = "sft"
EVALUATE = "evaluate"
PROMOTE = "promote"  # the promotion gate, checked on the evaluate stage's table
STAGE_ORDER = (DOWNLOAD, SNR_SCAN, LAYER_SELECT, CPT, SFT, EVALUATE, PROMOTE)
PIPELINE_LEASE = "pipeline"  # runs/<run>/pipeline/lease/: the lease of a run's live pipeline (not a stage)
COMPARE = "compare"  # not a pipeline stage: the comparison of training methods, each arm a run of the stages above

# Parquet tables in the store (tables/<table>/stage=<stage>/run_id=<run>/part-0.parquet).
SNR_TABLE = "snr"
SELECTION_TABLE = "selection"
TRAINED_TENSORS_TABLE = "trained_tensors"
TRAINING_METRICS_TABLE = "training_metrics"
EVALUATION_TABLE = "evaluation"
SNR_DRIFT_TABLE = "snr_drift"
COMPARISON_TABLE = "comparison"

# Well-known files of a run's stage (runs/<run>/<stage>/<file>).
MANIFEST_FILE = "manifest.json"
DOWNLOAD_SUMMARY_FILE = "download.json"
REFERENCE_JSON_FILE = "snr_results.json"
SELECTION_TABLE_FILE = "selection.parquet"
UNFROZEN_YAML_FILE = "unfrozen_parameters.yaml"
SELECTION_JSON_FILE = "selection.json"
MODEL_FOLDER = "model"  # runs/<run>/<cpt|sft>/model/…: the trained Hugging Face model
HELDOUT_FILE = "heldout.json"  # the held-out split of cpt/sft: its rule, counts and the sha256 of each item
HELDOUT_DATA_FILE = "heldout.jsonl"  # the held-out items themselves ({"text"} or {"messages"} rows), for evaluate
TRAINING_FILE = "training.json"  # how a training run went, and where its base model and data were
EVALUATION_JSON_FILE = "evaluation.json"  # the evaluate stage's summary
DECISION_FILE = "decision.json"  # the promote stage's decision: passed, and each rule with its measured value

# Status of a stage's manifest.
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"


# A stage that runs a second time within one run does so as a step `<stage>.<qualifier>`: the
# rescan of the model sft trains is `snr_scan.sft`, its selection `layer_select.sft`. The step
# names the run's folder and table partitions; the cache key and index belong to the stage, so
# the same work is reused whichever step did it first.
STEP_SEPARATOR = "."


def step_name(stage: str, qualifier: str | None) -> str:
    return f"{stage}{STEP_SEPARATOR}{qualifier}" if qualifier else stage


def base_stage(step: str) -> str:
    """The stage a step runs: `snr_scan.sft` -> `snr_scan`."""
    return step.split(STEP_SEPARATOR, 1)[0]


def stage_sort_key(stage: str) -> tuple[int, str]:
    """Pipeline order (a step after its stage); unknown stages after the known ones, by name."""
    base = base_stage(stage)
    return (STAGE_ORDER.index(base) if base in STAGE_ORDER else len(STAGE_ORDER), stage)
