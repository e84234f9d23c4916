"""Experiment tracking in MLflow: optional, off by default, and never deciding anything (the store is the record).

A stage given an `MlflowTarget` (StageContext.tracking; `--mlflow-tracking-uri` or $MLFLOW_TRACKING_URI on the
stage commands) logs itself as one MLflow run, nested in `parent_run_id` when a pipeline run started one: its
parameters, tags naming our run, metrics (training curves, the evaluation) and its small outputs as artifacts,
all read back from what the stage stored. A tracker that cannot be reached costs one warning; the stage still
commits and its manifest's `tracking` says what happened. mlflow is imported only when tracking is used: the
functions that call it live in `mlflow_log` (and `registry`), which callers import where they use them.
"""

from __future__ import annotations

from .target import DEFAULT_EXPERIMENT, MlflowTarget, target_from_settings

__all__ = ["DEFAULT_EXPERIMENT", "MlflowTarget", "target_from_settings"]  # the MLflow calls: stages.tracking.mlflow_log
