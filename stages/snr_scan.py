"""snr_scan stage: stream every weight matrix of a model, compute its SNR, write a Parquet table.

Tensors are read one at a time; each finished row is appended to `<output>.partial.jsonl`
(fsync'd), so a killed scan resumes where it stopped. The table is published atomically at the
end and the partial file removed: a Parquet file at the output path is always complete.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .base.contracts import DOWNLOAD, REFERENCE_JSON_FILE, SNR_SCAN, SNR_TABLE
from .base.errors import InputError
from .base.files import ensure_distinct, ensure_writable, write_atomic
from .base.parquet import read_parquet
from .base.patterns import compile_pattern
from .core.cli import stage_main
from .core.execution import Produced, StageRun, execute_stage
from .core.stage import From, Stage, StageConfig, StageContext, StageResult, option
from .scan.engine import ScanSettings, plan_scan, scan_concurrently, skipped_row
from .scan.estimators import ESTIMATORS
from .scan.journal import ScanJournal
from .scan.spectra import SVD_METHODS, resolve_device
from .scan.table import reference_json, rows_to_table, write_parquet
from .store import ArtifactStore, read_output, read_table_output
from .store.trees import file_ref, local_copy, materialize
from .weights.checkpoint import ModelWeights
from .weights.roles import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, roles_from_model_config


@dataclass
class ScanConfig(StageConfig):
    model_dir: str = option(
        positional=True,
        wired=From(DOWNLOAD, "model"),
        help="model: a Hugging Face folder with *.safetensors weights (single file or sharded), or a store URI",
    )
    output: str | None = option(
        "--out", "-o", default=None, pipeline=False, help="local output Parquet SNR table (needed unless --store is given)"
    )
    model_id: str | None = option(default=None, cache=True, help="model id recorded in the table (default: the folder name)")
    estimator: str = option(default="reference", cache=True, choices=ESTIMATORS, help="SNR estimator (default: reference)")
    svd_method: str = option(
        default="gram",
        cache=True,
        choices=SVD_METHODS,
        help="gram: float64 Gram eigenvalues (fast, default); svd: exact float64 SVD",
    )
    device: str = option(default="cpu", help="cpu, cuda, cuda:N, or auto (GPU when present); default cpu")
    include: list[str] = option(
        default_factory=list, cache=True, metavar="REGEX", help="scan only module types matching REGEX (repeatable)"
    )
    exclude: list[str] = option(default_factory=list, cache=True, metavar="REGEX", help="skip module types matching REGEX (repeatable)")
    reference_json: str | None = option(
        metavar="PATH", default=None, pipeline=False, help="also write the reference tool's snr_results JSON (flat layout)"
    )
    workers: int | None = option(
        default=None, help="matrices decomposed side by side, sharing the CPU threads (default: half the cores, at least 2; 1 on a GPU)"
    )
    overwrite: bool = option(default=False, help="replace existing output files")

    def settings(self) -> ScanSettings:
        """The options the scan engine reads."""
        return ScanSettings(self.model_id, self.estimator, self.svd_method, tuple(self.include), tuple(self.exclude), self.workers)


@dataclass
class ScanResult:
    output: Path
    rows: list[dict]
    resumed: int
    seconds: float

    @property
    def scanned(self) -> int:
        return sum(1 for r in self.rows if r["scanned"])


def run(config: ScanConfig, context: StageContext) -> StageResult[ScanResult]:
    """Scan to the local `config.output`, or, with a store, publish the table as a run's snr_scan stage.

    In the store the cache key covers the sha256 of every model file read and the
    table-determining settings: an unchanged model and settings reuse the committed run instead
    of rescanning. Without `config.output` the table is built in a work folder named by the
    cache key, so a killed scan resumes there, and the folder is removed once the table is stored.
    """
    _validate(config)
    if context.store is None:
        if config.output is None:
            raise InputError("no output: pass --out PATH.parquet, or --store to publish the table as a run")
        result = scan_to_table(replace(config, model_dir=str(materialize(config.model_dir, None))), context.progress)
        return StageResult(SNR_SCAN, (report(result, destination=str(result.output)),), detail=result)
    return _run_in_store(config, context, context.store)


def _run_in_store(config: ScanConfig, context: StageContext, store: ArtifactStore) -> StageResult[ScanResult]:
    local_dir, stored = local_copy(config.model_dir, store)
    weights = ModelWeights.open(local_dir)
    config = replace(config, model_dir=str(local_dir), model_id=config.model_id or _default_model_id(weights))
    inputs = [stored.get(name) or file_ref(weights.root / name) for name in weights.files()]

    def produce(run_dir: StageRun) -> Produced[ScanResult]:
        # Built in a work folder named by the cache key, whose journal is kept until the table is
        # stored: a scan killed (or a publish that failed) resumes there.
        work = context.work_root() / run_dir.cache_key
        local = replace(config, output=str(work / "snr.parquet"), reference_json=None, overwrite=True)
        result = scan_to_table(local, context.progress, keep_journal=True)
        outputs = [
            run_dir.write_table(SNR_TABLE, read_parquet(result.output)),
            run_dir.put_bytes(REFERENCE_JSON_FILE, reference_json(result.rows).encode()),
        ]
        shutil.rmtree(work, ignore_errors=True)
        return Produced(outputs, result)

    outcome = execute_stage(SNR_SCAN, context, config.cache_parameters(), inputs, produce)
    # Local copies asked for come from the committed run (this one or a reused one), verified.
    manifest = outcome.manifest
    if config.output:
        write_atomic(Path(config.output), read_table_output(store, manifest, SNR_TABLE)[0], overwrite=config.overwrite)
    if config.reference_json:
        write_atomic(Path(config.reference_json), read_output(store, manifest, REFERENCE_JSON_FILE)[0], overwrite=config.overwrite)
    result = outcome.detail
    lines = [report(result, destination=config.output)] if result is not None else []
    return StageResult(SNR_SCAN, (*lines, outcome.describe(store)), outcome.manifest, outcome.cached, detail=result)


def scan_to_table(config: ScanConfig, progress: bool | None = None, keep_journal: bool = False) -> ScanResult:
    """Scan into the local table `config.output` (resuming a partial scan there).

    The journal of finished rows is removed once the table is written, unless `keep_journal`
    (the caller removes it once the table is safely stored elsewhere). `run` has validated the
    config and checked that the outputs can be written.
    """
    started = time.perf_counter()
    output = Path(config.output)
    device = resolve_device(config.device)
    weights = ModelWeights.open(config.model_dir)
    model_id = config.model_id or _default_model_id(weights)
    config = replace(config, model_id=model_id)  # the caller's config is left as it was
    settings = config.settings()
    plan = plan_scan(weights, settings)
    fingerprint = weights.fingerprint()

    partial = ScanJournal(output.with_name(output.name + ".partial.jsonl"), fingerprint, config.cache_parameters())
    done = partial.load()
    to_scan = [info for info, reason in plan if reason is None and info.name not in done]
    rows: dict[str, dict] = dict(done)
    # The roles come from the model's class, built by transformers (2-3 s of imports) on a model's first
    # scan, then from the cache (stages.weights.roles): resolved in a thread while the matrices are
    # decomposed, whose LAPACK calls release the GIL. Building it swaps
    # process-wide state for a moment (warnings filters; transformers' no_init_weights makes
    # torch.nn.init a no-op): the scan's workers use neither, but a caller must not build models in
    # another thread of this process during a scan.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snr-roles") as roles_pool:
        roles_future = roles_pool.submit(roles_from_model_config, weights.root, [t.name for t in weights.tensors])
        with tqdm(
            total=sum(1 for _, reason in plan if reason is None),
            initial=len(done),
            unit="matrix",
            desc=f"SNR scan {model_id}",
            disable=(not progress) if progress is not None else None,
        ) as bar:
            for row in scan_concurrently(weights, to_scan, settings, device):
                partial.append(row)
                rows[row["tensor_name"]] = row
                bar.set_postfix_str(row["tensor_name"], refresh=False)
                bar.update(1)
        roles = roles_future.result()
    for info, reason in plan:
        if reason is not None:
            rows[info.name] = skipped_row(info, reason, settings)
    ordered = [rows[info.name] for info, _ in plan]
    for row in ordered:
        row["model_id"] = model_id
        row["is_input_embedding"] = row["tensor_name"] in roles.names(INPUT_EMBEDDINGS)
        row["is_output_embedding"] = row["tensor_name"] in roles.names(OUTPUT_EMBEDDINGS)

    metadata = {
        "stage": SNR_SCAN,
        "model_id": model_id,
        "model_dir": str(weights.root.resolve()),
        "model_fingerprint": fingerprint,
        "model_parameter_count": weights.parameter_count,
        "estimator": config.estimator,
        "svd_method": config.svd_method,
        "include": json.dumps(config.include),
        "exclude": json.dumps(config.exclude),
        "roles_source": roles.source,
        "code_version": __version__,
    }
    write_parquet(rows_to_table(ordered, metadata), output, overwrite=config.overwrite)
    if config.reference_json:
        write_atomic(Path(config.reference_json), reference_json(ordered).encode(), overwrite=config.overwrite)
    if not keep_journal:
        partial.remove()
    return ScanResult(output=output, rows=ordered, resumed=len(done), seconds=time.perf_counter() - started)


def _default_model_id(weights: ModelWeights) -> str:
    """The model folder's name (for a stored model, its content-addressed tree)."""
    return weights.root.resolve().name


def _validate(config: ScanConfig) -> None:
    if config.estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator {config.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if config.svd_method not in SVD_METHODS:
        raise InputError(f"unknown --svd-method {config.svd_method!r}; choose one of {', '.join(SVD_METHODS)}")
    resolve_device(config.device)  # an unknown or missing device is an error before any work
    ensure_distinct({"--out": config.output, "--reference-json": config.reference_json})
    for path in (config.output, config.reference_json):
        if path:
            ensure_writable(Path(path), config.overwrite)
    if config.workers is not None and config.workers < 1:
        raise InputError(f"--workers must be at least 1, got {config.workers}")
    for flag, patterns in (("--include", config.include), ("--exclude", config.exclude)):
        for pattern in patterns:
            compile_pattern(pattern, flag)  # invalid, or able to backtrack without bound: an error before any work


def report(result: ScanResult, destination: str | None = None) -> str:
    skipped = len(result.rows) - result.scanned
    resumed = f", {result.resumed} resumed from a partial scan" if result.resumed else ""
    target = f" -> {destination}" if destination else ""
    return f"scanned {result.scanned} matrices ({skipped} tensors not scanned{resumed}) in {result.seconds:.1f}s{target}"


STAGE = Stage(
    name=SNR_SCAN,
    command="scan",
    config=ScanConfig,
    run=run,
    description=__doc__,
    check=_validate,
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
