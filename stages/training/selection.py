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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.contracts import LAYER_SELECT, SELECTION_JSON_FILE
from ..base.documents import kind_of, load_yaml, shown
from ..base.errors import InputError
from ..base.patterns import compile_pattern
from ..data.drops import decode_utf8
from ..store import ArtifactStore, read_stage_output, resolve_run_reference
from ..store.base import sha256_bytes

MAX_SELECTION_BYTES = 64 * 1024 * 1024  # a selection.json of every tensor of a 100k-tensor model is well below this


@dataclass(frozen=True)
class Selection:
    patterns: tuple[str, ...]  # re.match against parameter names
    source: str  # where it came from, for messages
    ref: dict[str, Any]  # manifest input: uri, sha256, size (and version_id)
    model_id: str | None = None  # the model the selection was made for, when known
    exact_names: tuple[str, ...] = field(default_factory=tuple)  # selection.json: the names it lists (each must exist)
    model_structure: str | None = None  # structure_fingerprint of the model it was made for, when known
    document: dict[str, Any] | None = None  # selection.json as written (its policy and estimator); None for a YAML
    module_biases: bool = False  # also train the bias of every selected `<module>.weight` (a selection.json without `parameters`)

    def __post_init__(self) -> None:
        # Exact names are looked up and plain module lines (`model.layers.0.mlp.up_proj`, the reference tool's) are
        # indexed, so a selection of a 100k-tensor model costs a few lookups per name; the rest are checked regexes.
        exact = {f"^{re.escape(n)}$": n for n in self.exact_names}
        plain: dict[tuple[int, tuple[int, ...]], dict[str, str]] = {}
        regexes = []
        for pattern in self.patterns:
            if pattern in exact:
                continue
            if _PLAIN_LINE.fullmatch(pattern):
                dots = tuple(i for i, c in enumerate(pattern) if c == ".")
                plain.setdefault((len(pattern), dots), {})[_masked(pattern, dots)] = pattern
            else:
                regexes.append(compile_pattern(pattern, f"selection {self.source}: pattern"))
        object.__setattr__(self, "_exact", frozenset(exact[p] for p in self.patterns if p in exact))
        object.__setattr__(self, "_plain", plain)
        object.__setattr__(self, "_regexes", tuple(regexes))

    def matching_patterns(self, name: str) -> list[str]:
        """The patterns that re.match `name` (an exact name is its `^name$` pattern)."""
        found = [f"^{re.escape(name)}$"] if name in self._exact else []  # type: ignore[attr-defined]
        for (length, dots), lines in self._plain.items():  # type: ignore[attr-defined]
            if length <= len(name) and (line := lines.get(_masked(name[:length], dots))) is not None:
                found.append(line)
        found.extend(regex.pattern for regex in self._regexes if regex.match(name))  # type: ignore[attr-defined]
        return found

    def matches(self, name: str) -> bool:
        return bool(self.matching_patterns(name))

    def unmatched(self, names: list[str]) -> tuple[str, ...]:
        """The regex patterns (not exact names) that match none of `names`, in the selection's order."""
        used = {pattern for name in names for pattern in self.matching_patterns(name)}
        exact = {f"^{re.escape(n)}$" for n in self.exact_names}
        return tuple(p for p in self.patterns if p not in used and p not in exact)


_PLAIN_LINE = re.compile(r"[A-Za-z0-9_\-.]+")  # a module name as a regex: every `.` matches any character, the rest itself


def _masked(text: str, dots: tuple[int, ...]) -> str:
    """`text` without the characters at `dots` (the positions where a plain line's `.` matches anything)."""
    if not dots:
        return text
    parts, start = [], 0
    for index in dots:
        parts.append(text[start:index])
        start = index + 1
    parts.append(text[start:])
    return "\0".join(parts)


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
    if len(data) > MAX_SELECTION_BYTES:
        raise InputError(f"{where} is more than {MAX_SELECTION_BYTES // 2**20} MiB, far more than a selection of any model")
    text = decode_utf8(data, where)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to be a selection.json") from None
    if not isinstance(document, dict):
        raise InputError(f"{where} holds {kind_of(document)}, not a selection.json object from `spectrum select`")
    names = _name_list(document, "trainable_tensors", where, required=True)
    parameters = _name_list(document, "parameters", where, required=False)
    model_id = document.get("model_id") if isinstance(document.get("model_id"), str) else None
    structure = document.get("model_structure") if isinstance(document.get("model_structure"), str) else None
    exact = tuple(parameters) if parameters is not None else tuple(names)
    return Selection(
        tuple(f"^{re.escape(n)}$" for n in exact), where, ref, model_id, exact, structure, document, module_biases=parameters is None
    )


def _name_list(document: dict[str, Any], key: str, where: str, required: bool) -> list[str] | None:
    names = document.get(key)
    if names is None and not required:
        return None
    if names is None:
        raise InputError(f"{where} is not a selection.json from `spectrum select`: it has no {key!r} list")
    if not isinstance(names, list):
        raise InputError(f"{where}: {key!r} is {kind_of(names)}, not a list of tensor names")
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise InputError(f"{where}: {key!r} item {index + 1} is {kind_of(name)} ({shown(name)}), not a tensor name")
    return names


def _from_yaml(data: bytes, where: str, ref: dict[str, Any]) -> Selection:
    document = load_yaml(decode_utf8(data, where), where)
    patterns = document.get("unfrozen_parameters") if isinstance(document, dict) else None
    if not isinstance(patterns, list):
        found = kind_of(document) if not isinstance(document, dict) else f"keys {shown(sorted(map(str, document)))}"
        raise InputError(f"{where} has no `unfrozen_parameters` list (the Axolotl layout); it has {found}")
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise InputError(
                f"{where}: unfrozen_parameters item {index + 1} is {shown(pattern)} ({kind_of(pattern)}), not a pattern; "
                "quote it to make it a string"
            )
        compile_pattern(pattern, f"{where}: unfrozen_parameters item {index + 1}")
    return Selection(tuple(patterns), where, ref)
