"""Model lines: a line's generations and its production pointer, append-only in the store.

A model line (say `acme-legal`) continues pre-training drop after drop. Its state, under
`lines/<line>/` (keys built here alone), is never overwritten or deleted:

    generations/<n>.json    one record per generation (n = 1, 2, … contiguous), written once when the
                            generation was decided: drop, run, starting model, trained model, decision, reasons
    production/<seq>.json   the promotion pointer (seq = 1, 2, …): each record re-points production to a
                            generation (by the gate, by hand, or as a rollback); the latest seq is production
    skipped/<drop>.json     a drop that was not trained (older than the last processed one), with why
    claims/<prefix>/<drop>/ the watcher's claims on the drops it trains for the line (stages.store.claims)

Every record is appended with the store's conditional create (S3 `If-None-Match: *`, an exclusive
link on a file store): of writers racing for one number exactly one wins; the others re-list and
take the next number, so two watchers (or a watcher and a person) never write two records with one
number and never leave a gap. A run gets one generation record however many writers decide it,
and a drop one record per line (a taken-over run of a drop finds the first run's decision).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from ..base.errors import InputError, OutputExistsError
from .base import ArtifactStore
from .errors import ArtifactNotFoundError, StoreError
from .keys import NAME, validate_name
from .lease import holder_identity

LINES = "lines"
GENERATIONS = "generations"
PRODUCTION = "production"
SKIPPED = "skipped"
CLAIMS = "claims"

PROMOTED = "promoted"
REJECTED = "rejected"
DECISIONS = (PROMOTED, REJECTED)

GATE = "gate"
MANUAL = "manual"
ROLLBACK = "rollback"
ACTIONS = (GATE, MANUAL, ROLLBACK)

MAX_APPEND_ATTEMPTS = 1000  # each lost race means another writer appended: this bounds a runaway loop, not contention
_NUMBERED = re.compile(r"([1-9][0-9]*)\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class GenerationRecord:
    """One decided generation of a line (lines/<line>/generations/<generation>.json)."""

    line: str
    generation: int
    drop: str | None
    run_id: str
    starting_model: dict[str, str]  # {"uri", "sha256"}
    model: str  # the trained model's store URI
    decision: str  # promoted | rejected
    reasons: list[dict[str, Any]]  # the gate's rule results, as given
    decided_at: str  # ISO 8601, UTC
    by: Any  # who decided (a holder identity, or a name)

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProductionPointer:
    """One re-pointing of a line's production (lines/<line>/production/<seq>.json); the latest seq is production."""

    line: str
    seq: int
    generation: int
    run_id: str
    model: str
    action: str  # gate | manual | rollback
    why: str
    at: str  # ISO 8601, UTC
    by: Any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- keys -------------------------------------------------------------------------------------


def line_folder(line: str) -> str:
    """lines/<line> (the name validated: one key component)."""
    return f"{LINES}/{validate_name(line, 'line name')}"


def generation_key(line: str, generation: int) -> str:
    return f"{line_folder(line)}/{GENERATIONS}/{generation}.json"


def pointer_key(line: str, seq: int) -> str:
    return f"{line_folder(line)}/{PRODUCTION}/{seq}.json"


def claims_folder(line: str, prefix: str) -> str:
    """lines/<line>/claims/<prefix>: where a watcher claims the drops under `prefix` for this line."""
    return f"{line_folder(line)}/{CLAIMS}/{prefix}"


def skipped_key(line: str, drop: str) -> str:
    return f"{line_folder(line)}/{SKIPPED}/{validate_name(drop, 'drop name')}.json"


# --- generations --------------------------------------------------------------------------------


def record_generation(
    store: ArtifactStore,
    line: str,
    *,
    drop: str | None,
    run_id: str,
    starting_model: dict[str, str],
    model: str,
    decision: str,
    reasons: list[dict[str, Any]],
    by: Any = None,
    decided_at: str | None = None,
) -> GenerationRecord:
    """Append the decision on `run_id` as the line's next generation, or return the record already written.

    If a record for the same run (or the same drop) exists, whoever wrote it, that record is returned
    and nothing is written: one decision per run and per drop. Callers compare `record.run_id` and
    `record.decision` with their own. `by` defaults to this process (host, pid).
    """
    fields = {
        "line": line,
        "drop": None if drop is None else validate_name(drop, "drop name"),
        "run_id": validate_name(run_id, "run id"),
        "starting_model": _starting_model(starting_model),
        "model": _text(model, "model (the trained model's store URI)"),
        "decision": _choice(decision, DECISIONS, "decision"),
        "reasons": _reasons(reasons),
        "decided_at": decided_at or _now(),
        "by": holder_identity() if by is None else by,
    }
    folder = f"{line_folder(line)}/{GENERATIONS}"
    for _ in range(MAX_APPEND_ATTEMPTS):
        records = generations(store, line)
        earlier = next((r for r in records if r.run_id == run_id or (drop is not None and r.drop == drop)), None)
        if earlier is not None:
            return earlier
        record = GenerationRecord(generation=len(records) + 1, **fields)
        if _create(store, generation_key(line, record.generation), record.to_dict()):
            return record
    raise StoreError(f"could not append a generation to {store.uri(folder)}: {MAX_APPEND_ATTEMPTS} writers appended first")


def generations(store: ArtifactStore, line: str) -> list[GenerationRecord]:
    """The line's generation records, 1..n (empty for a line never recorded)."""
    folder = f"{line_folder(line)}/{GENERATIONS}"
    return [_generation_from(store, line, n, key) for n, key in _numbered(store, folder)]


def generation_record(store: ArtifactStore, line: str, generation: int) -> GenerationRecord:
    """Generation `generation` of the line, or InputError naming the generations it has."""
    _positive(generation, "generation")
    records = generations(store, line)
    if generation > len(records):
        raise InputError(f"line {line} has no generation {generation} in {store.uri(line_folder(line))} ({_have(records)})")
    return records[generation - 1]


def generation_of_run(store: ArtifactStore, line: str, run_id: str) -> GenerationRecord | None:
    """The generation whose run is `run_id`, or None when that run is not a decided generation of the line."""
    validate_name(run_id, "run id")
    return next((r for r in generations(store, line) if r.run_id == run_id), None)


# --- the production pointer ----------------------------------------------------------------------


def promote(store: ArtifactStore, line: str, generation: int, action: str, why: str, *, by: Any = None) -> ProductionPointer:
    """Re-point production to `generation` by appending the next pointer record.

    Refused (InputError) unless `generation` is a recorded generation of the line; `gate` only for a
    generation its gate promoted (and idempotent: a generation the gate already promoted returns that
    record, so a taken-over run promotes once); `rollback` only to a generation that was production
    at some time and is not production now; `manual` any recorded generation that is not production now.
    """
    _choice(action, ACTIONS, "action")
    _text(why, "why", allow_empty=True)
    target = generation_record(store, line, generation)
    if action == GATE and target.promoted and _newer_generation(store, line, generation) is not None:
        earlier = next((p for p in pointer_history(store, line) if p.action == GATE and p.generation == generation), None)
        if earlier is not None:
            return earlier
        raise InputError(
            f"generation {generation} of line {line} is not its newest (generation {_newer_generation(store, line, generation)} "
            f"was decided after it): the gate promotes only the newest generation; promote it by hand if it should be production: "
            f"spectrum line promote {line} --run {target.run_id} --why TEXT"
        )
    if action == GATE and not target.promoted:
        raise InputError(
            f"generation {generation} of line {line} (run {target.run_id}) was {target.decision} by its gate, so the gate cannot "
            f"promote it; promote it by hand: spectrum line promote {line} --run {target.run_id} --why TEXT"
        )
    document = {"line": line, "generation": generation, "run_id": target.run_id, "model": target.model, "action": action, "why": why}
    document |= {"at": _now(), "by": holder_identity() if by is None else by}
    for _ in range(MAX_APPEND_ATTEMPTS):
        history = pointer_history(store, line)
        if action == GATE:
            earlier = next((p for p in history if p.action == GATE and p.generation == generation), None)
            if earlier is not None:
                return earlier
            # Checked again on each attempt: a newer generation that recorded and pointed after the check above took the
            # seq this append tries (its conditional create fails), and production must not go back to an older one.
            newer = _newer_generation(store, line, generation)
            if newer is not None:
                raise InputError(
                    f"generation {generation} of line {line} is not its newest: generation {newer} was decided while this one "
                    f"was being promoted; promote it by hand if it should be production: "
                    f"spectrum line promote {line} --run {target.run_id} --why TEXT"
                )
        if action == ROLLBACK:
            _check_rollback(line, generation, history)
        elif action == MANUAL and history and history[-1].generation == generation:
            raise InputError(f"cannot promote run {target.run_id}: generation {generation} is line {line}'s production already")
        pointer = ProductionPointer(seq=len(history) + 1, **document)
        if _create(store, pointer_key(line, pointer.seq), pointer.to_dict()):
            return pointer
    raise StoreError(f"could not append to {store.uri(line_folder(line) + '/' + PRODUCTION)}: {MAX_APPEND_ATTEMPTS} writers appended first")


def _newer_generation(store: ArtifactStore, line: str, generation: int) -> int | None:
    """The newest generation recorded after `generation`, if any."""
    newest = max((record.generation for record in generations(store, line)), default=0)
    return newest if newest > generation else None


def record_decision(store: ArtifactStore, line: str, **fields: Any) -> tuple[GenerationRecord, ProductionPointer | None]:
    """record_generation, then (for a generation its gate promoted) promote it with action gate.

    Both steps are idempotent, so a run taken over after a crash between them completes the
    promotion exactly once. Returns the generation record and, when promoted, its pointer record.
    """
    record = record_generation(store, line, **fields)
    if not record.promoted:
        return record, None
    try:
        return record, promote(store, line, record.generation, GATE, "passed the promotion gate", by=fields.get("by"))
    except InputError:
        if _newer_generation(store, line, record.generation) is None:
            raise
        # a newer generation was decided first (before or while this one promoted): production does not go back
        return record, next((p for p in pointer_history(store, line) if p.action == GATE and p.generation == record.generation), None)


def complete_gate_promotion(store: ArtifactStore, line: str) -> ProductionPointer | None:
    """Production for the newest generation when its gate promoted it, whose run stopped before production moved.

    Idempotent (`promote` returns the gate's earlier pointer), so every reader of production (a
    line's next run, a watcher) may call it first; None when the newest generation was rejected.
    """
    records = generations(store, line)
    if not records or not records[-1].promoted:
        return None
    return promote(store, line, records[-1].generation, GATE, "passed the promotion gate")


def manual_promote(store: ArtifactStore, line: str, run_id: str, why: str, *, by: Any = None) -> ProductionPointer:
    """Promote the generation whose run is `run_id` by hand (action manual)."""
    record = generation_of_run(store, line, run_id)
    if record is None:
        raise InputError(
            f"run {run_id} is not a complete generation of line {line} in {store.uri(line_folder(line))} "
            f"({_have(generations(store, line))}); only a generation whose decision was recorded can be promoted"
        )
    return promote(store, line, record.generation, MANUAL, why, by=by)


def rollback(store: ArtifactStore, line: str, to_generation: int, why: str, *, by: Any = None) -> ProductionPointer:
    """Re-point production to an earlier production generation (action rollback)."""
    return promote(store, line, to_generation, ROLLBACK, why, by=by)


def pointer_history(store: ArtifactStore, line: str) -> list[ProductionPointer]:
    """Every re-pointing of the line's production, seq 1..n."""
    folder = f"{line_folder(line)}/{PRODUCTION}"
    return [_pointer_from(store, line, seq, key) for seq, key in _numbered(store, folder)]


def production(store: ArtifactStore, line: str) -> ProductionPointer | None:
    """The line's production now (its latest pointer record), or None before any promotion (the config's model)."""
    history = pointer_history(store, line)
    return history[-1] if history else None


def _check_rollback(line: str, generation: int, history: list[ProductionPointer]) -> None:
    if not any(p.generation == generation for p in history):
        promoted = sorted({p.generation for p in history})
        raise InputError(
            f"cannot roll back line {line} to generation {generation}: generation {generation} was never production "
            f"({'production was generation ' + ', '.join(map(str, promoted)) if promoted else 'nothing was ever promoted'}); "
            f"to promote it anyway: spectrum line promote {line} --run RUN --why TEXT"
        )
    if history[-1].generation == generation:
        raise InputError(f"cannot roll back line {line} to generation {generation}: it is production already; nothing to roll back")


# --- drops that were not trained ------------------------------------------------------------------


def record_skipped_drop(store: ArtifactStore, line: str, drop: str, reason: str, *, by: Any = None) -> dict[str, Any]:
    """Record that `drop` was not trained for the line (and why); the first record of a drop stays and is returned."""
    key = skipped_key(line, drop)
    document = {"line": line, "drop": drop, "reason": _text(reason, "reason"), "at": _now(), "by": holder_identity() if by is None else by}
    if _create(store, key, document):
        return document
    return _skipped_from(store, line, key)


def skipped_drops(store: ArtifactStore, line: str) -> list[dict[str, Any]]:
    """The drops recorded as not trained, by drop name."""
    folder = f"{line_folder(line)}/{SKIPPED}/"
    return [_skipped_from(store, line, key) for key in store.list(folder) if "/" not in key[len(folder) :]]


# --- the whole line ------------------------------------------------------------------------------


def line_status(store: ArtifactStore, line: str) -> dict[str, Any]:
    """Generations, the pointer history, production now and the skipped drops, as plain data (JSON)."""
    history = pointer_history(store, line)
    return {
        "line": line,
        "store": store.uri(line_folder(line)),
        "generations": [r.to_dict() for r in generations(store, line)],
        "pointers": [p.to_dict() for p in history],
        "production": history[-1].to_dict() if history else None,
        "skipped_drops": skipped_drops(store, line),
    }


def list_lines(store: ArtifactStore) -> list[str]:
    """The names of the lines with any record in the store."""
    names = {key.split("/")[1] for key in store.list(f"{LINES}/") if key.count("/") >= 2}
    return sorted(name for name in names if NAME.fullmatch(name))


# --- reading and writing records ---------------------------------------------------------------


def _create(store: ArtifactStore, key: str, document: dict[str, Any]) -> bool:
    """Create `key` holding `document`; False when another writer created it first."""
    try:
        data = json.dumps(document, sort_keys=True, indent=1).encode()
    except (TypeError, ValueError) as exc:
        raise InputError(f"the record for {store.uri(key)} cannot be stored as JSON ({exc}); pass plain values") from exc
    try:
        store.put_bytes(key, data)
    except OutputExistsError:
        return False
    return True


def _numbered(store: ArtifactStore, folder: str) -> list[tuple[int, str]]:
    """(n, key) of `folder`'s records 1..n; a foreign object or a gap is an InputError naming the key."""
    found: dict[int, str] = {}
    for key in store.list(f"{folder}/"):
        match = _NUMBERED.fullmatch(key[len(folder) + 1 :])
        if match is None:
            raise InputError(f"{store.uri(key)} is not a record of this line (expected {folder}/<1, 2, …>.json); move it out of {folder}/")
        found[int(match.group(1))] = key
    for n in range(1, len(found) + 1):
        if n not in found:
            raise InputError(
                f"{store.uri(f'{folder}/{n}.json')} is missing although {store.uri(found[max(found)])} exists: the records were changed "
                "outside spectrum; restore the missing record (S3: its earlier version)"
            )
    return sorted(found.items())


def _read(store: ArtifactStore, key: str, what: str) -> dict[str, Any]:
    try:
        document = json.loads(store.get_bytes(key))
    except ArtifactNotFoundError as exc:
        raise InputError(f"{store.uri(key)} vanished while it was read: {what} are never deleted; restore it") from exc
    except ValueError as exc:
        raise InputError(f"{store.uri(key)} is not a {what} JSON document ({exc}); restore it or move it away") from exc
    if not isinstance(document, dict):
        raise InputError(f"{store.uri(key)} is not a {what} (a JSON object was expected); restore it or move it away")
    return document


def _generation_from(store: ArtifactStore, line: str, n: int, key: str) -> GenerationRecord:
    document = _read(store, key, "generation record")
    try:
        record = GenerationRecord(**{name: document[name] for name in GenerationRecord.__dataclass_fields__})
        _check(record.line == line and record.generation == n, f"it names line {record.line!r}, generation {record.generation!r}")
        _choice(record.decision, DECISIONS, "decision")
        validate_name(record.run_id, "run id")
        _starting_model(record.starting_model)
        _reasons(record.reasons)
    except (KeyError, InputError, TypeError) as exc:
        raise InputError(f"{store.uri(key)} is not a generation record of line {line} ({_why(exc)}); restore it or move it away") from exc
    return record


def _pointer_from(store: ArtifactStore, line: str, seq: int, key: str) -> ProductionPointer:
    document = _read(store, key, "production record")
    try:
        pointer = ProductionPointer(**{name: document[name] for name in ProductionPointer.__dataclass_fields__})
        _check(pointer.line == line and pointer.seq == seq, f"it names line {pointer.line!r}, seq {pointer.seq!r}")
        _positive(pointer.generation, "generation")
        _choice(pointer.action, ACTIONS, "action")
    except (KeyError, InputError, TypeError) as exc:
        raise InputError(f"{store.uri(key)} is not a production record of line {line} ({_why(exc)}); restore it or move it away") from exc
    return pointer


def _skipped_from(store: ArtifactStore, line: str, key: str) -> dict[str, Any]:
    document = _read(store, key, "skipped-drop record")
    if document.get("line") != line or not isinstance(document.get("drop"), str):
        raise InputError(f"{store.uri(key)} is not a skipped-drop record of line {line}; restore it or move it away")
    return document


# --- field checks -----------------------------------------------------------------------------


def _why(exc: Exception) -> str:
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)


def _check(condition: bool, why: str) -> None:
    if not condition:
        raise InputError(why)


def _text(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or not (value.strip() or allow_empty):
        raise InputError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise InputError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a whole number from 1, got {value!r}")
    return value


def _starting_model(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not isinstance(value.get("uri"), str) or not value["uri"]:
        raise InputError(f"starting_model must be {{'uri': ..., 'sha256': ...}}, got {value!r}")
    if not isinstance(value.get("sha256"), str) or not _SHA256.fullmatch(value["sha256"]):
        raise InputError(f"starting_model sha256 must be 64 lowercase hex digits, got {value.get('sha256')!r}")
    return {"uri": value["uri"], "sha256": value["sha256"]}


def _reasons(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(reason, dict) for reason in value):
        raise InputError(f"reasons must be a list of rule results (dicts), got {value!r}")
    return value


def _have(records: list[GenerationRecord]) -> str:
    if not records:
        return "it has no generations yet"
    return f"it has generations 1..{len(records)}: " + ", ".join(f"{r.generation} = run {r.run_id}" for r in records[-5:])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
