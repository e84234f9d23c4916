"""Run manifests: what a stage read, with which parameters and code, and what it wrote.

Layout in the store:
    runs/<run_id>/<stage>/manifest.json          the commit marker, written after every output
    runs/<run_id>/<stage>/<name>                 the stage's outputs (see output_key)
    cache/<stage>/<cache_key>/<run_id>.json      index: committed runs with this cache key
    cache/<stage>/<cache_key>/<step>/<run_id>.json   the same, for a step (`snr_scan.sft`, see contracts)

A manifest's `stage` is where it lives in the run: a stage name or a step name; the cache key
and the index use the stage the step runs (base_stage), so a step reuses the stage's work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from ..base.contracts import FAILED, MANIFEST_FILE, RUNNING, STEP_SEPARATOR, SUCCEEDED, base_stage, stage_sort_key
from ..base.errors import InputError
from .base import ArtifactStore, ObjectInfo
from .compute import compute_record, reused_compute
from .errors import ArtifactNotFoundError
from .keys import NAME, validate_name
from .scrub import check_parameters, check_values

_SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Manifest:
    stage: str
    code_version: str
    run_id: str
    parameters: dict[str, Any]
    inputs: list[dict[str, Any]]  # {uri, sha256, size?, version_id?}
    cache_key: str
    started_at: str
    host: str
    status: str = RUNNING
    environment: dict[str, Any] = field(default_factory=dict)  # python, library versions, device: not part of the cache key
    reused_from: dict[str, str] | None = None  # a reuse record: {run_id, stage} of the committed run this run reused
    outputs: list[dict[str, Any]] = field(default_factory=list)  # ObjectInfo.to_dict()
    finished_at: str | None = None
    seconds: float | None = None
    compute: dict[str, Any] | None = None  # device kind, count, seconds and device-seconds of the work (store.compute)
    tracking: dict[str, Any] | None = None  # where the stage was logged in an experiment tracker, or why it was not (stages.tracking)
    extra: dict[str, Any] = field(default_factory=dict)  # fields written by a newer version, kept as they were

    def finish(self, outputs: Sequence[ObjectInfo], status: str = SUCCEEDED, nested_seconds: float = 0.0) -> Manifest:
        """The manifest of the finished stage, ready for commit_manifest.

        `nested_seconds`: the time steps run inside this stage's work spent computing (evaluate's drift scans and
        measurements): they record their own compute, so this stage's compute leaves it out (a run's total counts it once).
        """
        if status not in (SUCCEEDED, FAILED):
            raise InputError(f"a finished manifest's status must be {SUCCEEDED!r} or {FAILED!r}, not {status!r}")
        finished = datetime.now(UTC)
        seconds = (finished - datetime.fromisoformat(self.started_at)).total_seconds()
        return replace(
            self,
            outputs=[info.to_dict() for info in outputs],
            status=status,
            finished_at=finished.isoformat(timespec="milliseconds"),
            seconds=round(seconds, 3),
            compute=compute_record(seconds - nested_seconds),
        )

    def recorded_output(self, key: str) -> dict[str, Any]:
        """The output this manifest recorded at `key` (read it with ArtifactStore.read_recorded)."""
        for output in self.outputs:
            if output.get("key") == key:
                return output
        raise InputError(
            f"the {self.stage} manifest of run {self.run_id} records no output {key!r}, so it cannot be read verified; "
            f"re-run the stage (--force) and use the new run"
        )

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        return {**document.pop("extra"), **document}

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse a stored manifest; fields this version does not know (a newer writer's) are kept in `extra`."""
        try:
            document = json.loads(data)
            if not isinstance(document, dict):
                raise TypeError(f"expected a JSON object, found {type(document).__name__}")
            known = {f.name for f in fields(cls)} - {"extra"}
            missing = sorted(f.name for f in fields(cls) if f.name in known and f.name not in document and _required(f))
            if missing:
                raise TypeError(f"missing field(s) {', '.join(missing)}")
            extra = {k: v for k, v in document.items() if k not in known}
            return cls(**{k: v for k, v in document.items() if k in known}, extra=extra)
        except (ValueError, TypeError) as exc:
            raise InvalidManifestError(
                f"{where} is not a valid manifest ({exc}); it is skipped: fix or remove it, the runs it names are not reused"
            ) from exc


class InvalidManifestError(InputError):
    """A stored manifest cannot be read (truncated, not JSON, missing fields)."""


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def new_run_id() -> str:
    """A run id that sorts by start time: 20260101T120000Z-1a2b3c4d."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def cache_key(stage: str, code_version: str, parameters: Mapping[str, Any], input_digests: Sequence[str] | Mapping[str, str]) -> str:
    """sha256 of the canonical JSON of everything that determines a stage's outputs.

    A list of digests keeps its order (inputs have roles); a mapping is keyed by role.
    """
    digests = dict(input_digests) if isinstance(input_digests, Mapping) else list(input_digests)
    payload = {"stage": stage, "code_version": code_version, "parameters": parameters, "inputs": digests}
    return hashlib.sha256(_canonical_json(payload)).hexdigest()


def start_manifest(
    stage: str,
    code_version: str,
    run_id: str,
    parameters: Mapping[str, Any],
    inputs: Sequence[ObjectInfo | Mapping[str, Any]],
    environment: Mapping[str, Any] | None = None,
) -> Manifest:
    """A running stage's (or step's) manifest: checks parameters for secrets now, before any work is done."""
    validate_name(stage, "stage name")
    validate_name(run_id, "run id")
    check_parameters(parameters)
    refs = [_input_ref(item) for item in inputs]
    return Manifest(
        stage=stage,
        code_version=code_version,
        run_id=run_id,
        parameters=dict(parameters),
        inputs=refs,
        cache_key=cache_key(base_stage(stage), code_version, parameters, [ref["sha256"] for ref in refs]),
        started_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        host=socket.gethostname(),
        environment=dict(environment or {}),
    )


def manifest_key(run_id: str, stage: str) -> str:
    return f"runs/{validate_name(run_id, 'run id')}/{validate_name(stage, 'stage name')}/{MANIFEST_FILE}"


LEASE_FOLDER = "lease"


def lease_folder(run_id: str, stage: str) -> str:
    """Where the lease of a run's stage (or step, or `pipeline`) lives: one live process runs it (store.lease)."""
    return f"runs/{validate_name(run_id, 'run id')}/{validate_name(stage, 'stage name')}/{LEASE_FOLDER}"


def output_key(run_id: str, stage: str, name: str) -> str:
    """Where a stage's output `name` (may contain '/') lives; the manifest's own name is refused."""
    if name == MANIFEST_FILE or name.split("/")[0] == LEASE_FOLDER:
        raise InputError(f"{name!r} is reserved for the stage's manifest and lease; name the output differently")
    return f"runs/{validate_name(run_id, 'run id')}/{validate_name(stage, 'stage name')}/{name}"


def commit_manifest(store: ArtifactStore, manifest: Manifest) -> ObjectInfo:
    """Write the cache-index entry of a succeeded manifest and then the manifest (the commit marker).

    Call it after every output is stored. The index goes first so that the commit and its index
    agree: if the index cannot be written nothing is committed (the caller records a failure);
    an index entry whose manifest never landed is ignored by find_manifest. Re-committing
    identical bytes is a no-op; a different manifest for the same run and stage is refused
    (OutputExistsError).
    """
    if manifest.status not in (SUCCEEDED, FAILED):
        raise InputError(f"manifest of {manifest.stage} in run {manifest.run_id} is {manifest.status!r}: call finish() first")
    expected_key = cache_key(
        base_stage(manifest.stage), manifest.code_version, manifest.parameters, [ref["sha256"] for ref in manifest.inputs]
    )
    if manifest.cache_key != expected_key:
        raise InputError(f"manifest of {manifest.stage} in run {manifest.run_id} has a cache key that does not match its contents")
    check_parameters(manifest.parameters)
    check_values(_without_version_ids(manifest.to_dict()), "manifest")
    key = manifest_key(manifest.run_id, manifest.stage)
    if manifest.status == SUCCEEDED and manifest.reused_from is None:  # the index names the run that did the work
        entry = {"run_id": manifest.run_id, "manifest": store.uri(key)}
        store.put_bytes(_index_key(manifest.stage, manifest.cache_key, manifest.run_id), _canonical_json(entry))
    return store.put_bytes(key, manifest.to_json())


def record_reuse(store: ArtifactStore, earlier: Manifest, run_id: str, stage: str, tracking: dict[str, Any] | None = None) -> None:
    """Record in `run_id` that its `stage` reused the committed `earlier` run (unless the run has that stage already).

    The record is a manifest whose `reused_from` names the earlier run; load_manifest follows it,
    so a run's stages can all be looked up under its own id even when their work was done before.
    """
    if store.exists(manifest_key(run_id, stage)):
        return
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    record = replace(
        earlier,
        run_id=run_id,
        stage=stage,
        started_at=now,
        finished_at=now,
        seconds=0.0,
        compute=reused_compute(earlier.compute),
        tracking=tracking,  # where the reuse itself was logged, if it was
        host=socket.gethostname(),
        reused_from={"run_id": earlier.run_id, "stage": earlier.stage},
    )
    commit_manifest(store, record)


def load_manifest(store: ArtifactStore, run_id: str, stage: str) -> Manifest:
    """The committed manifest of a run's stage; for a reuse record, the manifest of the run it reused."""
    manifest = _load_own_manifest(store, run_id, stage)
    if manifest.reused_from is not None:
        return _load_own_manifest(store, manifest.reused_from["run_id"], manifest.reused_from["stage"])
    return manifest


def _load_own_manifest(store: ArtifactStore, run_id: str, stage: str) -> Manifest:
    key = manifest_key(run_id, stage)
    try:
        data = store.get_bytes(key)
    except ArtifactNotFoundError as exc:
        raise ArtifactNotFoundError(
            f"run {run_id!r} has no committed manifest for stage {stage!r} in {store.root_uri} "
            "(the stage never finished there, or the run id is wrong; `spectrum runs` lists runs)"
        ) from exc
    return Manifest.from_json(data, store.uri(key))


def find_manifest(store: ArtifactStore, stage: str, cache_key: str) -> Manifest | None:
    """The latest succeeded, committed manifest of `stage` (or any of its steps) with `cache_key`, if any."""
    stage = base_stage(validate_name(stage, "stage name"))
    if not _SHA256.fullmatch(cache_key):
        raise InputError(f"invalid cache key {cache_key!r}: expected 64 lowercase hex digits (see cache_key())")
    found = []
    prefix = f"cache/{stage}/{cache_key}/"
    for entry in store.list(prefix):
        step, _, file = entry.removeprefix(prefix).rpartition("/")
        manifest = load_manifest_or_none(store, file.removesuffix(".json"), step or stage)
        if manifest is not None and manifest.status == SUCCEEDED and manifest.cache_key == cache_key:
            found.append(manifest)
    return max(found, key=lambda m: m.finished_at or "", default=None)


def succeeded_manifest(store: ArtifactStore, run_id: str, stage: str, what: str) -> Manifest:
    """The committed manifest of a run's stage (a reuse record followed), which must have succeeded.

    `what` names what the caller wants from it, for the error otherwise ("an SNR table to select from").
    """
    manifest = load_manifest(store, run_id, stage)
    if manifest.status != SUCCEEDED:
        raise InputError(f"the {stage} stage of run {run_id!r} {manifest.status}; it has no {what}")
    return manifest


def read_output(store: ArtifactStore, manifest: Manifest, name: str) -> tuple[bytes, ObjectInfo]:
    """The output file `name` of a committed stage, read as its manifest recorded it (version and sha256 checked).

    The key comes from the manifest itself, so a stage found through a reuse record is read where
    the run that did the work wrote it.
    """
    return store.read_recorded(manifest.recorded_output(output_key(manifest.run_id, manifest.stage, name)))


def read_stage_output(store: ArtifactStore, run_id: str, stage: str, name: str, what: str) -> tuple[bytes, ObjectInfo]:
    """The output file `name` of a run's succeeded stage (see succeeded_manifest and read_output)."""
    return read_output(store, succeeded_manifest(store, run_id, stage, what), name)


def load_manifest_or_none(store: ArtifactStore, run_id: str, stage: str) -> Manifest | None:
    """The committed manifest, or None when there is none or it cannot be read (warned, naming it).

    One unreadable manifest (truncated, a stray file, a name this version refuses) must not
    break listing runs, audits or cache lookups for the rest of the store.
    """
    try:
        return load_manifest(store, run_id, stage)
    except ArtifactNotFoundError:
        return None
    except InputError as exc:
        log.warning("%s", exc)
        return None


def list_runs(store: ArtifactStore) -> dict[str, list[str]]:
    """Run id -> stages with a committed manifest, stages in pipeline order.

    Keys that no pipeline wrote are skipped with a warning.
    """
    runs: dict[str, list[str]] = {}
    for key in store.list("runs/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST_FILE and NAME.fullmatch(parts[1]) and NAME.fullmatch(parts[2]):
            runs.setdefault(parts[1], []).append(parts[2])
        elif parts[-1] == MANIFEST_FILE:
            log.warning("skipping %s: not a manifest of the runs/<run>/<stage>/ layout", store.uri(key))
    return {run_id: sorted(stages, key=stage_sort_key) for run_id, stages in runs.items()}


def committed_manifests(store: ArtifactStore) -> dict[str, list[Manifest]]:
    """Run id -> its readable manifests in pipeline order (unreadable ones are warned about and skipped)."""
    result: dict[str, list[Manifest]] = {}
    for run_id, stages in sorted(list_runs(store).items()):
        manifests = [m for stage in sorted(stages, key=stage_sort_key) if (m := load_manifest_or_none(store, run_id, stage))]
        if manifests:
            result[run_id] = manifests
    return result


def _without_version_ids(document: dict[str, Any]) -> dict[str, Any]:
    """S3 version ids are opaque random strings the server made: they may look like keys but are not secrets."""
    return {
        **document,
        **{side: [{k: v for k, v in ref.items() if k != "version_id"} for ref in document[side]] for side in ("inputs", "outputs")},
    }


def _index_key(step: str, key: str, run_id: str) -> str:
    stage = base_stage(step)
    return f"cache/{stage}/{key}/{run_id}.json" if step == stage else f"cache/{stage}/{key}/{step}/{run_id}.json"


@dataclass(frozen=True)
class StageRef:
    """One stage (or step) of one run in the store: what a stage hands the next, written `RUN` or `RUN/STEP`."""

    run_id: str
    step: str

    def __str__(self) -> str:
        """`RUN` for the stage itself, `RUN/STEP` for a step of it: what StageRef.parse reads back (the stage is the option's)."""
        return self.run_id if STEP_SEPARATOR not in self.step else f"{self.run_id}/{self.step}"

    @classmethod
    def of(cls, manifest: Manifest) -> StageRef:
        return cls(manifest.run_id, manifest.stage)

    @classmethod
    def parse(cls, reference: str | StageRef, stage: str, option: str) -> StageRef:
        """`RUN` or `RUN/STEP` (a step of `stage`, e.g. `RUN/layer_select.sft`), checked: a wrong stage names the option."""
        if isinstance(reference, StageRef):
            run_id, step = reference.run_id, reference.step
        elif isinstance(reference, str):
            run_id, _, step = reference.partition("/")
        else:
            raise InputError(f"{option}: expected RUN or RUN/STEP, found {type(reference).__name__}")
        step = step or stage
        validate_name(run_id, f"run id in {option}")
        if base_stage(validate_name(step, f"step in {option}")) != stage:
            raise InputError(
                f"{option} {str(reference)!r} names a {base_stage(step)} step; pass RUN or RUN/{stage}{STEP_SEPARATOR}QUALIFIER"
            )
        return cls(run_id, step)

    def manifest(self, store: ArtifactStore) -> Manifest:
        return load_manifest(store, self.run_id, self.step)

    def output_uri(self, name: str) -> str:
        """The store URI of one of its outputs (`store:runs/RUN/STEP/NAME`), which model options accept."""
        return f"store:{output_key(self.run_id, self.step, name)}"


def resolve_run_reference(reference: str | StageRef, stage: str, option: str) -> tuple[str, str]:
    """`RUN` or `RUN/STEP` (or a StageRef) -> (run id, step); see StageRef.parse."""
    ref = StageRef.parse(reference, stage, option)
    return ref.run_id, ref.step


def _input_ref(item: ObjectInfo | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(item, ObjectInfo):
        ref = {"uri": item.uri, "sha256": item.sha256, "size": item.size, "version_id": item.version_id}
    else:
        ref = dict(item)
    if not isinstance(ref.get("uri"), str) or not _SHA256.fullmatch(str(ref.get("sha256"))):
        raise InputError(f"manifest input {ref!r} needs a 'uri' and a 'sha256' of 64 lowercase hex digits")
    return ref


def _canonical_json(value: Any) -> bytes:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InputError(f"parameters must be plain JSON values (no NaN, infinity or objects): {exc}") from exc
