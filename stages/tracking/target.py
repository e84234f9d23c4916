"""Where a stage is tracked: an MLflow server, an experiment, and the pipeline's run to nest in."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from ..base.errors import InputError

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variables: a team's tracker is found as their other tools find it
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "spectrum"
_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@]+@", re.IGNORECASE)
_RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class MlflowTarget:
    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT
    parent_run_id: str | None = None  # the pipeline run's MLflow run: the stage's run is nested in it
    unavailable: str | None = None  # why the tracker is known to be down (the pipeline could not start its run): not contacted

    def __post_init__(self) -> None:
        """Checked before any work: a URI with credentials would be stored in manifests and Prefect parameters."""
        if not self.tracking_uri.strip():
            raise InputError("the MLflow tracking URI is empty; pass --mlflow-tracking-uri (or set $MLFLOW_TRACKING_URI)")
        if _CREDENTIALS.match(self.tracking_uri):
            raise InputError(
                "the MLflow tracking URI holds credentials (user:password@host); they would be recorded: pass the URI without "
                "them and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
            )
        if not self.experiment.strip():
            raise InputError("the MLflow experiment name is empty; pass --mlflow-experiment NAME or leave it out (default: spectrum)")
        if self.parent_run_id is not None and not _RUN_ID.fullmatch(self.parent_run_id):
            raise InputError(f"--mlflow-parent-run {self.parent_run_id!r} is not an MLflow run id (32 hex digits)")

    def nested_in(self, parent_run_id: str | None) -> MlflowTarget:
        return replace(self, parent_run_id=parent_run_id)

    def marked_unavailable(self, why: str) -> MlflowTarget:
        """This target, known to be down: its stages record why instead of each waiting for the same timeout."""
        return replace(self, unavailable=why)

    def to_dict(self) -> dict[str, str | None]:
        """Plain values: what a deployment's parameters and a record carry."""
        return {
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
            "unavailable": self.unavailable,
        }


def target_from_settings(
    tracking_uri: str | None, experiment: str | None = None, parent_run_id: str | None = None, unavailable: str | None = None
) -> MlflowTarget | None:
    """The target the options (else MLflow's environment variables) name; None when no tracking URI is given."""
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV) or None
    if uri is None:
        given = [flag for flag, value in (("--mlflow-experiment", experiment), ("--mlflow-parent-run", parent_run_id)) if value]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise InputError(f"{' and '.join(given)} {verb} a tracker: pass --mlflow-tracking-uri (or set ${TRACKING_URI_ENV})")
        return None
    return MlflowTarget(uri, experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT, parent_run_id, unavailable)
