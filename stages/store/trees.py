"""Content-addressed models and data drops in the artifact store, and bringing them back to local folders.

Layout in the store (`<kind>` is `models` or `data`):
    <kind>/<tree>/<relative path>      every file, as in the source folder (a normal Hugging Face layout)
    <kind>/<tree>.listing.json         paths, sha256 and sizes of every file; written last

`<tree>` is "sha256-" + the sha256 of the canonical listing (sorted "path\\0sha256\\0size\\n"
lines), so identical content always lands at the same prefix and storing it again is a no-op.
A tree without its listing is incomplete (or not a downloaded artifact) and is never used.

    stored = publish_tree(store, Listing.of_folder("models", folder, paths), folder)
    local = materialize(stored.uri, store)      # a verified local copy, cached by tree

A folder of a run's outputs (`store:runs/<run>/<stage>/model`, the model cpt trained) is brought
back the same way: its files are those the stage's succeeded manifest recorded (key, version,
sha256), read verified into the same content-addressed cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tqdm import tqdm

from ..base import settings
from ..base.contracts import SUCCEEDED
from ..base.errors import InputError
from ..base.locks import exclusive_lock
from . import ArtifactNotFoundError, ArtifactStore, IntegrityError, ObjectInfo, open_store
from .base import sha256_file
from .manifest import load_manifest, output_key
from .uri import uri_scheme

KINDS = ("models", "data")
LISTING_FORMAT = "spectrum-listing-1"
LISTING_SUFFIX = ".listing.json"
STORE_SCHEME = "store:"
_TREE_TAIL = re.compile(r"^(?:(?P<root>.*?)/)?(?P<kind>models|data)/(?P<tree>sha256-[0-9a-f]{64})/?$")
_RUN_OUTPUT = re.compile(r"^runs/(?P<run>[^/]+)/(?P<step>[^/]+)/(?P<folder>[^/].*?)/?$")


@dataclass(frozen=True)
class ListedFile:
    path: str  # relative, '/'-separated
    sha256: str
    size: int


@dataclass(frozen=True)
class Listing:
    """Every file of a tree; its digest is the tree's name."""

    kind: str
    files: tuple[ListedFile, ...]  # sorted by path

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown artifact kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        object.__setattr__(self, "files", tuple(sorted(self.files, key=lambda f: f.path)))

    @classmethod
    def of_folder(cls, kind: str, folder: Path, paths: Sequence[str]) -> Listing:
        """Hash the given files of `folder` (relative '/'-separated paths)."""
        files = []
        for path in paths:
            sha256, size = sha256_file(folder / path)
            files.append(ListedFile(path, sha256, size))
        return cls(kind, tuple(files))

    @property
    def tree(self) -> str:
        canonical = "".join(f"{f.path}\0{f.sha256}\0{f.size}\n" for f in self.files)
        return "sha256-" + hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        document = {
            "format": LISTING_FORMAT,
            "kind": self.kind,
            "tree": self.tree,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
        }
        return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Listing:
        try:
            document = json.loads(data)
            if document["format"] != LISTING_FORMAT:
                raise ValueError(f"format is {document['format']!r}, expected {LISTING_FORMAT!r}")
            files = tuple(ListedFile(str(f["path"]), str(f["sha256"]), int(f["size"])) for f in document["files"])
            listing = cls(str(document["kind"]), files)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{where} is not a valid listing: {exc}") from exc
        if listing.tree != document["tree"]:
            raise IntegrityError(f"{where} names tree {document['tree']} but its files hash to {listing.tree}; the listing was altered")
        return listing


@dataclass(frozen=True)
class StoredTree:
    """A published tree: where it is, and every object written for it (the listing last)."""

    listing: Listing
    uri: str
    objects: tuple[ObjectInfo, ...]  # the files, then the listing

    @property
    def tree(self) -> str:
        return self.listing.tree


def tree_prefix(kind: str, tree: str) -> str:
    return f"{kind}/{tree}"


def listing_key(kind: str, tree: str) -> str:
    return f"{kind}/{tree}{LISTING_SUFFIX}"


def publish_tree(store: ArtifactStore, listing: Listing, folder: Path, *, progress: bool | None = None) -> StoredTree:
    """Copy the listed files of `folder` into the store, verifying each sha256, then write the listing.

    Objects already stored with the same bytes are not uploaded again.
    """
    prefix = tree_prefix(listing.kind, listing.tree)
    infos = []
    with tqdm(total=listing.size, unit="B", unit_scale=True, desc=f"storing {prefix[:24]}…", disable=_quiet(progress)) as bar:
        for entry in listing.files:
            infos.append(_put_once(store, f"{prefix}/{entry.path}", folder / entry.path, entry))
            bar.update(entry.size)
    infos.append(store.put_bytes(listing_key(listing.kind, listing.tree), listing.to_json()))
    return StoredTree(listing, store.uri(prefix), tuple(infos))


def _put_once(store: ArtifactStore, key: str, path: Path, entry: ListedFile) -> ObjectInfo:
    if store.exists(key):
        existing = store.info(key)
        if existing.sha256 == entry.sha256 and existing.size == entry.size:
            return existing
    return store.put_file(key, path, sha256=entry.sha256)  # refuses different bytes at an existing key


@dataclass(frozen=True)
class StoreLocation:
    """A key (or key prefix) in some store."""

    store: ArtifactStore
    key: str

    @property
    def uri(self) -> str:
        return self.store.uri(self.key) if self.key else self.store.root_uri


@dataclass(frozen=True)
class TreeRef:
    """A content-addressed tree in some store."""

    store: ArtifactStore
    kind: str
    tree: str

    @property
    def uri(self) -> str:
        return self.store.uri(tree_prefix(self.kind, self.tree))


def resolve_uri(uri: str, store: ArtifactStore | None) -> StoreLocation | Path:
    """What `uri` names: a location in a store, or a local folder (returned as a Path, unchecked).

    `store:<key>` is relative to `store`, as is any URI under `store`'s root. Another
    `s3://bucket/…` URI opens its bucket (with the endpoint from the environment); a `file://`
    URI is a local folder unless it ends in `<kind>/sha256-<64 hex>`, when the folder above
    `<kind>` is the store.
    """
    if uri.startswith(STORE_SCHEME):
        if store is None:
            raise InputError(f"{uri!r} is relative to a store, but no store was given (pass --store)")
        return StoreLocation(store, uri[len(STORE_SCHEME) :].strip("/"))
    if store is not None:
        root = store.root_uri.rstrip("/") + "/"
        if uri.startswith(root):
            return StoreLocation(store, uri[len(root) :].strip("/"))
    uri_scheme(uri)
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        path = parts.path.strip("/")
        match = _TREE_TAIL.match(path)
        if match is None:
            return StoreLocation(open_store(f"s3://{parts.netloc}", writable=False), path)
        return StoreLocation(open_store(f"s3://{parts.netloc}/{match['root'] or ''}", writable=False), f"{match['kind']}/{match['tree']}")
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        if _TREE_TAIL.match(path.as_posix()):
            return StoreLocation(open_store(path.parent.parent.as_uri(), writable=False), f"{path.parent.name}/{path.name}")
        return path
    if "://" in uri:
        raise InputError(f"unsupported URI scheme in {uri!r}: use a local folder, file://, s3:// or store:<key>")
    return Path(uri).expanduser()


def as_tree(location: StoreLocation) -> TreeRef | None:
    """The tree a location names, if its key is exactly `<kind>/sha256-<64 hex>`."""
    match = _TREE_TAIL.match(location.key)
    if match is None or match["root"]:
        return None
    return TreeRef(location.store, match["kind"], match["tree"])


def read_listing(ref: TreeRef) -> Listing:
    """The tree's listing, checked against the tree's name; a missing listing means an incomplete tree."""
    key = listing_key(ref.kind, ref.tree)
    try:
        data = ref.store.get_bytes(key)
    except ArtifactNotFoundError as exc:
        raise InputError(
            f"{ref.uri} has no listing ({ref.store.uri(key)}): the download that wrote it did not finish, or it is "
            "not an artifact written by `spectrum download`; run the download again"
        ) from exc
    listing = Listing.from_json(data, ref.store.uri(key))
    if listing.tree != ref.tree or listing.kind != ref.kind:
        raise IntegrityError(f"{ref.store.uri(key)} describes {listing.kind}/{listing.tree}, not {ref.kind}/{ref.tree}")
    return listing


def materialize(uri: str, store: ArtifactStore | None, cache_dir: Path | None = None, *, progress: bool | None = None) -> Path:
    """A local folder holding the model or data drop `uri` names.

    A local folder is returned as given. A stored tree is copied into `<cache_dir>/<tree>`
    (default cache_dir: settings.cache_root()), every file checked against the listing's sha256; the copy
    is assembled in a temporary sibling and renamed into place when complete. An existing cache
    folder is reused only after every listed file in it is hashed and matches the listing (see
    _complete); one that does not match is damaged: it is fetched again from the store and
    replaced, never read.
    """
    located = resolve_uri(uri, store)
    if isinstance(located, Path):
        if not located.is_dir():
            raise InputError(f"{located} is not a folder (or does not exist); pass a model or data folder, or a stored tree URI")
        return located
    if _RUN_OUTPUT.match(located.key):
        return _run_output_copy(located, cache_dir, progress)[0]
    ref = as_tree(located)
    if ref is None:
        raise InputError(
            f"{located.uri} is not a stored model or data drop: expected <store>/<kind>/sha256-<64 hex> "
            f"with <kind> one of {', '.join(KINDS)} (as printed by `spectrum download`), or a run's output folder "
            "store:runs/<run>/<stage>/<folder>"
        )
    return materialize_tree(ref, cache_dir, progress=progress)


def local_copy(uri: str, store: ArtifactStore | None) -> tuple[Path, dict[str, dict]]:
    """A local folder for `uri`, and for a stored tree (from `spectrum download`) or a run's output
    folder the store reference of each of its files by relative path, so a manifest's inputs point
    at the store, not the cache."""
    located = resolve_uri(uri, store)
    if isinstance(located, Path):
        return materialize(str(located), store), {}
    if _RUN_OUTPUT.match(located.key):
        return _run_output_copy(located)
    ref = as_tree(located)
    if ref is None:
        return materialize(uri, store), {}  # raises the clear error for a location that is no tree
    listing = read_listing(ref)
    stored = {f.path: {"uri": f"{ref.uri}/{f.path}", "sha256": f.sha256, "size": f.size} for f in listing.files}
    return materialize_tree(ref), stored


def file_ref(path: Path) -> dict:
    """A manifest input for a local file: its URI, sha256 and size."""
    digest, size = sha256_file(path)
    return {"uri": path.resolve().as_uri(), "sha256": digest, "size": size}


def materialize_tree(ref: TreeRef, cache_dir: Path | None = None, *, progress: bool | None = None) -> Path:
    """The verified local copy of a stored tree (see materialize)."""
    listing = read_listing(ref)
    prefix = tree_prefix(ref.kind, ref.tree)
    sources = {entry.path: {"key": f"{prefix}/{entry.path}"} for entry in listing.files}
    return _materialize(ref.store, listing, sources, cache_dir, progress)


def _run_output_copy(
    location: StoreLocation, cache_dir: Path | None = None, progress: bool | None = None
) -> tuple[Path, dict[str, dict]]:
    """A run's output folder (runs/<run>/<stage>/<folder>), as its succeeded manifest recorded it."""
    match = _RUN_OUTPUT.match(location.key)
    manifest = load_manifest(location.store, match["run"], match["step"])
    if manifest.status != SUCCEEDED:
        raise InputError(f"the {manifest.stage} stage of run {manifest.run_id} {manifest.status}; {location.uri} holds nothing to use")
    # the folder as the manifest recorded it: under the run that did the work, when `run` only reused it
    prefix = output_key(manifest.run_id, manifest.stage, f"{match['folder']}/")
    recorded = {o["key"].removeprefix(prefix): o for o in manifest.outputs if o["key"].startswith(prefix)}
    if not recorded:
        raise InputError(f"{location.uri} names no output of the {manifest.stage} stage of run {manifest.run_id}")
    listing = Listing("models", tuple(ListedFile(path, o["sha256"], o["size"]) for path, o in recorded.items()))
    refs = {path: {k: o[k] for k in ("uri", "sha256", "size", "version_id") if o.get(k) is not None} for path, o in recorded.items()}
    return _materialize(location.store, listing, recorded, cache_dir, progress), refs


def _materialize(
    store: ArtifactStore, listing: Listing, sources: dict[str, dict], cache_dir: Path | None, progress: bool | None
) -> Path:
    """`<cache_dir>/<tree>`, complete and verified: reused when every file hashes right, else fetched and installed."""
    target = Path(cache_dir or settings.cache_root()) / listing.tree
    if _complete(target, listing):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".partial-{listing.tree}-", dir=target.parent))
    try:
        _fetch(store, listing, sources, staging, progress)
        _install(staging, target, listing)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _fetch(store: ArtifactStore, listing: Listing, sources: dict[str, dict], folder: Path, progress: bool | None) -> None:
    """Every listed file from its source (a key, and the version a manifest recorded), sha256 checked."""
    with tqdm(total=listing.size, unit="B", unit_scale=True, desc=f"fetching {listing.tree[:20]}…", disable=_quiet(progress)) as bar:
        for entry in listing.files:
            source = sources[entry.path]
            info = store.download_file(source["key"], folder / entry.path, sha256=entry.sha256, version_id=source.get("version_id"))
            if info.size != entry.size:
                raise IntegrityError(f"{info.uri} is {info.size} bytes but its listing says {entry.size}")
            bar.update(entry.size)


def _install(staging: Path, target: Path, listing: Listing) -> None:
    """Rename the finished copy into place; replace a damaged cache folder, keep one a concurrent run finished.

    Under the tree's lock: without it, a process judging the folder damaged while another renames
    its good copy into place would move that good copy away while its stage reads it.
    """
    with exclusive_lock(target.with_name(f".{target.name}.lock")):
        _install_locked(staging, target, listing)


def _install_locked(staging: Path, target: Path, listing: Listing) -> None:
    if target.exists():
        if _complete(target, listing):
            return
        damaged = target.with_name(f".damaged-{target.name}-{os.getpid()}")
        target.rename(damaged)
        shutil.rmtree(damaged, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not _complete(target, listing):  # another process installed it first: theirs must be whole
            raise


def _complete(folder: Path, listing: Listing) -> bool:
    """Whether `folder` holds every listed file with the listed sha256 and size (each file is hashed).

    A local copy is trusted no more than the store: sizes alone would let a file changed in
    place pass, and the stage reading it would record hashes of bytes it never read. False
    means damaged or incomplete: the caller fetches the tree again and replaces the folder.
    Files the listing does not name are not looked at.
    """
    # read without the tree's lock: another process may move the folder away mid-check, which means "not complete"
    try:
        if not folder.is_dir():
            return False
        for entry in listing.files:
            path = folder / entry.path
            if path.is_symlink() or not path.is_file() or path.stat().st_size != entry.size:  # cheap checks first
                return False
        return all(sha256_file(folder / entry.path) == (entry.sha256, entry.size) for entry in listing.files)
    except OSError:
        return False


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None shows the bar only on a terminal."""
    return None if progress is None else not progress
