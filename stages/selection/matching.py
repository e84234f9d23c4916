"""Which parameter names a selection's lines match: `re.match`, as Axolotl applies `unfrozen_parameters`.

One matcher for every reader of a selection (freezing a model, layer_select working out what a YAML
line trains). Exact names are looked up; plain module lines (`model.layers.0.mlp.up_proj`, the
reference tool's, where every `.` matches any character and the rest itself) and escaped prefixes
(`^model\\.layers\\.0\\.mlp\\.gate\\.`, layer_select's) are indexed, so a selection of a 100k-tensor
model costs a few lookups per name; the rest are checked regexes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..base.patterns import compile_pattern

_PLAIN_LINE = re.compile(r"[A-Za-z0-9_\-.]+")  # a module name as a regex: every `.` matches any character, the rest itself


def exact_pattern(name: str) -> str:
    """The line that matches exactly `name` (an exact name stays a name: escaped, never read as a regex)."""
    return f"^{re.escape(name)}$"


class PatternSet:
    """Lines applied with `re.match` to names; `exact_names` are the names whose `^name$` lines need no regex."""

    def __init__(self, patterns: Iterable[str], where: str, exact_names: Iterable[str] = ()):
        exact = {exact_pattern(n): n for n in exact_names}
        self._exact: set[str] = set()
        self._plain: dict[tuple[int, tuple[int, ...]], dict[str, list[str]]] = {}  # (length, wildcard dots) -> masked text -> lines
        self._regexes: list[re.Pattern[str]] = []
        for pattern in patterns:
            if pattern in exact:
                self._exact.add(exact[pattern])
            elif _PLAIN_LINE.fullmatch(pattern):
                dots = tuple(i for i, c in enumerate(pattern) if c == ".")
                self._index(len(pattern), dots, _masked(pattern, dots), pattern)
            elif (prefix := _escaped_prefix(pattern)) is not None:
                self._index(len(prefix), (), prefix, pattern)
            else:
                self._regexes.append(compile_pattern(pattern, f"{where}: pattern"))

    def _index(self, length: int, dots: tuple[int, ...], masked: str, pattern: str) -> None:
        lines = self._plain.setdefault((length, dots), {}).setdefault(masked, [])
        if pattern not in lines:
            lines.append(pattern)

    def matching(self, name: str) -> list[str]:
        """The lines that re.match `name` (an exact name is its `^name$` line)."""
        found = [exact_pattern(name)] if name in self._exact else []
        for (length, dots), lines in self._plain.items():
            if length <= len(name):
                found.extend(lines.get(_masked(name[:length], dots), ()))
        found.extend(regex.pattern for regex in self._regexes if regex.match(name))
        return found

    def matches(self, name: str) -> bool:
        return bool(self.matching(name))


def _escaped_prefix(pattern: str) -> str | None:
    """The literal text of a `^<re.escape(text)>` line (it matches the names that start with that text), else None."""
    if not pattern.startswith("^") or len(pattern) == 1:
        return None
    text = re.sub(r"\\(.)", r"\1", pattern[1:], flags=re.DOTALL)
    return text if re.escape(text) == pattern[1:] else None


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
