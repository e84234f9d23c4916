"""Data drops: every new drop under a store prefix gets exactly one pipeline run, however many watchers race.

A drop is a folder `<prefix>/<drop>/` whose files are complete once `_SUCCESS` exists (the
marker Spark and Hadoop write last). A watcher claims a drop by creating
`claims/<prefix>/<drop>/<generation>.json` with the store's conditional create (S3
`If-None-Match: *`, an exclusive link on a file store): of two watchers racing, one creates it
and the other gets OutputExistsError and moves on. The holder copies the drop to a local
folder, runs the pipeline on it and, when it has finished, creates `done.json`. While it runs it
writes a heartbeat (`<generation>.beat-<unix time>`) every third of the timeout; a claim whose
last sign of life is older than the timeout belongs to a watcher that died, and the next
generation is claimed (again conditionally: one taker). The taker's run reuses every stage the
dead one committed, and training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import flow

from stages.core.errors import InputError, OutputExistsError
from stages.store import ArtifactStore, new_run_id

from .pipeline import PipelineResult, open_pipeline_store, run_pipeline
from .pipeline_config import PipelineConfig, load_pipeline_config

READY_MARKER = "_SUCCESS"
CLAIMS = "claims"
DONE = "done.json"


@dataclass(frozen=True)
class Claim:
    drop: str
    generation: int
    run_id: str
    watcher: str


@dataclass
class WatchReport:
    started: list[tuple[str, str]]  # (drop, run id) of the pipeline runs this pass started and finished
    skipped: dict[str, str]  # drop -> why not (done, claimed by another watcher, ...)


def watch_once(
    config: PipelineConfig, prefix: str, claim_timeout: float, watcher: str | None = None, work_dir: Path | None = None
) -> WatchReport:
    """One pass over `prefix`: claim each ready, unprocessed drop and run the pipeline on it."""
    store = open_pipeline_store(config)
    prefix = prefix.strip("/")
    watcher = watcher or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    report = WatchReport([], {})
    for drop in ready_drops(store, prefix):
        claim, why = try_claim(store, prefix, drop, watcher, claim_timeout)
        if claim is None:
            report.skipped[drop] = why
            continue
        result = _process(store, config, prefix, claim, claim_timeout, work_dir)
        report.started.append((drop, result.run_id))
    return report


def ready_drops(store: ArtifactStore, prefix: str) -> list[str]:
    """Drops under `prefix` whose `_SUCCESS` marker exists, by name."""
    return sorted({key[len(prefix) + 1 :].split("/")[0] for key in store.list(f"{prefix}/") if key.endswith(f"/{READY_MARKER}")})


def try_claim(store: ArtifactStore, prefix: str, drop: str, watcher: str, timeout: float) -> tuple[Claim | None, str]:
    """(the claim this watcher now holds, "") or (None, why not)."""
    folder = _claims(prefix, drop)
    keys = store.list(f"{folder}/")
    if f"{folder}/{DONE}" in keys:
        return None, "done"
    generations = sorted(
        int(k.rsplit("/", 1)[1].removesuffix(".json")) for k in keys if k.endswith(".json") and k.rsplit("/", 1)[1][0].isdigit()
    )
    generation = 0
    if generations:
        latest = generations[-1]
        alive = _last_sign_of_life(store, folder, latest, keys)
        if time.time() - alive < timeout:
            return None, f"claimed (generation {latest}) by a watcher alive {time.time() - alive:.0f} s ago"
        generation = latest + 1  # the holder died: take over, conditionally like any claim
    claim = Claim(drop, generation, new_run_id(), watcher)
    document = {"watcher": watcher, "run_id": claim.run_id, "claimed_at": time.time(), "generation": generation}
    try:
        store.put_bytes(f"{folder}/{generation}.json", json.dumps(document).encode())
    except OutputExistsError:
        return None, f"another watcher claimed generation {generation} first"
    return claim, ""


def _process(
    store: ArtifactStore, config: PipelineConfig, prefix: str, claim: Claim, timeout: float, work_dir: Path | None
) -> PipelineResult:
    folder = _claims(prefix, claim.drop)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(timeout / 3):
            store.put_bytes(f"{folder}/{claim.generation}.beat-{time.time():.3f}", b"")

    heartbeat = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{claim.drop}")
    heartbeat.start()
    try:
        local = _copy_drop(store, prefix, claim.drop, (work_dir or Path(config.source).parent / "drops") / claim.drop)
        result = run_pipeline(replace(config, data=str(local)), run=claim.run_id, work_dir=work_dir)
    finally:
        stop.set()
        heartbeat.join()
    done = {"run_id": claim.run_id, "generation": claim.generation, "watcher": claim.watcher, "finished_at": time.time()}
    store.put_bytes(f"{folder}/{DONE}", json.dumps(done).encode())
    return result


def _copy_drop(store: ArtifactStore, prefix: str, drop: str, target: Path) -> Path:
    """The drop's files in a local folder (the pipeline's download stage then stores them content-addressed)."""
    base = f"{prefix}/{drop}/"
    keys = [k for k in store.list(base) if not k.endswith(f"/{READY_MARKER}")]
    if not keys:
        raise InputError(f"the drop {store.uri(base)} holds no files besides {READY_MARKER}")
    for key in keys:
        store.download_file(key, target / key[len(base) :])
    return target


def _last_sign_of_life(store: ArtifactStore, folder: str, generation: int, keys: list[str]) -> float:
    beats = [float(k.rsplit(".beat-", 1)[1]) for k in keys if k.startswith(f"{folder}/{generation}.beat-")]
    claimed = json.loads(store.get_bytes(f"{folder}/{generation}.json"))["claimed_at"]
    return max([claimed, *beats])


def _claims(prefix: str, drop: str) -> str:
    return f"{CLAIMS}/{prefix}/{drop}"


@flow(name="spectrum-watch")
def watch_flow(config_path: str, prefix: str, claim_timeout: float = 3600.0) -> dict:
    """One pass of the watcher (its deployment runs it on a schedule)."""
    report = watch_once(load_pipeline_config(config_path), prefix, claim_timeout)
    return {"started": report.started, "skipped": report.skipped}
