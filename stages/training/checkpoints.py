"""Training checkpoints in the store, so a run killed on one machine resumes on another.

Every checkpoint DeepSpeed writes to the local work folder is copied to
`runs/<run>/<stage>/checkpoints/step-<N>/…`, and a `complete.json` listing each file with its
sha256 is written last: a checkpoint without it is incomplete and never used. A new run with the
same cache key as a run that failed (killed, stopped, crashed) restores the latest complete
checkpoint of those runs into its work folder, every file verified, before training starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..core.contracts import FAILED
from ..core.execution import StageRun
from ..core.files import all_files
from ..store import ArtifactStore, ObjectInfo, list_runs, output_key
from ..store.manifest import load_manifest_or_none

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
LATEST = "latest"  # DeepSpeed's pointer to the newest tag in a checkpoint folder
_TAG = re.compile(r"step-(\d+)")


def publish_checkpoint(stage: StageRun, checkpoint_dir: Path, step: int) -> list[ObjectInfo]:
    """Copy the local checkpoint of `step` into the run's outputs; its completion marker last."""
    tag = f"step-{step}"
    folder = checkpoint_dir / tag
    infos = [stage.put_file(f"{CHECKPOINTS}/{tag}/{name}", folder / name) for name in all_files(folder)]
    marker = {
        "step": step,
        "files": [{"path": info.key.split(f"/{tag}/", 1)[1], "sha256": info.sha256, "size": info.size} for info in infos],
    }
    infos.append(stage.put_bytes(f"{CHECKPOINTS}/{tag}/{COMPLETE}", (json.dumps(marker, indent=2) + "\n").encode()))
    return infos


def restore_latest(store: ArtifactStore, stage_name: str, cache_key: str, checkpoint_dir: Path) -> dict[str, Any] | None:
    """Bring the latest complete checkpoint of a failed run with this cache key into `checkpoint_dir`.

    Returns {"run_id", "step"} of what was restored, or None. A local checkpoint at least as new
    is kept (it is this machine's own work).
    """
    best: tuple[int, str] | None = None
    for run_id, stages in list_runs(store).items():
        if stage_name not in stages:
            continue
        manifest = load_manifest_or_none(store, run_id, stage_name)
        if manifest is None or manifest.status != FAILED or manifest.cache_key != cache_key:
            continue
        for step in _complete_steps(store, run_id, stage_name):
            if best is None or step > best[0]:
                best = (step, run_id)
    if best is None or best[0] <= _local_step(checkpoint_dir):
        return None
    step, run_id = best
    tag = f"step-{step}"
    marker = json.loads(store.get_bytes(output_key(run_id, stage_name, f"{CHECKPOINTS}/{tag}/{COMPLETE}")))
    for entry in marker["files"]:
        key = output_key(run_id, stage_name, f"{CHECKPOINTS}/{tag}/{entry['path']}")
        store.download_file(key, checkpoint_dir / tag / entry["path"], sha256=entry["sha256"])
    (checkpoint_dir / LATEST).write_text(tag)
    return {"run_id": run_id, "step": step}


def _complete_steps(store: ArtifactStore, run_id: str, stage_name: str) -> list[int]:
    prefix = output_key(run_id, stage_name, f"{CHECKPOINTS}/")
    steps = []
    for key in store.list(prefix):
        parts = key[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] == COMPLETE and (match := _TAG.fullmatch(parts[0])):
            steps.append(int(match[1]))
    return steps


def _local_step(checkpoint_dir: Path) -> int:
    latest = checkpoint_dir / LATEST
    match = _TAG.fullmatch(latest.read_text().strip()) if latest.is_file() else None
    return int(match[1]) if match else 0
