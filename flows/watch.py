"""Data drops: every new drop under a store prefix gets exactly one pipeline run, however many watchers race.

A drop is a folder `<prefix>/<drop>/` whose files are complete once `_SUCCESS` exists (the
marker Spark and Hadoop write last). A watcher claims a drop through the store's claims
(stages.store.claims: a lease per attempt) on `claims/<prefix>/<drop>/` (a model line's watcher:
`lines/<line>/claims/<prefix>/<drop>/`, so every line fed by the prefix trains each drop): the
claim `<generation>.json` is created with the store's conditional create (S3 `If-None-Match: *`,
an exclusive link on a file store), so of two watchers racing one wins and the other moves on.
The holder copies the drop to a local folder, runs the pipeline on it and, when it has finished,
creates `done.json`.

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

import logging
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefect import flow

from stages.base.documents import clip
from stages.base.errors import InputError, SpectrumError
from stages.store import ArtifactStore, lines, new_run_id
from stages.store.claims import WorkClaims
from stages.store.keys import validate_name
from stages.store.lease import (
    Lease,
    LeaseLostError,
    holder_identity,
)

from .pipeline import PipelineResult, open_pipeline_store, run_pipeline
from .pipeline_config import PipelineConfig, load_pipeline_config
from .prefect_api import install_scrubbing, redacted, scrub, start_prefect

READY_MARKER = "_SUCCESS"
CLAIMS = "claims"
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
    waiting_for = None  # a model line trains its drops in name order, one generation at a time
    line = config.line.name if config.line is not None else None
    for drop in drops:
        if config.line is not None:
            try:
                validate_name(drop, "drop name")
            except InputError as exc:
                report.skipped[drop] = f"cannot be a generation of line {config.line.name}: {exc}"
                continue
            why = waiting_for and f"waits for drop {waiting_for} (the line's generations run in drop-name order)"
            why = why or _out_of_order(store, line, drop) or _claimed_later(store, prefix, drop, line)
            if why:
                report.skipped[drop] = why
                continue
        try:
            lease, why = try_claim(store, prefix, drop, watcher, claim_timeout, line)
        except InputError as exc:  # a name the store's keys cannot hold: this drop is skipped, the others run
            report.skipped[drop] = f"cannot be claimed: {clip(str(exc))}"
            continue
        if lease is None:
            report.skipped[drop] = why
            if why.startswith("claimed") or why.startswith("another watcher"):
                waiting_for = drop
            continue
        try:
            with lease.held(reason=_reason):
                _process(store, config, prefix, drop, lease, work_dir)
        except LeaseLostError as exc:
            report.failed[drop] = f"stopped, its claim could not be renewed: {clip(scrub(str(exc)))}"
            waiting_for = drop  # retried by a later pass: a line's later drops wait for it
            continue
        except Exception as exc:  # noqa: BLE001 - one bad drop must not stop the others; its claim was released with the reason
            report.failed[drop] = drop_claims(store, prefix, drop, line).after_failure(_reason(exc))
            if "a later pass tries again" in report.failed[drop]:
                waiting_for = drop  # a line's later drops wait for it
            continue
        report.started.append((drop, lease.holder["run_id"]))
    return report


def ready_drops(store: ArtifactStore, prefix: str) -> list[str]:
    """Drops under `prefix` whose `_SUCCESS` marker exists, in drop order.

    Only `<prefix>/<drop>/_SUCCESS` marks a drop: a marker deeper down (a part of the drop written by
    a job of its own) does not make the whole drop ready.
    """
    parts = (key[len(prefix) + 1 :].split("/") for key in store.list(f"{prefix}/"))
    return sorted({part[0] for part in parts if len(part) == 2 and part[1] == READY_MARKER}, key=drop_order)


def drop_order(name: str) -> tuple:
    """Drops sort by name with its numbers read as numbers: drop-9 comes before drop-10 (dates sort as text does)."""
    runs = re.findall(r"\d+|\D+", name)
    return (*((0, int(run), "") if run.isdigit() else (1, 0, run) for run in runs), name)


def claims_folder(prefix: str, line: str | None = None) -> str:
    """Where the claims on the drops under `prefix` live: claims/<prefix>, or a model line's own
    lines/<line>/claims/<prefix>, so that each line fed by one prefix trains every drop once."""
    return f"{CLAIMS}/{prefix}" if line is None else lines.claims_folder(line, prefix)


def drop_claims(store: ArtifactStore, prefix: str, drop: str, line: str | None = None) -> WorkClaims:
    """The claims on a drop's pipeline run (stages.store.claims), in `claims_folder`."""
    return WorkClaims(store, f"{claims_folder(prefix, line)}/{drop}", MAX_ATTEMPTS)


def try_claim(
    store: ArtifactStore, prefix: str, drop: str, watcher: str, timeout: float, line: str | None = None
) -> tuple[Lease | None, str]:
    """(the lease on the drop this watcher now holds, "") or (None, why not)."""
    holder = holder_identity(watcher=watcher, run_id=new_run_id(), drop=drop)
    return drop_claims(store, prefix, drop, line).try_claim(holder, timeout)


def _claimed_later(store: ArtifactStore, prefix: str, drop: str, line: str) -> str | None:
    """A drop that became ready after a later-named drop was claimed (being trained, or done) is not trained: a line
    never trains two generations at once, nor goes back in time."""
    folder = f"{claims_folder(prefix, line)}/"
    later = sorted({key[len(folder) :].split("/")[0] for key in store.list(folder)} - {drop}, key=drop_order)
    later = [name for name in later if drop_order(name) > drop_order(drop)]
    return f"older than drop {later[-1]}, which the line claimed already: not trained" if later else None


def _out_of_order(store: ArtifactStore, line: str, drop: str) -> str | None:
    """Why a line does not train `drop` now: it was trained already, or it is older than the last drop trained."""
    records = lines.generations(store, line)
    trained = [record.drop for record in records if record.drop]
    if drop in trained:
        lines.complete_gate_promotion(store, line)  # its watcher may have stopped before production moved
        return f"trained already as a generation of line {line}"
    later = [name for name in trained if drop_order(name) > drop_order(drop)]
    if later:
        reason = (
            f"older than drop {max(later, key=drop_order)}, which line {line} trained already: not trained (a line never goes back in time)"
        )
        lines.record_skipped_drop(store, line, drop, reason)
        logging.getLogger(__name__).warning("drop %s: %s", drop, reason)
        return reason
    return None


def _process(store: ArtifactStore, config: PipelineConfig, prefix: str, drop: str, lease: Lease, work_dir: Path | None) -> PipelineResult:
    """The pipeline on the drop (the caller holds the lease), then done.json."""
    run_id = lease.holder["run_id"]
    target = Path(os.path.abspath(work_dir or Path(config.source).parent / "drops")) / drop
    local = _copy_drop(store, prefix, drop, target)
    result = run_pipeline(replace(config, data=str(local)), run=run_id, work_dir=work_dir, drop=drop)
    line = config.line.name if config.line is not None else None
    drop_claims(store, prefix, drop, line).mark_done(lease, {"run_id": run_id, "watcher": lease.holder["watcher"]})
    return result


def _copy_drop(store: ArtifactStore, prefix: str, drop: str, target: Path) -> Path:
    """The drop's files in a local folder (the pipeline's download stage then stores them content-addressed)."""
    base = f"{prefix}/{drop}/"
    keys = [k for k in store.list(base) if not k.endswith(f"/{READY_MARKER}")]
    if not keys:
        raise InputError(
            f"the drop {store.uri(base.rstrip('/'))} holds no files besides {READY_MARKER}; add its data or remove its {READY_MARKER}"
        )
    shutil.rmtree(target, ignore_errors=True)  # an earlier attempt's copy may hold files the drop no longer has
    for key in keys:
        store.download_file(key, target / key[len(base) :])
    return target


def _reason(exc: Exception) -> str:
    """One bounded, scrubbed line: what the failure was."""
    text = str(exc) if isinstance(exc, SpectrumError) else f"{type(exc).__name__}: {exc}"
    return clip(scrub(text), 500)


@flow(name="spectrum-watch")
@redacted
def watch_flow(config_path: str, prefix: str, claim_timeout: float = 3600.0) -> dict:
    """One pass of the watcher (its deployment runs it on a schedule)."""
    install_scrubbing()
    report = watch_once(load_pipeline_config(config_path), prefix, claim_timeout)
    return {"started": report.started, "skipped": report.skipped, "failed": report.failed}
