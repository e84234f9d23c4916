"""Data drops: every new drop under a store prefix gets exactly one pipeline run, however many watchers race.

A drop is a folder `<prefix>/<drop>/` whose files are complete once `_SUCCESS` exists (the
marker Spark and Hadoop write last). A watcher claims a drop with a lease (stages.store.lease)
on `claims/<prefix>/<drop>/`: the claim `<generation>.json` is created with the store's
conditional create (S3 `If-None-Match: *`, an exclusive link on a file store), so of two
watchers racing one wins and the other moves on. The holder copies the drop to a local folder,
runs the pipeline on it and, when it has finished, creates `done.json`.

- The Prefect API is started (or checked) before anything is claimed: a watcher that could not
  run never holds a drop.
- While it runs, the holder renews its lease from a thread that retries store errors; if it
  cannot renew for half the claim timeout it stops its own run (LeaseLostError) before the
  lease can expire, so a taker never duplicates a live run.
- A holder that fails releases its claim at once with the reason (`<generation>.released.json`,
  outcome failed), and the watcher goes on to the next drop. A later pass tries again, up to
  MAX_ATTEMPTS generations (failed runs, and holders that died without releasing); then
  `failed.json` records the drop as failed with the last reason, and it is skipped like a done one.
- A claim whose holder died (no heartbeat for the claim timeout) is taken over by the next
  generation; the taker's run reuses every stage the dead one committed, and training resumes
  from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import flow

from stages.base.documents import clip
from stages.base.errors import InputError, OutputExistsError, SpectrumError
from stages.store import ArtifactStore, new_run_id
from stages.store.errors import ArtifactNotFoundError
from stages.store.lease import (
    RELEASED_SUFFIX,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    LeaseState,
    acquire_lease,
    generations,
    holder_identity,
    lease_state,
)

from .pipeline import PipelineResult, open_pipeline_store, run_pipeline
from .pipeline_config import PipelineConfig, load_pipeline_config
from .prefect_api import install_scrubbing, redacted, scrub, start_prefect

READY_MARKER = "_SUCCESS"
CLAIMS = "claims"
DONE = "done.json"
FAILED = "failed.json"
MAX_ATTEMPTS = 3  # generations of a drop that may fail (or die) before it is recorded as failed


@dataclass
class WatchReport:
    started: list[tuple[str, str]]  # (drop, run id) of the pipeline runs this pass started and finished
    skipped: dict[str, str]  # drop -> why not (done, failed, claimed by another watcher, ...)
    failed: dict[str, str] = field(default_factory=dict)  # drop -> why this pass's run of it failed, and what happens next


def watch_once(
    config: PipelineConfig, prefix: str, claim_timeout: float, watcher: str | None = None, work_dir: Path | None = None
) -> WatchReport:
    """One pass over `prefix`: claim each ready, unprocessed drop and run the pipeline on it; a failed drop does not stop the pass."""
    store = open_pipeline_store(config)
    prefix = prefix.strip("/")
    watcher = watcher or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    report = WatchReport([], {})
    drops = ready_drops(store, prefix)
    if drops:
        start_prefect()  # before any claim: a watcher that cannot run must not hold a drop
    for drop in drops:
        lease, why = try_claim(store, prefix, drop, watcher, claim_timeout)
        if lease is None:
            report.skipped[drop] = why
            continue
        try:
            with lease.held(reason=_reason):
                _process(store, config, prefix, drop, lease, work_dir)
        except LeaseLostError as exc:
            report.failed[drop] = f"stopped, its claim could not be renewed: {clip(scrub(str(exc)))}"
            continue
        except Exception as exc:  # noqa: BLE001 - one bad drop must not stop the others; its claim was released with the reason
            report.failed[drop] = _after_failure(store, prefix, drop, _reason(exc))
            continue
        report.started.append((drop, lease.holder["run_id"]))
    return report


def ready_drops(store: ArtifactStore, prefix: str) -> list[str]:
    """Drops under `prefix` whose `_SUCCESS` marker exists, by name."""
    return sorted({key[len(prefix) + 1 :].split("/")[0] for key in store.list(f"{prefix}/") if key.endswith(f"/{READY_MARKER}")})


def try_claim(store: ArtifactStore, prefix: str, drop: str, watcher: str, timeout: float) -> tuple[Lease | None, str]:
    """(the lease on the drop this watcher now holds, "") or (None, why not)."""
    folder = _claims(prefix, drop)
    keys = store.list(f"{folder}/")
    if f"{folder}/{DONE}" in keys:
        return None, "done"
    if f"{folder}/{FAILED}" in keys:
        return None, _failed_note(store, folder)
    state = lease_state(store, folder, timeout, keys)
    if state is not None and state.live:
        return None, f"claimed (generation {state.generation}) by a watcher alive {time.time() - state.last_sign_of_life:.0f} s ago"
    attempts = _failed_attempts(store, folder, keys, state)
    if len(attempts) >= MAX_ATTEMPTS:
        _record_failed(store, folder, attempts)
        return None, _failed_note(store, folder)
    try:
        return acquire_lease(store, folder, holder_identity(watcher=watcher, run_id=new_run_id(), drop=drop), timeout), ""
    except LeaseHeldError:
        return None, f"another watcher claimed generation {0 if state is None else state.generation + 1} first"


def _process(store: ArtifactStore, config: PipelineConfig, prefix: str, drop: str, lease: Lease, work_dir: Path | None) -> PipelineResult:
    """The pipeline on the drop (the caller holds the lease), then done.json."""
    run_id = lease.holder["run_id"]
    target = Path(os.path.abspath(work_dir or Path(config.source).parent / "drops")) / drop
    local = _copy_drop(store, prefix, drop, target)
    result = run_pipeline(replace(config, data=str(local)), run=run_id, work_dir=work_dir)
    done = {"run_id": run_id, "generation": lease.generation, "watcher": lease.holder["watcher"], "finished_at": time.time()}
    store.put_bytes(f"{_claims(prefix, drop)}/{DONE}", json.dumps(done).encode())
    return result


def _copy_drop(store: ArtifactStore, prefix: str, drop: str, target: Path) -> Path:
    """The drop's files in a local folder (the pipeline's download stage then stores them content-addressed)."""
    base = f"{prefix}/{drop}/"
    keys = [k for k in store.list(base) if not k.endswith(f"/{READY_MARKER}")]
    if not keys:
        raise InputError(
            f"the drop {store.uri(base.rstrip('/'))} holds no files besides {READY_MARKER}; add its data or remove its {READY_MARKER}"
        )
    for key in keys:
        store.download_file(key, target / key[len(base) :])
    return target


def _reason(exc: Exception) -> str:
    """One bounded, scrubbed line: what the failure was."""
    text = str(exc) if isinstance(exc, SpectrumError) else f"{type(exc).__name__}: {exc}"
    return clip(scrub(text), 500)


def _failed_attempts(store: ArtifactStore, folder: str, keys: list[str], latest: LeaseState | None) -> list[dict[str, Any]]:
    """The generations of the drop that failed: released as failed, or claimed by a holder that died (never released, silent).

    `latest` is the folder's lease state, read from the same listing `keys`.
    """
    attempts = []
    for generation in sorted(generations(folder, keys)):
        released_key = f"{folder}/{generation}{RELEASED_SUFFIX}"
        if released_key in keys:
            released = _read_json(store, released_key)
            if released.get("outcome") == "failed":
                attempts.append({"generation": generation, "reason": released.get("reason", "")})
        elif latest is None or generation < latest.generation or latest.expired:
            attempts.append({"generation": generation, "reason": "its watcher stopped without a word (killed, or its machine lost)"})
    return attempts


def _after_failure(store: ArtifactStore, prefix: str, drop: str, reason: str) -> str:
    """Record the drop as failed once it has failed MAX_ATTEMPTS times; what the report says about this failure."""
    folder = _claims(prefix, drop)
    keys = store.list(f"{folder}/")
    attempts = _failed_attempts(store, folder, keys, lease_state(store, folder, 0.0, keys))
    if len(attempts) >= MAX_ATTEMPTS:
        _record_failed(store, folder, attempts)
        return f"failed {len(attempts)} times, recorded as failed in {store.uri(f'{folder}/{FAILED}')}: {reason}"
    return f"failed (attempt {len(attempts)} of {MAX_ATTEMPTS}; a later pass tries again): {reason}"


def _record_failed(store: ArtifactStore, folder: str, attempts: list[dict[str, Any]]) -> None:
    record = {"attempts": len(attempts), "reason": attempts[-1]["reason"], "generations": attempts, "failed_at": time.time()}
    with contextlib.suppress(OutputExistsError):  # another watcher recorded it first
        store.put_bytes(f"{folder}/{FAILED}", json.dumps(record).encode())


def _failed_note(store: ArtifactStore, folder: str) -> str:
    record = _read_json(store, f"{folder}/{FAILED}")
    return (
        f"failed after {record.get('attempts', MAX_ATTEMPTS)} attempts: {record.get('reason', 'unknown')} "
        f"(remove {store.uri(f'{folder}/{FAILED}')} to try again)"
    )


def _read_json(store: ArtifactStore, key: str) -> dict[str, Any]:
    try:
        document = json.loads(store.get_bytes(key))
    except (ArtifactNotFoundError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _claims(prefix: str, drop: str) -> str:
    return f"{CLAIMS}/{prefix}/{drop}"


@flow(name="spectrum-watch")
@redacted
def watch_flow(config_path: str, prefix: str, claim_timeout: float = 3600.0) -> dict:
    """One pass of the watcher (its deployment runs it on a schedule)."""
    install_scrubbing()
    report = watch_once(load_pipeline_config(config_path), prefix, claim_timeout)
    return {"started": report.started, "skipped": report.skipped, "failed": report.failed}
