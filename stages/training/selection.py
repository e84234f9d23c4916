"""Which tensors to train: our selection.json, an Axolotl `unfrozen_parameters` YAML, or a layer_select run.

One meaning everywhere: a selected module trains its weight and its bias. A YAML's lines are
regular expressions applied with `re.match`, as Axolotl applies `unfrozen_parameters` (a module
name such as `model.layers.0.self_attn.q_proj` matches its `.weight` and its `.bias`). A
selection.json lists the parameters that YAML trains (`parameters`, exact names); one written
before that field existed (or made from a reference SNR JSON, which does not know the model's
biases) lists the chosen weights in `trainable_tensors`, and each one's module bias is trained
with it. Exact names stay exact: they are escaped, never read as regular expressions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.contracts import LAYER_SELECT, SELECTION_JSON_FILE
from ..base.errors import InputError
from ..selection.document import MAX_SELECTION_BYTES, SelectionDocument, UnfrozenParameters
from ..selection.matching import PatternSet, exact_pattern
from ..store import ArtifactStore, read_stage_output, resolve_run_reference
from ..store.base import sha256_bytes


@dataclass(frozen=True)
class Selection:
    patterns: tuple[str, ...]  # re.match against parameter names
    source: str  # where it came from, for messages
    ref: dict[str, Any]  # manifest input: uri, sha256, size (and version_id)
    model_id: str | None = None  # the model the selection was made for, when known
    exact_names: tuple[str, ...] = field(default_factory=tuple)  # selection.json: the names it lists (each must exist)
    model_structure: str | None = None  # structure_fingerprint of the model it was made for, when known
    document: SelectionDocument | None = None  # selection.json as read (its policy and estimator); None for a YAML
    module_biases: bool = False  # also train the bias of every selected `<module>.weight` (a selection.json without `parameters`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_matcher", PatternSet(self.patterns, f"selection {self.source}", self.exact_names))

    def matching_patterns(self, name: str) -> list[str]:
        """The patterns that re.match `name` (an exact name is its `^name$` pattern)."""
        return self._matcher.matching(name)  # type: ignore[attr-defined]

    def matches(self, name: str) -> bool:
        return self._matcher.matches(name)  # type: ignore[attr-defined]

    def unmatched(self, names: list[str]) -> tuple[str, ...]:
        """The regex patterns (not exact names) that match none of `names`, in the selection's order."""
        used = {pattern for name in names for pattern in self.matching_patterns(name)}
        exact = {exact_pattern(n) for n in self.exact_names}
        return tuple(p for p in self.patterns if p not in used and p not in exact)


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
    data = _read_bounded(path)
    ref = {"uri": path.resolve().as_uri(), "sha256": sha256_bytes(data), "size": len(data)}
    if path.suffix.lower() in (".yaml", ".yml"):
        return _from_yaml(data, str(path), ref)
    return _from_json(data, str(path), ref)


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_SELECTION_BYTES + 1)
    if len(data) > MAX_SELECTION_BYTES:
        raise InputError(f"selection {path} is more than {MAX_SELECTION_BYTES // 2**20} MiB, more than any selection: the right file?")
    return data


def _from_json(data: bytes, where: str, ref: dict[str, Any]) -> Selection:
    document = SelectionDocument.from_json(data, where)
    exact = document.parameters if document.parameters is not None else document.trainable_tensors
    return Selection(
        tuple(exact_pattern(n) for n in exact),
        where,
        ref,
        document.model_id,
        exact,
        document.model_structure,
        document,
        module_biases=document.parameters is None,
    )


def _from_yaml(data: bytes, where: str, ref: dict[str, Any]) -> Selection:
    return Selection(UnfrozenParameters.from_yaml(data, where).lines, where, ref)
