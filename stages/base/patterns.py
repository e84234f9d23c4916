"""Regular expressions a user wrote (selection YAML lines, always-train and type filters), checked before use.

Python's `re` backtracks: a nested repetition such as `^(a+)+$` takes time exponential in the
length of a name it fails to match, and `re` has no timeout. A pattern is refused before any name
is matched when a repetition contains another variable repetition or an alternation (the shapes
that backtrack exponentially), or when it chains more unbounded repetitions than a tensor-name
pattern needs (each multiplies the work by the name's length). Accepted patterns match in time
polynomial, with a small degree, in the length of a parameter name.
"""

from __future__ import annotations

import re
from re import _constants as sre  # type: ignore[attr-defined]  # the parser's opcodes (Python 3.11+)
from re import _parser as sre_parse  # type: ignore[attr-defined]

from .documents import shown
from .errors import InputError

MAX_PATTERN_CHARS = 1000  # a tensor-name pattern is a line; longer is not a hand-written selection
MAX_UNBOUNDED_REPEATS = 4  # `.*`, `+`, `{n,}` in one pattern: matching costs up to len(name) ** this

_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)  # a possessive repeat still backtracks inside


def compile_pattern(pattern: str, what: str) -> re.Pattern[str]:
    """`pattern` compiled; InputError naming `what` and the pattern if it is invalid or could backtrack without bound."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InputError(f"{what} {shown(pattern)} is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS}); shorten it")
    try:
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InputError(f"{what} {shown(pattern)} is not a valid regular expression: {exc}") from None
    problem = _backtracking_problem(sre_parse.parse(pattern))
    if problem:
        raise InputError(
            f"{what} {shown(pattern)} {problem}: matching it can take exponential time (catastrophic backtracking); "
            "rewrite it without repeating a repeated or alternative part, or list exact names"
        )
    unbounded = _count_unbounded(sre_parse.parse(pattern))
    if unbounded > MAX_UNBOUNDED_REPEATS:
        raise InputError(
            f"{what} {shown(pattern)} has {unbounded} unbounded repetitions (`*`, `+`, `{{n,}}`; at most {MAX_UNBOUNDED_REPEATS}): "
            "each multiplies the time to match a name; use fewer, or exact names"
        )
    return compiled


def _backtracking_problem(pattern: sre_parse.SubPattern, repeated: bool = False) -> str | None:
    """Why `pattern` can backtrack exponentially, or None. `repeated`: it sits inside a repetition of more than one."""
    for op, value in pattern:
        if op in _REPEATS:
            low, high, body = value
            if repeated and low != high:
                return "repeats a part that is itself repeated (a nested quantifier)"
            problem = _backtracking_problem(body, repeated or high > 1)
        elif op == sre.BRANCH:
            if repeated:
                return "repeats an alternation `(a|b)`"
            problem = next((p for p in (_backtracking_problem(b, repeated) for b in value[1]) if p), None)
        elif op == sre.SUBPATTERN:
            problem = _backtracking_problem(value[3], repeated)
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            problem = _backtracking_problem(value[1], repeated)
        elif op == sre.ATOMIC_GROUP:  # backtracks inside while it looks for its first match
            problem = _backtracking_problem(value, repeated)
        elif op == sre.GROUPREF_EXISTS:
            problem = next((p for p in (_backtracking_problem(b, repeated) for b in value[1:] if b) if p), None)
        else:  # a literal, a set, an anchor, a backreference
            problem = None
        if problem:
            return problem
    return None


def _count_unbounded(pattern: sre_parse.SubPattern) -> int:
    count = 0
    for op, value in pattern:
        if op in _REPEATS:
            count += (value[1] == sre.MAXREPEAT) + _count_unbounded(value[2])
        elif op == sre.BRANCH:
            count += sum(_count_unbounded(b) for b in value[1])
        elif op == sre.SUBPATTERN:
            count += _count_unbounded(value[3])
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            count += _count_unbounded(value[1])
        elif op == sre.ATOMIC_GROUP:
            count += _count_unbounded(value)
        elif op == sre.GROUPREF_EXISTS:
            count += sum(_count_unbounded(b) for b in value[1:] if b)
    return count
