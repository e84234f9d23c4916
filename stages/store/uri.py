"""Parsing store URIs: `file:///abs/path`, a plain local path, or `s3://bucket/prefix`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..core.errors import InputError
from .keys import validate_prefix

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class FileLocation:
    root: Path


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or a validated key prefix without a trailing '/'


def parse_store_uri(uri: str) -> FileLocation | S3Location:
    if not isinstance(uri, str) or not uri.strip():
        raise InputError("the store URI is empty: use file:///absolute/path, a local folder, or s3://bucket/prefix")
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
