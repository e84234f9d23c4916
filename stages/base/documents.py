"""Reading YAML documents a user wrote (pipeline configs, selections) with bounds, and showing their values in messages.

YAML aliases let a few hundred bytes describe billions of values (`a: &a [x, x]`, `b: &b [*a, *a]`, …):
PyYAML shares the aliased objects, so loading is cheap, but anything that walks the result (a
check, an error message, a JSON manifest) expands it. `load_yaml` bounds the input size and the
size of the document with every alias expanded, and refuses self-referencing aliases, before
any Python object is built. `shown` bounds what a message may print of a value.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

MAX_BYTES = 8 * 1024 * 1024  # a generous bound for a hand-written document (a selection of a huge model is far smaller)
MAX_NODES = 1_000_000  # values (scalars, lists, mappings) with every alias expanded
MAX_DEPTH = 200  # nested lists and mappings (deeper would overflow the parser's stack)
MAX_SHOWN = 120  # characters of a value that a message may print

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = 6


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """`repr(value)` cut to at most `limit` characters (nested and long values elided with `...`), for error messages."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 2 * MAX_SHOWN) -> str:
    """`text` on one line, cut to at most `limit` characters: for a library's message embedded in ours."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(text: str, where: str, *, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES) -> Any:
    """The document in `text` (YAML's safe subset); InputError naming `where` if it is not YAML, too large, or recursive."""
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InputError(f"{where} is more than {max_bytes} bytes, more than a document may have; is it the right file?")
    _check_depth(text, where)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, where, max_nodes)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise InputError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to be a hand-written document") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, where: str | None = None, *, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES) -> Any:
    """`load_yaml` of a UTF-8 file, read no further than the size bound; a missing file is an InputError."""
    path = Path(path)
    where = where or str(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{where} is a folder; name the YAML file") from None
    if len(data) > max_bytes:
        raise InputError(f"{where} is more than {max_bytes} bytes, more than a document may have; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where} is not UTF-8 text (byte {exc.start}): re-encode it as UTF-8") from None
    return load_yaml(text, where, max_bytes=max_bytes, max_nodes=max_nodes)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint and where, on one bounded line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        context = f" ({exc.context}{_at(exc.context_mark)})" if exc.context else ""
        return clip(f"{exc.problem}{_at(exc.problem_mark)}{context}")
    return clip(str(exc))


def _at(mark: yaml.Mark | None) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _check_depth(text: str, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH, from the parser's events (flat), before anything recursive sees the document."""
    loader = _Loader(text)
    depth = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise InputError(
                        f"{where}: nested more than {MAX_DEPTH} levels deep (line {event.start_mark.line + 1}); is it the right file?"
                    )
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
    except yaml.YAMLError as exc:
        raise InputError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node, where: str, limit: int) -> None:
    """Refuse a node graph whose alias-expanded size passes `limit`, or that contains itself (linear in the graph, not its expansion)."""
    sizes: dict[int, int] = {}  # id(node) -> expanded size
    open_nodes: set[int] = set()  # the nodes on the current path: an edge back to one is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > limit:
                raise InputError(
                    f"{where} expands to more than {limit} values (YAML aliases repeat what they name); "
                    "write the values out or use fewer aliases"
                )
            continue
        if key in sizes:
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise InputError(
                    f"{where}: a YAML alias refers to a value that contains it (line {child.start_mark.line + 1}); "
                    "a document cannot contain itself"
                )
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def kind_of(value: object) -> str:
    """What a JSON (or Parquet) value is, for messages: `a number`, `null`, `a list`, …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
