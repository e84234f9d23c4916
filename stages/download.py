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

Each source lands at `<kind>/sha256-…/` (see stages.store.trees); the manifest lists every
source file and every stored object with its sha256, and `download.json` in the run says where
the model and the drop are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .base.contracts import DOWNLOAD, DOWNLOAD_SUMMARY_FILE
from .base.errors import InputError
from .base.files import all_files, check_links, link_roots
from .core.cli import stage_main
from .core.execution import StageRun, execute_stage, require_store_in
from .core.stage import PIPELINE_INPUTS, From, Stage, StageConfig, StageContext, StageResult, option
from .data.drops import DATA_SUFFIXES, count_file_records, count_saved_dataset_records, is_saved_dataset
from .store import ArtifactStore, Manifest, ObjectInfo, read_output
from .store.trees import Listing, StoreLocation, as_tree, materialize_tree, publish_tree, resolve_uri
from .weights.checkpoint import INDEX_FILE, PICKLE_SUFFIXES, ModelWeights
from .weights.hub import HubSettings, fetch_snapshot, hub_errors, is_hub_id, repo_files, retrying

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


@dataclass
class DownloadConfig(StageConfig):
    model: str | None = option(
        default=None,
        cache=True,
        wired=From(PIPELINE_INPUTS, "model"),
        help="Hugging Face hub id (org/name), local model folder, or store URI of a stored model",
    )
    revision: str | None = option(
        default=None,
        cache=True,
        wired=From(PIPELINE_INPUTS, "revision"),
        help="hub branch, tag or commit of --model (default: main; the resolved commit is recorded)",
    )
    data: str | None = option(
        default=None,
        cache=True,
        wired=From(PIPELINE_INPUTS, "data"),
        help="data drop: local folder or store URI of .txt/.jsonl/.json/.parquet files, or a datasets save_to_disk folder",
    )
    allow_pickle: bool = option(default=False, cache=True, help="also copy pickle weights (.bin, .pt, …); loading them can run code")
    trust_remote_code: bool = option(
        default=False, cache=True, help="accept a model whose config needs custom code (auto_map); copies its *.py"
    )


@dataclass(frozen=True)
class Gathered:
    """Source files available in a local folder, checked and hashed, ready to store."""

    role: str  # "model" or "data"
    folder: Path
    listing: Listing
    origin: Callable[[str], str]  # relative path -> the URI recorded as the manifest input
    details: dict[str, Any]  # recorded in download.json


def run(config: DownloadConfig, context: StageContext) -> StageResult:
    store = require_store_in(context, DOWNLOAD)
    if not config.model and not config.data:
        raise InputError("nothing to download: pass --model and/or --data")
    if config.revision is not None and not (config.model and is_hub_id(config.model)):
        raise InputError(f"--revision {config.revision!r} applies only to a Hugging Face hub model id (org/name)")
    with context.scratch(DOWNLOAD) as work:
        gathered = []
        if config.model:
            gathered.append(_gather_model(config.model, config, context, work / "model"))
        if config.data:
            gathered.append(_gather_data(config.data, context, work / "data"))
        model_commit = gathered[0].details.get("commit") if config.model else None
        parameters = {**config.cache_parameters(), "model_commit": model_commit}
        inputs = [{"uri": g.origin(f.path), "sha256": f.sha256, "size": f.size, "role": g.role} for g in gathered for f in g.listing.files]

        def produce(stage: StageRun) -> list[ObjectInfo]:
            outputs: list[ObjectInfo] = []
            summary: dict[str, Any] = {}
            for g in gathered:
                stored = publish_tree(stage.store, g.listing, g.folder, progress=context.progress)
                outputs.extend(stored.objects)
                summary[g.role] = {
                    "uri": stored.uri,
                    "tree": stored.tree,
                    "listing": stored.objects[-1].uri,
                    "files": len(g.listing.files),
                    "bytes": g.listing.size,
                    **g.details,
                }
            outputs.append(stage.put_bytes(DOWNLOAD_SUMMARY_FILE, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()))
            return outputs

        outcome = execute_stage(DOWNLOAD, context, parameters, inputs, produce)
    summary = read_summary(store, outcome.manifest)
    lines = [outcome.describe(store)]
    for role, entry in summary.items():
        commit = f", commit {entry['commit']}" if entry.get("commit") else ""
        lines.append(f"{role} {entry['uri']} ({entry['files']} files, {entry['bytes']} bytes{commit})")
    return StageResult(DOWNLOAD, ("; ".join(lines),), outcome.manifest, outcome.cached, detail=summary)


def read_summary(store: ArtifactStore, manifest: Manifest) -> dict[str, Any]:
    """download.json of a committed download: {"model": {"uri", "tree", "commit", …}, "data": {…}}."""
    data, _ = read_output(store, manifest, DOWNLOAD_SUMMARY_FILE)  # the version the manifest recorded, sha256 checked
    return json.loads(data)


def stored_uri(store: ArtifactStore, manifest: Manifest, kind: str) -> str:
    """The store URI of the model or data a download committed (its `model` and `data` outputs)."""
    return read_summary(store, manifest)[kind]["uri"]


# --- models ---------------------------------------------------------------------------------


def _gather_model(source: str, config: DownloadConfig, context: StageContext, work: Path) -> Gathered:
    if is_hub_id(source):
        return _gather_hub_model(source, config.revision or "main", config)
    folder, origin = _fetch_folder(source, context, work, "model")
    where = f"model {source}"
    files = all_files(folder)
    paths = select_model_files(files, lambda name: _read_json(folder / name, where), where, config)
    _check_weights(folder, paths)
    details = {"source": source, "skipped": _skipped(files, paths)}
    return Gathered("model", folder, Listing.of_folder("models", folder, paths), origin, details)


def select_model_files(files: list[str], read_json: Callable[[str], Any], where: str, config: DownloadConfig) -> list[str]:
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


def _gather_hub_model(repo_id: str, revision: str, config: DownloadConfig) -> Gathered:
    """Fetch the configs first and check them, then only the selected files, from the commit the revision resolved to."""
    hub = HubSettings.from_environment()
    label = f"hub model {repo_id}@{revision}"
    with hub_errors(repo_id, revision, hub):
        configs = retrying(lambda: fetch_snapshot(repo_id, revision, list(CODE_CONFIGS), hub), label, hub)
        commit = configs.name  # the snapshot folder is named after the resolved commit
        files = repo_files(repo_id, commit, hub, configs)
        where = f"{label} (commit {commit})"
        paths = select_model_files(files, lambda name: _read_json(configs / name, where), where, config)
        folder = retrying(lambda: fetch_snapshot(repo_id, commit, paths, hub), label, hub)
    _check_links(folder, where)  # its files are links into the cache repository's blobs/, and must stay there
    missing = [name for name in paths if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{where}: the download is incomplete, missing {', '.join(missing)}; run it again online")
    _check_weights(folder, paths)

    def origin(path: str) -> str:
        return f"{hub.endpoint}/{repo_id}/resolve/{commit}/{path}"

    details = {"source": repo_id, "revision": revision, "commit": commit, "skipped": _skipped(files, paths)}
    return Gathered("model", folder, Listing.of_folder("models", folder, paths), origin, details)


# --- data drops -----------------------------------------------------------------------------


def _gather_data(source: str, context: StageContext, work: Path) -> Gathered:
    folder, origin = _fetch_folder(source, context, work, "data drop")
    where = f"data drop {source}"
    files = all_files(folder)
    if is_saved_dataset(folder):
        records = count_saved_dataset_records(folder, where)
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
        records = sum(count_file_records(folder / name, f"{name} in {where}") for name in files)
        details = {"source": source, "format": "files", "records": records}
    if records == 0:
        raise InputError(f"{where} is empty: its {len(files)} file(s) hold no records")
    return Gathered("data", folder, Listing.of_folder("data", folder, files), origin, details)


# --- sources shared by models and drops -----------------------------------------------------


def _fetch_folder(source: str, context: StageContext, work: Path, what: str) -> tuple[Path, Callable[[str], str]]:
    """A local folder with the source's files, and how to name each file's origin."""
    located = resolve_uri(source, context.store)
    if isinstance(located, Path):
        if not located.is_dir():
            raise InputError(f"{what} folder {located} does not exist (or is not a folder)")
        _check_links(located, f"{what} {source}")
        return located, lambda path: (located / path).absolute().as_uri()
    ref = as_tree(located)
    folder = materialize_tree(ref, progress=context.progress) if ref is not None else _download_prefix(located, work, what)
    base = located.uri.rstrip("/")
    return folder, lambda path: f"{base}/{path}"


def _check_links(folder: Path, where: str) -> None:
    """Refuse a source folder holding a symbolic link (to a file or a folder) that leads out of it.

    Whatever a link points to would be copied into the shared store as if it were part of the
    source. Links inside the folder are fine; a Hugging Face hub-cache snapshot may link into
    its own cache repository (stages.base.files.link_roots).
    """
    check_links(
        folder,
        link_roots(folder),
        where,
        "links out of a source folder are refused, so that files from elsewhere on this machine never reach the "
        "shared store: copy the file into the folder (or remove the link) and run the download again",
    )


def _download_prefix(location: StoreLocation, work: Path, what: str) -> Path:
    prefix = f"{location.key}/" if location.key else ""
    keys = [key for key in location.store.list(prefix) if not any(part.startswith(".") for part in key.split("/"))]
    if not keys:
        raise InputError(f"{what} {location.uri} is empty: nothing is stored under it")
    for key in keys:
        location.store.download_file(key, work / key[len(prefix) :])
    return work


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path.name} of {where} is not readable JSON: {exc}") from exc


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


STAGE = Stage(
    name=DOWNLOAD,
    command="download",
    config=DownloadConfig,
    run=run,
    description=__doc__,
    outputs={"model": lambda store, manifest: stored_uri(store, manifest, "model"), "data": lambda store, m: stored_uri(store, m, "data")},
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
