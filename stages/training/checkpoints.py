"""Training checkpoints in the store, so a run killed on one machine resumes on another.

Every checkpoint DeepSpeed writes to the local work folder is copied to
`runs/<run>/<stage>/checkpoints/step-<N>/…`, and a `complete.json` listing each file with its
sha256 (and the run's cache key) is written last, in the store and beside the local copy: a
checkpoint without it is incomplete and never used. A new run with the same cache key as a run
that did not succeed — one that failed (stopped, crashed) or never committed at all (killed with
SIGKILL, an OOM kill, a lost node) — resumes from the latest usable checkpoint: this machine's own
when its files still match their marker, else the store's copy, else an earlier complete one.
Every file is verified; a checkpoint that is not usable is skipped with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..base.contracts import MANIFEST_FILE, SUCCEEDED, base_stage
from ..base.errors import InputError, SpectrumError
from ..base.files import all_files, write_atomic
from ..core.execution import StageRun
from ..store import ArtifactStore, ObjectInfo, output_key
from ..store.base import sha256_file
from ..store.manifest import load_manifest_or_none

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_OPTIMIZER_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")  # DeepSpeed's per-rank file
COMPLETE = "complete.json"
LATEST = "latest"  # DeepSpeed's pointer to the newest tag in a checkpoint folder
_PREFIX = "step-"


def publish_checkpoint(stage: StageRun, checkpoint_dir: Path, step: int) -> list[ObjectInfo]:
    """Copy the local checkpoint of `step` into the run's outputs; its completion marker last (in the store, then locally)."""
    tag = f"{_PREFIX}{step}"
    folder = checkpoint_dir / tag
    require_every_rank(folder, int(os.environ.get("WORLD_SIZE", "1")))
    infos = [stage.put_file(f"{CHECKPOINTS}/{tag}/{name}", folder / name) for name in all_files(folder) if name != COMPLETE]
    marker = {
        "step": step,
        "cache_key": stage.cache_key,
        "files": [{"path": info.key.split(f"/{tag}/", 1)[1], "sha256": info.sha256, "size": info.size} for info in infos],
    }
    data = (json.dumps(marker, indent=2) + "\n").encode()
    infos.append(stage.put_bytes(f"{CHECKPOINTS}/{tag}/{COMPLETE}", data))
    write_atomic(folder / COMPLETE, data, overwrite=True)
    return infos


def require_every_rank(folder: Path, world_size: int) -> None:
    """Each rank writes its own optimizer shard (ZeRO 1-3) into the checkpoint folder: all must be there.

    Ranks on several machines must share the work folder; where they do not, rank 0 would publish
    a checkpoint holding its own shard alone, marked complete, that no run could resume from.
    """
    ranks = {int(match.group(1)) for name in all_files(folder) if (match := _OPTIMIZER_SHARD.search(name))}
    if world_size > 1 and ranks and ranks != set(range(world_size)):
        raise CheckpointIncompleteError(
            f"the checkpoint {folder} holds the optimizer shards of ranks {sorted(ranks)} of {world_size}: the others wrote "
            "theirs into a work folder of their own; give every rank (every machine) the same shared --work-dir"
        )


class CheckpointIncompleteError(InputError):
    """A checkpoint is missing another rank's files: the ranks do not share the work folder."""


@dataclass(frozen=True)
class _Stored:
    """A complete checkpoint in the store: runs/<run_id>/<stage>/checkpoints/step-<step>/."""

    run_id: str
    stage: str
    step: int
    failed_with_key: bool = False  # its run's failed manifest has our cache key (markers before they recorded it)


def restore_latest(store: ArtifactStore, stage_name: str, cache_key: str, checkpoint_dir: Path) -> dict[str, Any] | None:
    """Point `checkpoint_dir` at the latest usable checkpoint of an unfinished run with this cache key.

    Returns {"run_id", "step"} of a checkpoint brought from the store, or None (this machine's own
    checkpoint is used, or there is none: training starts at step 0).
    """
    local = _local_steps(checkpoint_dir)
    stored = _stored_checkpoints(store, stage_name, cache_key)
    for step in sorted({*local, *(c.step for c in stored)}, reverse=True):
        if step in local and _verified_locally(checkpoint_dir, step):
            _point_latest(checkpoint_dir, step)
            return None
        for candidate in (c for c in stored if c.step == step):
            if _download(store, candidate, cache_key, checkpoint_dir):
                _point_latest(checkpoint_dir, step)
                return {"run_id": candidate.run_id, "step": step}
    (checkpoint_dir / LATEST).unlink(missing_ok=True)  # nothing usable: DeepSpeed starts afresh
    return None


def _stored_checkpoints(store: ArtifactStore, stage_name: str, cache_key: str) -> list[_Stored]:
    """Complete checkpoints of runs of `stage_name` (or its steps) that did not succeed, newest first.

    One listing of `runs/`: a run killed before its commit has checkpoints and no manifest at all.
    Whether a checkpoint belongs to this cache key is read from its marker (or, for markers written
    before they recorded it, from the run's failed manifest).
    """
    markers: list[_Stored] = []
    manifests: set[tuple[str, str]] = set()
    for key in store.list("runs/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST_FILE:
            manifests.add((parts[1], parts[2]))
        elif len(parts) == 6 and parts[3] == CHECKPOINTS and parts[5] == COMPLETE and base_stage(parts[2]) == stage_name:
            step = parts[4].removeprefix(_PREFIX)
            if parts[4].startswith(_PREFIX) and step.isdigit():
                markers.append(_Stored(parts[1], parts[2], int(step)))
    found = []
    for candidate in markers:
        committed = (candidate.run_id, candidate.stage) in manifests
        manifest = load_manifest_or_none(store, candidate.run_id, candidate.stage) if committed else None
        if manifest is not None and (manifest.status == SUCCEEDED or manifest.cache_key != cache_key):
            continue
        found.append(replace(candidate, failed_with_key=manifest is not None))
    return sorted(found, key=lambda c: c.step, reverse=True)


def _download(store: ArtifactStore, candidate: _Stored, cache_key: str, checkpoint_dir: Path) -> bool:
    """Bring a stored checkpoint into `checkpoint_dir`, every file verified; False (warned) when it is not usable."""
    tag = f"{_PREFIX}{candidate.step}"
    where = store.uri(output_key(candidate.run_id, candidate.stage, f"{CHECKPOINTS}/{tag}"))
    folder = checkpoint_dir / tag
    try:
        data = store.get_bytes(output_key(candidate.run_id, candidate.stage, f"{CHECKPOINTS}/{tag}/{COMPLETE}"))
        marker = _marker(data)
        if marker.get("cache_key") != cache_key and not candidate.failed_with_key:
            return False  # another configuration's checkpoint: not ours, nothing to warn about
        shutil.rmtree(folder, ignore_errors=True)
        for entry in marker["files"]:
            key = output_key(candidate.run_id, candidate.stage, f"{CHECKPOINTS}/{tag}/{entry['path']}")
            store.download_file(key, folder / entry["path"], sha256=entry["sha256"])
        write_atomic(folder / COMPLETE, data, overwrite=True)
        return True
    except (SpectrumError, OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("skipping the stored checkpoint %s: %s; trying an earlier one", where, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return False


def _marker(data: bytes) -> dict[str, Any]:
    marker = json.loads(data)
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        raise ValueError(f"{COMPLETE} does not list the checkpoint's files")
    return marker


def _local_steps(checkpoint_dir: Path) -> set[int]:
    """Steps of the local checkpoints that carry a completion marker (published from this folder, or restored into it)."""
    if not checkpoint_dir.is_dir():
        return set()
    steps = set()
    for folder in checkpoint_dir.iterdir():
        step = folder.name.removeprefix(_PREFIX)
        if folder.name.startswith(_PREFIX) and step.isdigit() and (folder / COMPLETE).is_file():
            steps.add(int(step))
    return steps


def _verified_locally(checkpoint_dir: Path, step: int) -> bool:
    """The local checkpoint's files match its marker byte for byte; a damaged one is removed (warned)."""
    folder = checkpoint_dir / f"{_PREFIX}{step}"
    try:
        marker = _marker((folder / COMPLETE).read_bytes())
        for entry in marker["files"]:
            digest, size = sha256_file(folder / entry["path"])
            if (digest, size) != (entry["sha256"], entry["size"]):
                raise ValueError(f"{entry['path']} has {size} bytes with sha256 {digest[:12]}…, not the {entry['size']} recorded")
        return True
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("skipping the local checkpoint %s: %s; using the store's copy or an earlier checkpoint", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return False


def _point_latest(checkpoint_dir: Path, step: int) -> None:
    write_atomic(checkpoint_dir / LATEST, f"{_PREFIX}{step}".encode(), overwrite=True)
