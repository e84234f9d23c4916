"""The selection document: selection.json and the Axolotl `unfrozen_parameters` YAML, one schema for writer and readers.

layer_select writes both (`SelectionDocument.to_json`, `UnfrozenParameters.to_yaml`); the trainers
read them (`SelectionDocument.from_json`, `UnfrozenParameters.from_yaml`), and sft --rescan selects
again with the `policy` a document records. Exact tensor names stay names (tuples of strings, never
regular expressions); the YAML's lines are patterns applied with `re.match`, as Axolotl applies them.
The bytes written are the ones earlier versions wrote: the store's cache keys depend on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..base.contracts import LAYER_SELECT
from ..base.documents import kind_of, load_yaml, shown
from ..base.errors import InputError
from ..base.patterns import compile_pattern
from ..data.drops import decode_utf8

MAX_SELECTION_BYTES = 64 * 1024 * 1024  # a selection.json of every tensor of a 100k-tensor model is well below this
# The layer_select options a selection was made with, in selection.json's order: what sft --rescan selects with again.
POLICY_OPTIONS = ("policy", "top_percent", "budget_percent", "include_types", "exclude_types", "depth_aware", "always_train")
# Recorded after them only for a control's ranking (--rank-by inverse or random): an snr selection's bytes are unchanged.
RANKING_OPTIONS = ("rank_by", "rank_seed")


@dataclass(frozen=True)
class SelectionDocument:
    """selection.json: the tensors chosen, the parameters training updates, the policy, and counts."""

    trainable_tensors: tuple[str, ...]  # chosen by the policy or always-train (exact names)
    parameters: tuple[str, ...] | None = None  # what training updates: the chosen tensors and their modules' biases; None: not known
    unfrozen_parameters: tuple[str, ...] = ()  # the YAML's lines (always-train first, then each type's picks in table order)
    recorded_policy: dict[str, Any] = field(default_factory=dict)  # POLICY_OPTIONS, RANKING_OPTIONS as recorded (older: fewer)
    stage: str | None = LAYER_SELECT
    code_version: str | None = None
    source: str | None = None
    model_id: str | None = None
    model_structure: str | None = None  # structure_fingerprint of the model it was made for
    estimator: str | None = None  # the SNR estimator of the scan it was made from (None: a reference JSON)
    roles_source: str | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    trainable_fraction: float | None = None
    by_type: dict[str, dict[str, int]] = field(default_factory=dict)
    memory_fit: dict[str, Any] | None = None  # --fit-gpu-memory: what was asked and what the selection plans (None: not fitted)
    where: str = field(default="selection.json", compare=False)  # where it was read, for messages

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order selection.json has always had."""
        return {
            "stage": self.stage,
            "code_version": self.code_version,
            "source": self.source,
            "model_id": self.model_id,
            "model_structure": self.model_structure,
            "estimator": self.estimator,
            **{name: self.recorded_policy[name] for name in (*POLICY_OPTIONS, *RANKING_OPTIONS) if name in self.recorded_policy},
            "roles_source": self.roles_source,
            "trainable_tensors": list(self.trainable_tensors),
            "parameters": list(self.parameters) if self.parameters is not None else None,
            "unfrozen_parameters": list(self.unfrozen_parameters),
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "trainable_fraction": self.trainable_fraction,
            "by_type": self.by_type,
            **({"memory_fit": self.memory_fit} if self.memory_fit is not None else {}),  # only when fitted: other bytes unchanged
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> SelectionDocument:
        """The document in `data`; InputError naming `where` when it is not a selection.json (fields trainers ignore are not checked)."""
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
        unfrozen = document.get("unfrozen_parameters")
        return cls(
            trainable_tensors=tuple(names or ()),
            parameters=tuple(parameters) if parameters is not None else None,
            unfrozen_parameters=tuple(unfrozen) if isinstance(unfrozen, list) and all(isinstance(u, str) for u in unfrozen) else (),
            recorded_policy={name: document[name] for name in (*POLICY_OPTIONS, *RANKING_OPTIONS) if name in document},
            **{key: value if isinstance(value := document.get(key), str) else None for key in _TEXTS},
            **{key: value if _is_count(value := document.get(key)) else None for key in _COUNTS},
            trainable_fraction=fraction if _number_or_none(fraction := document.get("trainable_fraction")) else None,
            by_type=document["by_type"] if isinstance(document.get("by_type"), dict) else {},
            memory_fit=document["memory_fit"] if isinstance(document.get("memory_fit"), dict) else None,
            where=where,
        )

    @property
    def policy(self) -> dict[str, Any]:
        """The layer_select options to select with again (SelectConfig's keyword arguments); InputError when one is malformed."""
        for name, value in self.recorded_policy.items():
            expected = _POLICY_TYPES[name]
            if not expected[1](value):
                raise InputError(
                    f"{self.where}: {name!r} is {shown(value)} ({kind_of(value)}), not {expected[0]}; "
                    "make the selection again with `spectrum select`"
                )
        return dict(self.recorded_policy)


_TEXTS = ("stage", "code_version", "source", "model_id", "model_structure", "estimator", "roles_source")
_COUNTS = ("trainable_parameters", "total_parameters")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


_POLICY_TYPES = {
    "policy": ("a policy name", lambda v: isinstance(v, str)),
    "top_percent": ("a percentage or null", _number_or_none),
    "budget_percent": ("a percentage or null", _number_or_none),
    "include_types": ("a list of patterns", _texts),
    "exclude_types": ("a list of patterns", _texts),
    "depth_aware": ("true or false", lambda v: isinstance(v, bool)),
    "always_train": ("a list of roles and patterns, or null", lambda v: v is None or _texts(v)),
    "rank_by": ("a ranking name", lambda v: isinstance(v, str)),
    "rank_seed": ("a whole number", _is_count),
}


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


@dataclass(frozen=True)
class UnfrozenParameters:
    """The Axolotl `unfrozen_parameters` YAML: its lines, and the `# <type> layers` headings between them.

    `headings` are (index of the line they precede, module type); a YAML read back has none (comments are not data).
    """

    lines: tuple[str, ...]
    headings: tuple[tuple[int, str], ...] = ()

    def to_yaml(self) -> str:
        """The reference tool's layout. Lines are written plain, as the reference does, unless YAML would read them back
        as something else (a newline, `: `, ` #`, a number, `null`): then double-quoted. The text must read back as the lines.
        """
        out = ["unfrozen_parameters:"]
        headings = list(self.headings)
        for index, line in enumerate([*self.lines, None]):
            while headings and headings[0][0] == index:
                out.append(f"# {' '.join(headings.pop(0)[1].split())} layers")
            if line is not None:
                out.append(f"- {_yaml_scalar(line)}")
        text = "\n".join(out) + "\n"
        if (yaml.safe_load(text) or {}).get("unfrozen_parameters") != (list(self.lines) or None):
            raise InputError("the unfrozen_parameters YAML would not read back as the selection; a tensor name cannot be written safely")
        return text

    @classmethod
    def from_yaml(cls, data: bytes, where: str) -> UnfrozenParameters:
        """The lines of an Axolotl YAML, each checked as a pattern; InputError naming `where` and the item otherwise."""
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
        return cls(tuple(patterns))


def _yaml_scalar(text: str) -> str:
    """`text` as a YAML list item: plain when YAML reads it back unchanged, else a double-quoted (JSON) string."""
    if "\n" not in text and "\r" not in text and text == text.strip():
        try:
            if yaml.safe_load(f"- {text}") == [text]:
                return text
        except yaml.YAMLError:
            pass
    return json.dumps(text)
