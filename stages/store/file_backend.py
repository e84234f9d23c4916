"""The `file://` backend: a folder; atomic publish by hard-linking a fsynced temporary file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pyarrow.fs as pafs

from ..base.errors import REFUSALS, InputError, describe_os_error
from .base import (
    CHUNK,
    ArtifactStore,
    HashingReader,
    ObjectInfo,
    check_expected,
    refuse_overwrite,
    replace_local,
    sha256_bytes,
    sha256_file,
    source_file,
)
from .errors import ArtifactNotFoundError, StoreError, StoreRefusedError
from .keys import RESERVED_PREFIX, validate_key, validate_prefix


class FileStore(ArtifactStore):
    def __init__(self, root: Path, writable: bool = True):
        """Open the store folder, creating it unless `writable` is False (then it must exist)."""
        self._root = root.resolve()
        if not writable:
            if not self._root.is_dir():
                raise ArtifactNotFoundError(f"no artifact store at {self._root}; check the path")
            return
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {self._root}: {exc.strerror or exc}") from exc

    @property
    def root_uri(self) -> str:
        return self._root.as_uri()

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        def fill(handle: IO[bytes]) -> tuple[str, int]:
            handle.write(data)
            return sha256_bytes(data), len(data)

        return self._publish(key, fill, expected_sha256=None)

    def put_file(self, key: str, local_path: str | Path, *, sha256: str | None = None) -> ObjectInfo:
        source = source_file(local_path)

        def fill(handle: IO[bytes]) -> tuple[str, int]:
            with open(source, "rb") as src:
                reader = HashingReader(src)
                while chunk := reader.read(CHUNK):
                    handle.write(chunk)
            return reader.sha256, reader.size

        return self._publish(key, fill, expected_sha256=sha256)

    def get_bytes(self, key: str, *, version_id: str | None = None) -> bytes:
        path = self._object(key, version_id)
        with self._reading(key):
            return path.read_bytes()

    def download_file(
        self, key: str, local_path: str | Path, *, sha256: str | None = None, version_id: str | None = None
    ) -> ObjectInfo:
        path = self._object(key, version_id)
        uri = self.uri(key)

        def fill(handle: IO[bytes]) -> None:
            with self._reading(key), open(path, "rb") as src:
                shutil.copyfileobj(src, handle, CHUNK)

        digest, size = replace_local(Path(local_path), fill, lambda d, n: check_expected(uri, d, n, sha256))
        return ObjectInfo(key, uri, digest, size)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        start = self._root.joinpath(*prefix.split("/")[:-1])
        keys = []
        for folder, subfolders, files in os.walk(start):
            subfolders[:] = [name for name in subfolders if not name.startswith(RESERVED_PREFIX)]
            relative = Path(folder).relative_to(self._root).as_posix()
            for name in files:
                key = name if relative == "." else f"{relative}/{name}"
                if not name.startswith(RESERVED_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def info(self, key: str, *, version_id: str | None = None) -> ObjectInfo:
        path = self._object(key, version_id)
        with self._reading(key):
            digest, size = sha256_file(path)
        return ObjectInfo(key, self.uri(key), digest, size)

    def arrow_filesystem(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem()

    def arrow_path(self, key: str) -> str:
        return str(self._path(key))

    def _path(self, key: str) -> Path:
        path = self._root.joinpath(*validate_key(key).split("/"))
        if not path.resolve().is_relative_to(self._root):
            raise InputError(f"invalid store key {key!r}: it leads out of {self._root} through a symbolic link")
        return path

    def _object(self, key: str, version_id: str | None) -> Path:
        if version_id is not None:
            raise InputError(f"{self.uri(key)}: file stores keep no versions (their objects are never replaced); omit version_id")
        return self._path(key)

    @contextmanager
    def _reading(self, key: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ArtifactNotFoundError(f"{self.uri(key)} does not exist in the store") from exc
        except OSError as exc:
            raise _store_error(exc, "reading", self.uri(key)) from exc

    def _publish(
        self, key: str, fill: Callable[[IO[bytes]], tuple[str, int]], expected_sha256: str | None
    ) -> ObjectInfo:
        """Write to a hidden temporary file beside the target, fsync, then hard-link it into place.

        os.link fails if the target exists, so the no-overwrite check and the publish are one
        atomic step, and a reader sees the whole file or nothing.
        """
        path = self._path(key)
        uri = path.as_uri()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise InputError(f"cannot store {key!r}: a parent of it is already an object in {self.root_uri}") from exc
        fd, temporary = tempfile.mkstemp(prefix=f"{RESERVED_PREFIX}tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                digest, size = fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            check_expected(f"writing {uri}", digest, size, expected_sha256)
            try:
                os.link(temporary, path)
            except FileExistsError:
                if path.is_dir():
                    raise InputError(
                        f"cannot store {key!r}: objects are stored under it ({key}/…) in {self.root_uri}; "
                        "a key cannot be both an object and a folder"
                    ) from None
                return refuse_overwrite(self.info(key), digest)
            _fsync_folder(path.parent)
        except OSError as exc:
            raise _store_error(exc, "writing", uri) from exc
        finally:
            Path(temporary).unlink(missing_ok=True)
        return ObjectInfo(key, uri, digest, size)


def _store_error(exc: OSError, doing: str, uri: str) -> StoreError:
    """A refusal of the file system (disk full, read-only, no permission) exits 5; anything else is a store error."""
    if exc.errno in REFUSALS:
        return StoreRefusedError(f"{doing} failed: {describe_os_error(exc, uri)}")
    return StoreError(f"{doing} {uri} failed: {exc.strerror or exc}")


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
