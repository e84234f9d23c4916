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
STAGE_ORDER = (DOWNLOAD, SNR_SCAN, LAYER_SELECT, CPT, SFT, EVALUATE)

# Parquet tables in the store (tables/<table>/stage=<stage>/run_id=<run>/part-0.parquet).
SNR_TABLE = "snr"
SELECTION_TABLE = "selection"
TRAINED_TENSORS_TABLE = "trained_tensors"
TRAINING_METRICS_TABLE = "training_metrics"

# Well-known files of a run's stage (runs/<run>/<stage>/<file>).
MANIFEST_FILE = "manifest.json"
DOWNLOAD_SUMMARY_FILE = "download.json"
REFERENCE_JSON_FILE = "snr_results.json"
SELECTION_TABLE_FILE = "selection.parquet"
UNFROZEN_YAML_FILE = "unfrozen_parameters.yaml"
SELECTION_JSON_FILE = "selection.json"

# Status of a stage's manifest.
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"


def stage_sort_key(stage: str) -> tuple[int, str]:
    """Pipeline order; unknown stages after the known ones, by name."""
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)
