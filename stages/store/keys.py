"""Validation of store keys: a key always names a location inside the store root."""

from __future__ import annotations

import re

from ..base.errors import InputError

# Components starting with this are the store's own (temporary files, S3 staging objects).
RESERVED_PREFIX = ".spectrum-"
MAX_KEY_BYTES = 1024  # the S3 limit; the file backend honours it too so both accept the same keys
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_key(key: str) -> str:
    """Return `key` if it is a relative, normalised, '/'-separated path; raise InputError otherwise."""
    _check_path(key, what="key")
    return key


def validate_prefix(prefix: str) -> str:
    """Like validate_key, but "" (everything) and a trailing '/' are allowed."""
    if prefix:
        _check_path(prefix[:-1] if prefix.endswith("/") else prefix, what="prefix")
    return prefix


def validate_name(name: str, what: str) -> str:
    """A single key component chosen by the pipeline (run id, stage, table name)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _check_path(key: str, what: str) -> None:
    def refuse(reason: str) -> InputError:
        return InputError(f"invalid store {what} {key!r}: {reason}")

    if not isinstance(key, str) or not key:
        raise refuse("it must be a non-empty string")
    if _CONTROL.search(key):
        raise refuse("control characters are not allowed")
    if "\\" in key:
        raise refuse("backslashes are not allowed; separate components with '/'")
    if key.startswith("/") or re.match(r"[A-Za-z]:", key):
        raise refuse("it must be relative to the store root, not absolute")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise refuse(f"it is longer than {MAX_KEY_BYTES} bytes")
    for part in key.split("/"):
        if part == "":
            raise refuse("empty components ('//' or a trailing '/') are not allowed")
        if part in (".", ".."):
            raise refuse("'.' and '..' components are not allowed (they would escape or alias the store root)")
        if part.startswith(RESERVED_PREFIX):
            raise refuse(f"components starting with {RESERVED_PREFIX!r} are reserved for the store itself")
