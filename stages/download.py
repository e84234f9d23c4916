"""download stage: bring a model and/or a data drop into the artifact store, content-addressed.

Model sources: a Hugging Face hub id (`org/name`, at `--revision`, default `main`; the resolved
commit is recorded), a local folder, or a store URI. Only safetensors weights, the config, the
tokenizer and generation files are copied; pickle weights (.bin, .pt, …) only with
--allow-pickle; a model whose config needs custom code (`auto_map`) only with
--trust-remote-code (its *.py files are then copied too).

Data-drop sources: a local folder or store URI of .txt/.jsonl/.json/.parquet files (searched
recursively), or a folder written by `datasets`' `save_to_disk` (copied as it is, so
`datasets.load_from_disk` reads the materialized copy). Every file is checked before anything is
stored. Names starting with '.' (e.g. .git, .cache) are ignored in every folder.

Each source lands at `<kind>/sha256-…/` (see stages.model_source); the manifest lists every
source file and every stored object with its sha256, and `download.json` in the run says where
the model and the drop are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError, SpectrumError
from .model_source import (
    Listing,
    StoreLocation,
    as_tree,
    cache_root,
    materialize_tree,
    publish_tree,
    resolve_uri,
)
from .model_weights import INDEX_FILE, PICKLE_SUFFIXES, ModelWeights
from .stage_run import StageOutcome, StageRun, add_store_arguments, describe, execute_stage, store_from_args
from .store import ArtifactStore, Manifest, ObjectInfo

STAGE = "download"
SUMMARY_NAME = "download.json"
MODEL_FILES = (
    "*.safetensors",
    INDEX_FILE,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_FILES = (*(f"*{suffix}" for suffix in PICKLE_SUFFIXES), "*.bin.index.json")
CODE_FILES = ("*.py",)
CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # where `auto_map` asks for custom code
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_DEFAULT_ENDPOINT = "https://huggingface.co"
RETRY_ATTEMPTS = 3
RETRY_BASE_ENV = "SPECTRUM_DOWNLOAD_RETRY_BASE_SECONDS"
RETRY_BASE_DEFAULT_S = 2.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class HubUnavailableError(SpectrumError):
    """The Hugging Face hub could not be reached, even after bounded retries."""


@dataclass
class DownloadConfig:
    model: str | None = None  # hub id, local folder or store URI
    data: str | None = None  # local folder or store URI
    revision: str | None = None  # hub models only; default "main"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    run_id: str | None = None
    force: bool = False
    progress: bool | None = None  # None: show when stderr is a terminal


@dataclass(frozen=True)
class Gathered:
    """Source files available in a local folder, checked and hashed, ready to store."""

    role: str  # "model" or "data"
    folder: Path
    listing: Listing
    origin: Callable[[str], str]  # relative path -> the URI recorded as the manifest input
    details: dict[str, Any]  # recorded in download.json


def run(config: DownloadConfig, store: ArtifactStore) -> StageOutcome:
    if not config.model and not config.data:
        raise InputError("nothing to download: pass --model and/or --data")
    if config.revision is not None and not (config.model and _is_hub_source(config.model)):
        raise InputError(f"--revision {config.revision!r} applies only to a Hugging Face hub model id (org/name)")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=_work_root()) as work:
        gathered = []
        if config.model:
            gathered.append(_gather_model(config.model, config, store, Path(work) / "model"))
        if config.data:
            gathered.append(_gather_data(config.data, store, Path(work) / "data", config.progress))
        model_commit = gathered[0].details.get("commit") if config.model else None
        parameters = {
            "model": config.model,
            "revision": config.revision,
            "model_commit": model_commit,
            "data": config.data,
            "allow_pickle": config.allow_pickle,
            "trust_remote_code": config.trust_remote_code,
        }
        inputs = [
            {"uri": g.origin(f.path), "sha256": f.sha256, "size": f.size, "role": g.role}
            for g in gathered
            for f in g.listing.files
        ]

        def produce(stage: StageRun) -> list[ObjectInfo]:
            outputs: list[ObjectInfo] = []
            summary: dict[str, Any] = {}
            for g in gathered:
                stored = publish_tree(stage.store, g.listing, g.folder, progress=config.progress)
                outputs.extend(stored.objects)
                summary[g.role] = {
                    "uri": stored.uri,
                    "tree": stored.tree,
                    "listing": stored.objects[-1].uri,
                    "files": len(g.listing.files),
                    "bytes": g.listing.size,
                    **g.details,
                }
            outputs.append(stage.put_bytes(SUMMARY_NAME, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()))
            return outputs

        return execute_stage(store, STAGE, parameters, inputs, produce, config.run_id, config.force)


def read_summary(store: ArtifactStore, manifest: Manifest) -> dict[str, Any]:
    """download.json of a committed download: {"model": {"uri", "tree", "commit", …}, "data": {…}}."""
    for output in manifest.outputs:
        if output["key"].endswith(f"/{STAGE}/{SUMMARY_NAME}"):
            return json.loads(store.get_bytes(output["key"], version_id=output.get("version_id")))
    raise InputError(f"run {manifest.run_id} has no {SUMMARY_NAME} among its {STAGE} outputs; it is not a download manifest")


# --- models ---------------------------------------------------------------------------------


def _gather_model(source: str, config: DownloadConfig, store: ArtifactStore, work: Path) -> Gathered:
    if _is_hub_source(source):
        return _gather_hub_model(source, config.revision or "main", config)
    folder, origin = _fetch_folder(source, store, work, "model", config.progress)
    where = f"model {source}"
    files = _all_files(folder)
    paths = select_model_files(files, lambda name: _read_json(folder / name, where), where, config)
    _check_weights(folder, paths)
    details = {"source": source, "skipped": _skipped(files, paths)}
    return Gathered("model", folder, Listing.of_folder("models", folder, paths), origin, details)


def select_model_files(
    files: list[str], read_json: Callable[[str], Any], where: str, config: DownloadConfig
) -> list[str]:
    """The files of a model to copy; refuses custom code, pickle-only and weightless models."""
    if "config.json" not in files:
        raise InputError(f"{where} has no config.json; pass a Hugging Face model (folder, hub id or stored model)")
    custom = [name for name in CODE_CONFIGS if name in files and _has_auto_map(read_json(name))]
    if custom and not config.trust_remote_code:
        raise InputError(
            f"{where} needs custom code to load (`auto_map` in {', '.join(custom)}); it is refused because that code "
            "would run on every machine that loads the model. Pass --trust-remote-code only if you trust its authors"
        )
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if not any(name.endswith(".safetensors") for name in files):
        if not pickles:
            raise InputError(f"{where} has no weights: no *.safetensors files (and no pickle weights)")
        if not config.allow_pickle:
            raise InputError(
                f"{where} has only pickle weights ({', '.join(pickles)}) and no *.safetensors; loading pickle can run "
                "arbitrary code. Convert them to safetensors, or pass --allow-pickle to copy them anyway"
            )
    patterns = (*MODEL_FILES, *(PICKLE_FILES if config.allow_pickle else ()), *(CODE_FILES if config.trust_remote_code else ()))
    return [name for name in files if any(fnmatchcase(name, pattern) for pattern in patterns)]


def _has_auto_map(document: Any) -> bool:
    return isinstance(document, dict) and "auto_map" in document


def _check_weights(folder: Path, paths: list[str]) -> None:
    """Read every safetensors header (and the index), so a damaged checkpoint is refused before it is stored."""
    if any(name.endswith(".safetensors") for name in paths):
        ModelWeights.open(folder)


def _skipped(files: list[str], paths: list[str]) -> list[str]:
    chosen = set(paths)
    return [name for name in files if name not in chosen]


# --- the Hugging Face hub -------------------------------------------------------------------


@dataclass(frozen=True)
class HubSettings:
    """Read when a download runs (not when huggingface_hub is imported), so the environment of the call counts."""

    endpoint: str
    offline: bool
    cache_dir: Path

    @classmethod
    def from_environment(cls) -> HubSettings:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE or any(
            (os.environ.get(name) or "").upper() in ("1", "ON", "YES", "TRUE") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )
        if os.environ.get("HF_HUB_CACHE"):
            cache = Path(os.environ["HF_HUB_CACHE"])
        elif os.environ.get("HF_HOME"):
            cache = Path(os.environ["HF_HOME"]) / "hub"
        else:
            cache = Path(constants.HF_HUB_CACHE)
        endpoint = (os.environ.get("HF_ENDPOINT") or HUB_DEFAULT_ENDPOINT).rstrip("/")
        return cls(endpoint=endpoint, offline=offline, cache_dir=cache.expanduser())


def _gather_hub_model(repo_id: str, revision: str, config: DownloadConfig) -> Gathered:
    """Fetch the configs first and check them, then only the selected files, from the commit the revision resolved to."""
    from huggingface_hub import snapshot_download

    hub = HubSettings.from_environment()
    label = f"hub model {repo_id}@{revision}"

    def fetch(revision: str, patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                cache_dir=hub.cache_dir,
                endpoint=hub.endpoint,
                local_files_only=hub.offline,
            )
        )

    with _hub_errors(repo_id, revision, hub):
        configs = _retrying(lambda: fetch(revision, list(CODE_CONFIGS)), label, hub)
        commit = configs.name  # the snapshot folder is named after the resolved commit
        files = _hub_files(repo_id, commit, hub, configs)
        where = f"{label} (commit {commit})"
        paths = select_model_files(files, lambda name: _read_json(configs / name, where), where, config)
        folder = _retrying(lambda: fetch(commit, paths), label, hub)
    missing = [name for name in paths if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{where}: the download is incomplete, missing {', '.join(missing)}; run it again online")
    _check_weights(folder, paths)

    def origin(path: str) -> str:
        return f"{hub.endpoint}/{repo_id}/resolve/{commit}/{path}"

    details = {"source": repo_id, "revision": revision, "commit": commit, "skipped": _skipped(files, paths)}
    return Gathered("model", folder, Listing.of_folder("models", folder, paths), origin, details)


def _hub_files(repo_id: str, commit: str, hub: HubSettings, snapshot: Path) -> list[str]:
    """Every file of the repo at `commit`, from the tree listing snapshot_download cached (no network)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return sorted(entry.path for entry in get_cached_repo_tree(repo_id, revision=commit, cache_dir=hub.cache_dir))
    except CachedRepoTreeNotFoundError:  # an offline cache written by an older huggingface_hub: what is there
        return _all_files(snapshot)


def _retrying(action: Callable[[], T], label: str, hub: HubSettings) -> T:
    """Run `action`, retrying network failures with exponential backoff; other errors pass through at once."""
    base = _retry_base_seconds()
    attempt = 1
    while True:
        try:
            return action()
        except Exception as exc:
            cause = _network_failure(exc)
            if cause is None:
                raise
            if attempt == RETRY_ATTEMPTS:
                raise HubUnavailableError(
                    f"could not reach the Hugging Face hub at {hub.endpoint} for {label} after {RETRY_ATTEMPTS} attempts "
                    f"({cause}); check the network and $HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache"
                ) from exc
        delay = base * 2 ** (attempt - 1)
        log.warning("attempt %d of %d for %s failed (%s); retrying in %.1fs", attempt, RETRY_ATTEMPTS, label, cause, delay)
        time.sleep(delay)
        attempt += 1


def _network_failure(exc: BaseException) -> str | None:
    """A short description if `exc` (or what caused it) is a connection failure, timeout or server error."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OfflineModeIsEnabled):
            return None
        if isinstance(seen, httpx2.TransportError):
            return f"{type(seen).__name__}: {seen}"
        if isinstance(seen, HfHubHTTPError):
            status = seen.response.status_code
            return f"HTTP {status} from the server" if status >= 500 or status == 429 else None
        seen = seen.__cause__ or seen.__context__
    return None


def _retry_base_seconds() -> float:
    raw = os.environ.get(RETRY_BASE_ENV)
    try:
        value = float(raw) if raw else RETRY_BASE_DEFAULT_S
    except ValueError:
        value = -1.0
    if value < 0:
        raise InputError(f"${RETRY_BASE_ENV} must be a number of seconds >= 0, not {raw!r}")
    return value


@contextmanager
def _hub_errors(repo_id: str, revision: str, hub: HubSettings) -> Iterator[None]:
    """huggingface_hub's exceptions as errors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RevisionNotFoundError as exc:
        raise InputError(
            f"revision {revision!r} of hub model {repo_id} does not exist at {hub.endpoint}; pass an existing branch, tag or commit"
        ) from exc
    except GatedRepoError as exc:
        raise InputError(
            f"hub model {repo_id} is gated at {hub.endpoint}: accept its terms on the hub and set $HF_TOKEN to an account that did"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise InputError(
            f"hub model {repo_id} was not found at {hub.endpoint} (no local folder has that name either); check the id, "
            "or set $HF_TOKEN if the repository is private"
        ) from exc
    except LocalEntryNotFoundError as exc:
        if hub.offline:
            raise InputError(
                f"offline mode (HF_HUB_OFFLINE) is on and hub model {repo_id}@{revision} is not (completely) in the local "
                f"cache {hub.cache_dir}; download it once online, or pass a local model folder"
            ) from exc
        raise InputError(f"hub model {repo_id}@{revision} could not be fetched from {hub.endpoint}: {_first_line(exc)}") from exc
    except HfHubHTTPError as exc:
        raise InputError(
            f"the hub at {hub.endpoint} refused hub model {repo_id}@{revision} (HTTP {exc.response.status_code}); "
            "check $HF_TOKEN and your access to the repository"
        ) from exc
    except HFValidationError as exc:
        raise InputError(f"hub model {repo_id}@{revision}: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --- data drops -----------------------------------------------------------------------------


def _gather_data(source: str, store: ArtifactStore, work: Path, progress: bool | None) -> Gathered:
    folder, origin = _fetch_folder(source, store, work, "data drop", progress)
    where = f"data drop {source}"
    files = _all_files(folder)
    if _is_saved_dataset(folder):
        records = _check_saved_dataset(folder, where)
        details = {"source": source, "format": "datasets", "records": records}
    else:
        if not files:
            raise InputError(f"{where} is empty: it has no {', '.join(DATA_SUFFIXES)} files and is not a datasets save_to_disk folder")
        unsupported = [name for name in files if not name.lower().endswith(DATA_SUFFIXES)]
        if unsupported:
            raise InputError(
                f"{where} has files of unsupported types: {_names(unsupported)}; a drop holds only "
                f"{', '.join(DATA_SUFFIXES)} files (or is one datasets save_to_disk folder)"
            )
        records = sum(_check_data_file(folder / name, f"{name} in {where}") for name in files)
        details = {"source": source, "format": "files", "records": records}
    if records == 0:
        raise InputError(f"{where} is empty: its {len(files)} file(s) hold no records")
    return Gathered("data", folder, Listing.of_folder("data", folder, files), origin, details)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _check_saved_dataset(folder: Path, where: str) -> int:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many kinds for a damaged folder
        raise InputError(f"{where} looks like a datasets save_to_disk folder but cannot be loaded: {exc}") from exc
    parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    return sum(part.num_rows for part in parts)


def _check_data_file(path: Path, where: str) -> int:
    """The number of records in one data file; raises InputError for anything a trainer could not read."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{where} is not a readable Parquet file: {exc}") from exc
    if suffix == ".json":
        text = _utf8(path.read_bytes(), where)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
        return len(document) if isinstance(document, (list, dict)) else 1
    records = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = _utf8(raw, f"{where}, line {number}")
            if not line.strip():
                continue
            if suffix == ".jsonl":
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where}, line {number} is not JSON ({exc.msg}); each line of a .jsonl file must be one JSON value") from exc
            records += 1
    return records


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        at = f" (line {line}, byte {exc.start})" if line > 1 or b"\n" in data else f" (byte {exc.start})"
        raise InputError(f"{where} is not UTF-8 text{at}: re-encode it as UTF-8") from exc


# --- sources shared by models and drops -----------------------------------------------------


def _fetch_folder(
    source: str, store: ArtifactStore, work: Path, what: str, progress: bool | None
) -> tuple[Path, Callable[[str], str]]:
    """A local folder with the source's files, and how to name each file's origin."""
    located = resolve_uri(source, store)
    if isinstance(located, Path):
        if not located.is_dir():
            raise InputError(f"{what} folder {located} does not exist (or is not a folder)")
        return located, lambda path: (located / path).absolute().as_uri()
    ref = as_tree(located)
    if ref is not None:
        folder = materialize_tree(ref, progress=progress)
    else:
        folder = _download_prefix(located, work, what)
    base = located.uri.rstrip("/")
    return folder, lambda path: f"{base}/{path}"


def _download_prefix(location: StoreLocation, work: Path, what: str) -> Path:
    prefix = f"{location.key}/" if location.key else ""
    keys = [key for key in location.store.list(prefix) if not any(part.startswith(".") for part in key.split("/"))]
    if not keys:
        raise InputError(f"{what} {location.uri} is empty: nothing is stored under it")
    for key in keys:
        location.store.download_file(key, work / key[len(prefix) :])
    return work


def _all_files(folder: Path) -> list[str]:
    """Relative '/'-separated paths of every file under `folder`, skipping names that start with '.'."""
    found = []
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        relative = Path(parent).relative_to(folder)
        found.extend((relative / name).as_posix() for name in files if not name.startswith("."))
    return sorted(found)


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path.name} of {where} is not readable JSON: {exc}") from exc


def _is_hub_source(source: str) -> bool:
    """`org/name` that is not an existing local folder."""
    return HUB_ID.fullmatch(source) is not None and not source.startswith((".", "~")) and not Path(source).exists()


def _work_root() -> Path:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# --- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--model", help="Hugging Face hub id (org/name), local model folder, or store URI of a stored model")
    parser.add_argument("--revision", help="hub branch, tag or commit of --model (default: main; the resolved commit is recorded)")
    parser.add_argument("--data", help="data drop: local folder or store URI of .txt/.jsonl/.json/.parquet files, or a datasets save_to_disk folder")
    parser.add_argument("--allow-pickle", action="store_true", help="also copy pickle weights (.bin, .pt, …); loading them can run code")
    parser.add_argument("--trust-remote-code", action="store_true", help="accept a model whose config needs custom code (auto_map); copies its *.py")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: when on a terminal)")


def config_from_args(args: argparse.Namespace) -> DownloadConfig:
    return DownloadConfig(
        model=args.model,
        data=args.data,
        revision=args.revision,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        run_id=args.run_id,
        force=args.force,
        progress=args.progress,
    )


def report(outcome: StageOutcome, store: ArtifactStore) -> str:
    summary = read_summary(store, outcome.manifest)
    parts = [describe(outcome, store)]
    for role, entry in summary.items():
        commit = f", commit {entry['commit']}" if entry.get("commit") else ""
        parts.append(f"{role} {entry['uri']} ({entry['files']} files, {entry['bytes']} bytes{commit})")
    return "; ".join(parts)


def cli(args: argparse.Namespace) -> str:
    store = store_from_args(args)
    if store is None:
        raise InputError("no artifact store: pass --store (a folder, file:///path or s3://bucket/prefix) or set $SPECTRUM_STORE")
    return report(run(config_from_args(args), store), store)


def main(argv: list[str] | None = None) -> int:
    from .cli_support import run_stage_main

    return run_stage_main("python -m stages.download", __doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
