"""The store interface shared by both backends, and the pieces they share."""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow.fs as pafs

from ..base.errors import InputError, OutputExistsError
from .errors import IntegrityError
from .keys import RESERVED_PREFIX

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: where it is, what it holds, and (on S3) which version."""

    key: str
    uri: str
    sha256: str
    size: int
    version_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class HashingReader:
    """Wraps a binary file so every byte read once is hashed and counted.

    It says it is not seekable, so upload code buffers each part itself instead of seeking
    back (which would hash bytes twice).
    """

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self._digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._digest.update(data)
        self.size += len(data)
        return data

    def seekable(self) -> bool:
        return False

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    with open(path, "rb") as handle:
        reader = HashingReader(handle)
        while reader.read(CHUNK):
            pass
    return reader.sha256, reader.size


def replace_local(local_path: Path, fill: Callable[[IO[bytes]], None], check: Callable[[str, int], None]) -> tuple[str, int]:
    """Write a local file through a temporary sibling; `check(sha256, size)` runs before it replaces `local_path`."""
    if local_path.is_dir():
        raise InputError(f"cannot download to {local_path}: it is a folder; name the file to write")
    local_path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f"{RESERVED_PREFIX}download-", dir=local_path.parent)
    try:
        with os.fdopen(fd, "w+b") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        sha256, size = sha256_file(Path(temporary))
        check(sha256, size)
        os.replace(temporary, local_path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return sha256, size


def source_file(local_path: str | Path) -> Path:
    """A local file to upload: it must exist and not be a folder (a FIFO or device is fine: it is streamed)."""
    path = Path(local_path)
    if not path.exists():
        raise InputError(f"cannot store {path}: no such file")
    if path.is_dir():
        raise InputError(f"cannot store {path}: it is a folder; store its files one by one")
    return path


def check_expected(what: str, sha256: str, size: int, expected_sha256: str | None, expected_size: int | None = None) -> None:
    """Raise IntegrityError if the observed digest or size differs from the expected one."""
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise IntegrityError(f"{what}: sha256 is {sha256} but {expected_sha256} was expected; the bytes are corrupt or changed")
    if expected_size is not None and size != expected_size:
        raise IntegrityError(f"{what}: size is {size} bytes but {expected_size} were expected; the transfer was incomplete")


def refuse_overwrite(existing: ObjectInfo, new_sha256: str) -> ObjectInfo:
    """An existing key may be "rewritten" only with identical bytes, which is then a no-op."""
    if existing.sha256 == new_sha256:
        return existing
    raise OutputExistsError(
        f"{existing.uri} already exists with different content (sha256 {existing.sha256[:16]}…, new {new_sha256[:16]}…); "
        "stored artifacts are never overwritten: write under a new run id or key"
    )


class ArtifactStore(ABC):
    """Objects addressed by validated keys under one root URI; nothing stored is overwritten."""

    @property
    @abstractmethod
    def root_uri(self) -> str: ...

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Publish `data` at `key` atomically; an identical existing object is returned as is."""

    @abstractmethod
    def put_file(self, key: str, local_path: str | Path, *, sha256: str | None = None) -> ObjectInfo:
        """Stream a local file to `key` atomically; `sha256`, when given, must match what was read."""

    @abstractmethod
    def get_bytes(self, key: str, *, version_id: str | None = None) -> bytes: ...

    @abstractmethod
    def download_file(
        self, key: str, local_path: str | Path, *, sha256: str | None = None, version_id: str | None = None
    ) -> ObjectInfo:
        """Copy `key` to `local_path` (replaced atomically), verifying its sha256."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with `prefix` (a plain string prefix, as on S3)."""

    @abstractmethod
    def info(self, key: str, *, version_id: str | None = None) -> ObjectInfo: ...

    @abstractmethod
    def arrow_filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem that reads this store's objects (for Parquet datasets)."""

    @abstractmethod
    def arrow_path(self, key: str) -> str:
        """The path of `key` on arrow_filesystem()."""

    def read_recorded(self, recorded: Mapping[str, Any]) -> tuple[bytes, ObjectInfo]:
        """The bytes of an object a manifest recorded, verified, and the reference of what was read.

        `recorded` is a manifest output (ObjectInfo.to_dict(): key, uri, sha256, size, version_id).
        The version the manifest recorded is read (on S3: never a later version of the key), and
        its bytes must hash to the recorded sha256 and size; the returned ObjectInfo describes
        exactly those bytes, so a stage records as its input what it really read. This is the
        one place that reads an object because a manifest names it: use it for every such read.
        """
        key, expected_sha256, expected_size, version_id = _recorded_fields(recorded)
        data = self.get_bytes(key, version_id=version_id)
        info = ObjectInfo(key, self.uri(key), sha256_bytes(data), len(data), version_id)
        _require_recorded(info, expected_sha256, expected_size)
        return data, info

    def download_recorded(self, recorded: Mapping[str, Any], local_path: str | Path) -> ObjectInfo:
        """read_recorded for an object too large to hold in memory: streamed to `local_path` (replaced atomically), verified."""
        key, expected_sha256, expected_size, version_id = _recorded_fields(recorded)
        info = self.download_file(key, local_path, sha256=expected_sha256, version_id=version_id)
        info = ObjectInfo(key, info.uri, info.sha256, info.size, version_id)
        _require_recorded(info, expected_sha256, expected_size)
        return info


def _recorded_fields(recorded: Mapping[str, Any]) -> tuple[str, str, int | None, str | None]:
    """A manifest output's key, sha256, size and version (read_recorded, download_recorded)."""
    try:
        return recorded["key"], recorded["sha256"], recorded.get("size"), recorded.get("version_id")
    except (KeyError, TypeError) as exc:
        raise IntegrityError(
            f"manifest output {recorded!r} names no key and sha256, so it cannot be read verified; the manifest is damaged"
        ) from exc


def _require_recorded(info: ObjectInfo, expected_sha256: str, expected_size: int | None) -> None:
    """The bytes read (`info`) must be those the manifest recorded."""
    if info.sha256 != expected_sha256 or (expected_size is not None and info.size != expected_size):
        where = f"{info.uri} (version {info.version_id})" if info.version_id else info.uri
        raise IntegrityError(
            f"{where} does not hold the bytes its manifest recorded: it has sha256 {info.sha256} ({info.size} bytes), "
            f"the manifest recorded {expected_sha256} ({expected_size} bytes); it was changed or damaged after it was "
            "written, so it was not used. Restore the object, or re-run the stage that wrote it (--force) and use the new run"
        )
