"""Which tensors to train: our selection.json, an Axolotl `unfrozen_parameters` YAML, or a layer_select run.

A selection is a list of patterns matched against parameter names with `re.match`, as Axolotl
applies `unfrozen_parameters`: our selection.json gives exact names (each becomes `^name$`), a
YAML gives the regexes as written (the reference tool's module names match their `.weight`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.contracts import LAYER_SELECT, SELECTION_JSON_FILE
from ..core.errors import InputError
from ..store import ArtifactStore, read_stage_output, resolve_run_reference
from ..store.base import sha256_bytes


@dataclass(frozen=True)
class Selection:
    patterns: tuple[str, ...]  # re.match against parameter names
    source: str  # where it came from, for messages
    ref: dict[str, Any]  # manifest input: uri, sha256, size (and version_id)
    model_id: str | None = None  # the model the selection was made for, when known
    exact_names: tuple[str, ...] = field(default_factory=tuple)  # selection.json: the names it lists
    model_structure: str | None = None  # structure_fingerprint of the model it was made for, when known
    document: dict[str, Any] | None = None  # selection.json as written (its policy and estimator); None for a YAML

    def matches(self, name: str) -> bool:
        return any(re.match(pattern, name) for pattern in self.patterns)


def load_selection(source: str | None, run: str | None, store: ArtifactStore | None) -> Selection:
    """The selection named by a file (--selection) or a layer_select run (--selection-run)."""
    if (source is None) == (run is None):
        raise InputError("name the tensors to train: pass --selection FILE or --selection-run RUN (exactly one), or --full")
    if run is not None:
        if store is None:
            raise InputError("--selection-run reads a layer_select run from the artifact store: pass --store too")
        run_id, step = resolve_run_reference(run, LAYER_SELECT, "--selection-run")
        data, info = read_stage_output(store, run_id, step, SELECTION_JSON_FILE, "selection to train")
        return _from_json(data, f"run {run}", info.to_dict())
    path = Path(source)
    if not path.is_file():
        raise InputError(f"selection {path} does not exist; pass selection.json or unfrozen_parameters.yaml from `spectrum select`")
    data = path.read_bytes()
    ref = {"uri": path.resolve().as_uri(), "sha256": sha256_bytes(data), "size": len(data)}
    if path.suffix.lower() in (".yaml", ".yml"):
        return _from_yaml(data, str(path), ref)
    return _from_json(data, str(path), ref)


def _from_json(data: bytes, where: str, ref: dict[str, Any]) -> Selection:
    try:
        document = json.loads(data)
        names = document["trainable_tensors"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{where} is not a selection.json from `spectrum select` (no trainable_tensors list): {exc}") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{where}: trainable_tensors must be a list of tensor names")
    model_id = document.get("model_id")
    structure = document.get("model_structure")
    return Selection(tuple(f"^{re.escape(n)}$" for n in names), where, ref, model_id, tuple(names), structure, document)


def _from_yaml(data: bytes, where: str, ref: dict[str, Any]) -> Selection:
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise InputError(f"{where} is not valid YAML: {exc}") from exc
    patterns = document.get("unfrozen_parameters") if isinstance(document, dict) else None
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise InputError(f"{where} has no `unfrozen_parameters` list of strings (the Axolotl layout)")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(f"{where}: {pattern!r} is not a valid regular expression: {exc}") from exc
    return Selection(tuple(patterns), where, ref)
