"""Parsing store URIs: `file:///abs/path`, a plain local path, or `s3://bucket/prefix`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..base.errors import InputError
from .keys import validate_prefix

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Two or more characters before the colon: a one-letter "scheme" is a Windows drive, not a URI.
_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):")
_MISSING_COLON = re.compile(r"(?P<scheme>s3|file)/{2,}", re.IGNORECASE)


@dataclass(frozen=True)
class FileLocation:
    root: Path


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or a validated key prefix without a trailing '/'


def uri_scheme(uri: str, known: tuple[str, ...] = ("file", "s3")) -> str | None:
    """The scheme of `uri`, or None for a plain local path (callers refuse `x://` schemes they do not serve).

    A mistyped URI is an error rather than a local folder of that odd name: an unknown scheme
    (`s4:/…`), a scheme without its slashes (`s3//…`, `s3:bucket`, `file:relative`).
    """
    match = _SCHEME.match(uri)
    if match is None:
        slashes = _MISSING_COLON.match(uri)
        if slashes:
            raise InputError(f"{uri!r} looks like a mistyped URI: did you mean {slashes['scheme']}://{uri[slashes.end():]}?")
        return None
    scheme = match["scheme"].lower()
    if scheme not in known and not uri[match.end() :].startswith("//"):
        raise InputError(f"unsupported URI scheme {scheme!r} in {uri!r}: use a local folder, {' or '.join(f'{k}://' for k in known)}")
    if scheme in known and not uri[match.end() :].startswith("//"):
        raise InputError(f"{uri!r} is not a valid {scheme} URI: use {'file:///absolute/path' if scheme == 'file' else 's3://bucket/prefix'}")
    return scheme


def parse_store_uri(uri: str) -> FileLocation | S3Location:
    if not isinstance(uri, str) or not uri.strip():
        raise InputError("the store URI is empty: use file:///absolute/path, a local folder, or s3://bucket/prefix")
    uri_scheme(uri)
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return _s3_location(uri, parts.netloc, parts.path)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"store URI {uri!r} names host {parts.netloc!r}: use file:///absolute/path (three slashes)")
        if parts.query or parts.fragment:
            raise InputError(f"store URI {uri!r} has a query or fragment; file store URIs are file:///absolute/path")
        return FileLocation(Path(unquote(parts.path)).resolve())
    if "://" in uri:
        raise InputError(f"store URI {uri!r} has unsupported scheme {parts.scheme!r}: use file:// or s3://")
    return FileLocation(Path(uri).expanduser().resolve())


def _s3_location(uri: str, bucket: str, path: str) -> S3Location:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InputError(
            f"store URI {uri!r}: bucket name {bucket!r} is invalid (3-63 lowercase letters, digits, '.' or '-')"
        )
    prefix = path.strip("/")
    if prefix:
        validate_prefix(prefix)
    return S3Location(bucket, prefix)
