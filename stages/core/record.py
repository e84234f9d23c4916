"""How a stage in a process of its own reports back: `--record FILE`, the manifest it committed or reused and whether it reused it."""

from __future__ import annotations

import json
from pathlib import Path

from ..base.errors import InputError
from ..base.files import write_atomic
from ..store import Manifest
from .stage import StageResult


def write_record(path: Path, result: StageResult) -> None:
    document = {"cached": result.cached, "manifest": json.loads(result.manifest.to_json())}
    write_atomic(path, (json.dumps(document, indent=2) + "\n").encode(), overwrite=True)


def read_record(path: Path) -> tuple[Manifest, bool]:
    """(manifest, reused) from a record written by write_record."""
    try:
        document = json.loads(path.read_bytes())
        manifest = Manifest.from_json(json.dumps(document["manifest"]).encode(), str(path))
        return manifest, bool(document["cached"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"the stage record {path} is not one written by --record: {exc}") from exc
