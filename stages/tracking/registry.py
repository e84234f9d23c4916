"""A trained model in the MLflow model registry: its files, its card, our run id, and `production` for a line's promoted model.

Where the files live decides how they are registered:
- an S3 store: by reference. The version's source is the model folder's S3 URI: runs are never overwritten, so the
  reference stays valid, and a model of many gigabytes is not copied into a second storage system.
- a local (file) store: as artifacts. A local path means nothing to whoever reads the registry from another machine
  (and the server refuses one), so the files are uploaded to the MLflow run and the source is `runs:/<run>/model`.
Either way the version is linked to the MLflow run of the training stage when the stage was tracked there, the card
is the version's description (and an artifact), and tags name our run, step and the files' combined sha256.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.contracts import MODEL_FOLDER
from ..base.documents import clip
from ..base.errors import OS_ERROR_EXIT, InputError, SpectrumError
from ..store import ArtifactStore, FileStore, Manifest, lines, output_key
from ..store.scrub import redact
from ..store.trees import ListedFile, Listing
from .mlflow_log import LOGGED, ensure_experiment, tracker_client
from .target import MlflowTarget

PRODUCTION_ALIAS = "production"
CARD_ARTIFACT = "model_card/README.md"
# MLflow keeps a version's description in a 5000-character column (PostgreSQL and MySQL enforce it): a 70B model's
# card is longer, so a long card is cut, and the description names the artifact that holds it whole.
MAX_DESCRIPTION_CHARS = 4000
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,249}")


_REFUSALS = {"INVALID_PARAMETER_VALUE", "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}


class TrackerUnavailableError(SpectrumError):
    """The MLflow server could not be reached or refused the request (registering is the command's whole job)."""

    exit_code = OS_ERROR_EXIT  # like an unreachable store


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    source: str
    mlflow_run_id: str
    by_reference: bool
    aliases: tuple[str, ...]
    line: str | None  # the line whose production this model is, if any
    already: bool  # the version existed (same run and step): nothing new was registered


def check_model_name(model_name: str) -> None:
    """A registered model's name this tool writes (it is quoted in MLflow's search filters): InputError otherwise."""
    if not _MODEL_NAME.fullmatch(model_name):
        raise InputError(
            f"--mlflow-model {model_name!r} is not a model name this tool registers: use letters, digits, '_', '.' or '-' "
            "(at most 250, starting with a letter or digit)"
        )


def register_model(target: MlflowTarget, store: ArtifactStore, manifest: Manifest, model_name: str, card: str) -> Registered:
    """Register the model folder of a committed training stage (`manifest`) as a version of `model_name`."""
    check_model_name(model_name)
    try:
        return _register(target, store, manifest, model_name, card)
    except SpectrumError:
        raise
    except Exception as exc:
        if getattr(exc, "error_code", None) in _REFUSALS:  # the server answered: it refused the request itself
            raise InputError(
                f"the MLflow server {redact(target.tracking_uri)} refused to register run {manifest.run_id}'s model: "
                f"{clip(redact(str(exc)), 400)}"
            ) from exc
        raise TrackerUnavailableError(
            f"could not register run {manifest.run_id}'s model at the MLflow server {redact(target.tracking_uri)}: "
            f"{clip(redact(f'{type(exc).__name__}: {exc}'), 400)}; check the server (and MLFLOW_TRACKING_USERNAME/PASSWORD), then run again"
        ) from exc


def _register(target: MlflowTarget, store: ArtifactStore, manifest: Manifest, model_name: str, card: str) -> Registered:
    from mlflow.exceptions import MlflowException

    client = tracker_client(target)
    files = _model_outputs(manifest)
    tags = {
        "spectrum.run_id": manifest.run_id,
        "spectrum.step": manifest.stage,
        "spectrum.store": redact(store.root_uri),
        "spectrum.model_sha256": _files_digest(files),
    }
    production = _production_of(store, manifest)
    if production is not None:
        tags.update({"spectrum.line": production.line, "spectrum.generation": str(production.generation)})
    try:
        client.create_registered_model(model_name, tags={"spectrum": "true"}, description="Trained with Spectrum (spectrum register)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = _existing_version(client, model_name, tags)
    by_reference = not isinstance(store, FileStore)
    if existing is not None:
        version, source, mlflow_run_id, already = existing.version, existing.source, existing.run_id, True
    else:
        mlflow_run_id = _mlflow_run(client, target, store, manifest)
        with tempfile.TemporaryDirectory(prefix="spectrum-register-") as folder:
            card_path = Path(folder) / "README.md"
            card_path.write_text(card, encoding="utf-8")
            client.log_artifact(mlflow_run_id, str(card_path), artifact_path=str(Path(CARD_ARTIFACT).parent))
            if by_reference:
                source = store.uri(output_key(manifest.run_id, manifest.stage, MODEL_FOLDER))
            else:
                _upload_model(client, mlflow_run_id, store, files, Path(folder) / MODEL_FOLDER, manifest)
                source = f"runs:/{mlflow_run_id}/{MODEL_FOLDER}"
        created = client.create_model_version(
            model_name, source, run_id=mlflow_run_id, tags=tags, description=_description(card, mlflow_run_id)
        )
        version, already = created.version, False
    aliases = ()
    if production is not None:
        client.set_registered_model_alias(model_name, PRODUCTION_ALIAS, version)
        aliases = (PRODUCTION_ALIAS,)
    return Registered(
        model_name, str(version), source, mlflow_run_id, by_reference, aliases, production.line if production else None, already
    )


def _description(card: str, mlflow_run_id: str) -> str:
    if len(card) <= MAX_DESCRIPTION_CHARS:
        return card
    cut = card[: MAX_DESCRIPTION_CHARS - 200].rsplit("\n", 1)[0]
    return f"{cut}\n\n… the card is cut here: the whole card is the artifact {CARD_ARTIFACT} of MLflow run {mlflow_run_id}.\n"


def _model_outputs(manifest: Manifest) -> list[dict[str, Any]]:
    prefix = output_key(manifest.run_id, manifest.stage, MODEL_FOLDER) + "/"
    return [output for output in manifest.outputs if output.get("key", "").startswith(prefix)]


def _files_digest(files: list[dict[str, Any]]) -> str:
    """The model files' tree digest (store.trees.Listing): the name a download of this model folder would give it."""
    listed = (ListedFile(output["key"].rsplit(f"/{MODEL_FOLDER}/", 1)[1], output["sha256"], int(output["size"])) for output in files)
    return Listing("models", tuple(listed)).tree.removeprefix("sha256-")


def _existing_version(client, model_name: str, tags: dict[str, str]):
    """The version already registered for these files of this run, step and store (registering twice adds nothing)."""
    same = ("spectrum.run_id", "spectrum.step", "spectrum.store", "spectrum.model_sha256")
    for version in client.search_model_versions(f"name = '{model_name}'"):
        if all(version.tags.get(tag) == tags[tag] for tag in same):
            return version
    return None


def _mlflow_run(client, target: MlflowTarget, store: ArtifactStore, manifest: Manifest) -> str:
    """The MLflow run of the training stage when it was tracked on this server, else a registration run for it."""
    tracked = (manifest.tracking or {}).get("mlflow") or {}
    if tracked.get("status") == LOGGED and tracked.get("tracking_uri") == redact(target.tracking_uri):
        try:
            return client.get_run(tracked["run_id"]).info.run_id
        except Exception:  # deleted since, or another server at the same address: register under a run of its own
            pass
    experiment_id = ensure_experiment(client, target.experiment)
    tags = {
        "mlflow.runName": f"register {manifest.run_id}/{manifest.stage}",
        "spectrum.run_id": manifest.run_id,
        "spectrum.stage": manifest.stage,
        "spectrum.store": redact(store.root_uri),
        "spectrum.kind": "registration",
    }
    run = client.create_run(experiment_id, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _upload_model(client, run_id: str, store: ArtifactStore, files: list[dict[str, Any]], folder: Path, manifest: Manifest) -> None:
    prefix = output_key(manifest.run_id, manifest.stage, MODEL_FOLDER) + "/"
    for output in files:
        path = folder / output["key"].removeprefix(prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        store.download_recorded(output, path)  # streamed (a shard need not fit in memory), verified as the manifest recorded it
    client.log_artifacts(run_id, str(folder), artifact_path=MODEL_FOLDER)


def _production_of(store: ArtifactStore, manifest: Manifest) -> lines.ProductionPointer | None:
    """The line whose production model is this stage's model, if any."""
    model = f"store:{output_key(manifest.run_id, manifest.stage, MODEL_FOLDER)}"
    for line in lines.list_lines(store):
        pointer = lines.production(store, line)
        if pointer is not None and pointer.model == model:
            return pointer
    return None
