"""snr_scan stage: stream every weight matrix of a model, compute its SNR, write a Parquet table.

Tensors are read one at a time; each finished row is appended to `<output>.partial.jsonl`
(fsync'd), so a killed scan resumes where it stopped. The table is published atomically at the
end and the partial file removed: a Parquet file at the output path is always complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from . import __version__
from .errors import CorruptWeightsError, InputError, SpectrumError
from .estimators import ESTIMATORS, SpectrumStats, estimate
from .local_files import ensure_writable, write_atomic
from .model_roles import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, roles_from_model_config
from .model_weights import FLOAT_DTYPES, ModelWeights, TensorInfo
from .model_source import as_tree, materialize, materialize_tree, read_listing, resolve_uri
from .naming import layer_index, module_name, module_type
from .snr_table import reference_json, rows_to_table, write_parquet
from .spectra import SVD_METHODS, NonFiniteMatrixError, resolve_device, singular_values
from .stage_run import StageOutcome, StageRun, add_store_arguments, describe, execute_stage, store_from_args
from .store import ArtifactStore, ObjectInfo, output_key, table_key
from .store.base import sha256_file

STAGE = "snr_scan"
EXPERTS = "experts"  # transformers fuses MoE experts into one [experts, rows, cols] parameter under an `experts` module
WORK_DIR_ENV = "SPECTRUM_WORK_DIR"
REFERENCE_JSON_NAME = "snr_results.json"


@dataclass
class ScanConfig:
    model_dir: str
    output: str | None  # local Parquet table; with a store it may be left out (a work folder is used)
    model_id: str | None = None
    estimator: str = "reference"
    svd_method: str = "gram"
    device: str = "cpu"
    include: list[str] = field(default_factory=list)  # regexes searched in module types
    exclude: list[str] = field(default_factory=list)
    reference_json: str | None = None
    overwrite: bool = False
    progress: bool | None = None  # None: show when stderr is a terminal
    workers: int | None = None  # matrices decomposed side by side; None: half the CPU cores (1 on 2 cores, 1 on a GPU)

    def resume_settings(self) -> dict:
        """The settings that determine the table: a partial scan must share them to be resumed,
        and they are the cache key's parameters in the store."""
        keys = ("estimator", "svd_method", "include", "exclude", "model_id")
        return {k: getattr(self, k) for k in keys}


@dataclass
class ScanResult:
    output: Path
    rows: list[dict]
    resumed: int
    seconds: float

    @property
    def scanned(self) -> int:
        return sum(1 for r in self.rows if r["scanned"])


def run(config: ScanConfig) -> ScanResult:
    """Scan into the local table `config.output` (resuming a partial scan there)."""
    started = time.perf_counter()
    _validate(config)
    if config.output is None:
        raise InputError("no output: pass --out PATH.parquet, or --store to publish the table as a run")
    output = Path(config.output)
    ensure_writable(output, config.overwrite)
    if config.reference_json:
        ensure_writable(Path(config.reference_json), config.overwrite)
    device = resolve_device(config.device)
    weights = ModelWeights.open(config.model_dir)
    model_id = config.model_id or _default_model_id(weights)
    config = replace(config, model_id=model_id)  # the caller's config is left as it was
    plan = _plan(weights, config)
    fingerprint = weights.fingerprint()

    partial = PartialScan(output.with_name(output.name + ".partial.jsonl"), fingerprint, config.resume_settings())
    done = partial.load()
    to_scan = [info for info, reason in plan if reason is None and info.name not in done]
    rows: dict[str, dict] = dict(done)
    with tqdm(
        total=sum(1 for _, reason in plan if reason is None),
        initial=len(done),
        unit="matrix",
        desc=f"SNR scan {model_id}",
        disable=(not config.progress) if config.progress is not None else None,
    ) as bar:
        for row in _scan_concurrently(weights, to_scan, config, device):
            partial.append(row)
            rows[row["tensor_name"]] = row
            bar.set_postfix_str(row["tensor_name"], refresh=False)
            bar.update(1)
    for info, reason in plan:
        if reason is not None:
            rows[info.name] = _skipped_row(info, reason, config)
    ordered = [rows[info.name] for info, _ in plan]
    # After the scan: building the model class imports transformers, and its memory should not
    # stack on top of the matrices in flight.
    roles = roles_from_model_config(weights.root, [t.name for t in weights.tensors])
    for row in ordered:
        row["model_id"] = model_id
        row["is_input_embedding"] = row["tensor_name"] in roles.names(INPUT_EMBEDDINGS)
        row["is_output_embedding"] = row["tensor_name"] in roles.names(OUTPUT_EMBEDDINGS)

    metadata = {
        "stage": STAGE,
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
    partial.remove()
    return ScanResult(output=output, rows=ordered, resumed=len(done), seconds=time.perf_counter() - started)


def run_in_store(
    config: ScanConfig, store: ArtifactStore, run_id: str | None = None, force: bool = False, work_dir: str | None = None
) -> tuple[StageOutcome, ScanResult | None]:
    """Scan and publish the table (and the reference JSON) as a run's snr_scan stage.

    The cache key covers the sha256 of every model file read and the table-determining
    settings: an unchanged model and settings reuse the committed run instead of rescanning.
    Without `config.output` the table is built in a work folder named by the cache key, so a
    killed scan resumes there, and the folder is removed once the table is in the store.
    """
    _validate(config)
    local_dir, stored = _locate_model(config.model_dir, store)
    weights = ModelWeights.open(local_dir)
    config = replace(config, model_dir=str(local_dir), model_id=config.model_id or _default_model_id(weights))
    inputs = [stored.get(name) or _file_ref(weights.root / name) for name in weights.files()]
    for path in (config.output, config.reference_json):
        if path:
            ensure_writable(Path(path), config.overwrite)
    results: list[ScanResult] = []

    def produce(run_dir: StageRun) -> list[ObjectInfo]:
        work = Path(work_dir or os.environ.get(WORK_DIR_ENV) or Path.home() / ".cache" / "spectrum" / "work") / run_dir.cache_key
        local = replace(config, output=config.output or str(work / "snr.parquet"), overwrite=config.overwrite or not config.output)
        result = run(local)
        results.append(result)
        outputs = [
            run_dir.write_table("snr", pq.read_table(result.output, use_threads=False)),
            run_dir.put_bytes(REFERENCE_JSON_NAME, reference_json(result.rows).encode()),
        ]
        if not config.output:
            shutil.rmtree(work, ignore_errors=True)
        return outputs

    outcome = execute_stage(store, STAGE, config.resume_settings(), inputs, produce, run_id=run_id, force=force)
    if outcome.cached:  # the local copies asked for come from the committed run
        earlier = outcome.manifest.run_id
        if config.output:
            write_atomic(Path(config.output), store.get_bytes(table_key("snr", STAGE, earlier)), overwrite=config.overwrite)
        if config.reference_json:
            data = store.get_bytes(output_key(earlier, STAGE, REFERENCE_JSON_NAME))
            write_atomic(Path(config.reference_json), data, overwrite=config.overwrite)
    return outcome, (results[0] if results else None)


def _locate_model(model: str, store: ArtifactStore | None) -> tuple[Path, dict[str, dict]]:
    """A local folder for `model`, and for a stored model (from `spectrum download`) the store
    reference of each of its files, so the manifest's inputs point at the store, not the cache."""
    located = resolve_uri(model, store)
    if isinstance(located, Path):
        return located, {}
    ref = as_tree(located)
    if ref is None:
        return materialize(model, store), {}  # raises the clear error for a location that is no model
    listing = read_listing(ref)
    stored = {f.path: {"uri": f"{ref.uri}/{f.path}", "sha256": f.sha256, "size": f.size} for f in listing.files}
    return materialize_tree(ref), stored


def _default_model_id(weights: ModelWeights) -> str:
    """The model folder's name (for a stored model, its content-addressed tree)."""
    return weights.root.resolve().name


def _file_ref(path: Path) -> dict:
    digest, size = sha256_file(path)
    return {"uri": path.resolve().as_uri(), "sha256": digest, "size": size}


def _validate(config: ScanConfig) -> None:
    if config.estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator {config.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if config.svd_method not in SVD_METHODS:
        raise InputError(f"unknown --svd-method {config.svd_method!r}; choose one of {', '.join(SVD_METHODS)}")
    if config.workers is not None and config.workers < 1:
        raise InputError(f"--workers must be at least 1, got {config.workers}")
    for option, patterns in (("--include", config.include), ("--exclude", config.exclude)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"{option} {pattern!r} is not a valid regular expression: {exc}") from exc


def _plan(weights: ModelWeights, config: ScanConfig) -> list[tuple[TensorInfo, str | None]]:
    """Every tensor with the reason it is not scanned (None: scan it)."""
    matrix_types = sorted({module_type(module_name(t.name)) for t in weights.tensors if _is_matrix_or_stack(t)})
    for option, patterns in (("--include", config.include), ("--exclude", config.exclude)):
        for pattern in patterns:
            if not any(re.search(pattern, t) for t in matrix_types):
                raise InputError(
                    f"{option} {pattern!r} matches no matrix type of this model; its types are: {', '.join(matrix_types)}"
                )
    plan = []
    for info in weights.tensors:
        kind = module_type(module_name(info.name))
        reason = None
        if not _is_matrix_or_stack(info):
            reason = f"{len(info.shape)}-D tensor (shape {list(info.shape)}): not a matrix (nor a stack of fused MoE experts)"
        elif info.dtype not in FLOAT_DTYPES:
            reason = f"dtype {info.dtype} is not a floating-point weight"
        elif 0 in info.shape:
            reason = "empty matrix"
        elif config.include and not any(re.search(p, kind) for p in config.include):
            reason = f"type {kind!r} not selected by --include"
        elif excluded := next((p for p in config.exclude if re.search(p, kind)), None):
            reason = f"type {kind!r} excluded by --exclude {excluded!r}"
        plan.append((info, reason))
    if all(reason is not None for _, reason in plan):
        raise InputError(f"nothing to scan in {weights.root}: no floating-point 2-D weight matrix is left after --include/--exclude")
    return plan


def _scan_concurrently(weights: ModelWeights, infos: list[TensorInfo], config: ScanConfig, device: torch.device) -> Iterator[dict]:
    """Rows in input order, with at most `workers` matrices in memory at once.

    Measured: on 2 cores two single-threaded workers were no faster than one worker with both
    threads and held more memory; on 16 cores 16 workers scanned 1.7x faster than one. The
    default, half the cores, gives one worker on small machines and several on large ones.
    """
    workers = config.workers or (1 if device.type == "cuda" else max(1, (os.cpu_count() or 1) // 2))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, previous_threads // workers))
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snr-scan") as pool:
            pending = deque()
            for info in infos:
                pending.append(pool.submit(_scan_matrix, weights, info, config, device))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(previous_threads)


def _is_matrix_or_stack(info: TensorInfo) -> bool:
    """A 2-D weight, or a 3-D stack of expert matrices; other 3-D tensors (conv kernels) are not matrices."""
    return len(info.shape) == 2 or (len(info.shape) == 3 and EXPERTS in info.name.split("."))


def _base_row(info: TensorInfo, config: ScanConfig) -> dict:
    name = module_name(info.name)
    return {
        "model_id": config.model_id,
        "tensor_name": info.name,
        "module_name": name,
        "module_type": module_type(name),
        "layer_index": layer_index(name),
        "shard": info.shard,
        "dtype": info.dtype,
        "shape": list(info.shape),
        "rows": info.shape[-2] if _is_matrix_or_stack(info) else None,
        "cols": info.shape[-1] if _is_matrix_or_stack(info) else None,
        "parameter_count": info.parameter_count,
        "code_version": __version__,
    }


def _skipped_row(info: TensorInfo, reason: str, config: ScanConfig) -> dict:
    return {**_base_row(info, config), "scanned": False, "skip_reason": reason}


def _scan_matrix(weights: ModelWeights, info: TensorInfo, config: ScanConfig, device: torch.device) -> dict:
    """One row for one tensor: a matrix, or a stack of them (fused MoE experts, [experts, rows, cols]).

    A stack is the unit a trainer freezes or trains, so it gets one row: each expert's matrix
    is scanned on its own and the row holds the mean snr over experts (and `slice_snr`, the
    per-expert values), summed counts and sums, and the largest singular value.
    """
    started = time.perf_counter()
    tensor = weights.read(info)
    digest = hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest()
    matrices = tensor.unbind(0) if tensor.ndim == 3 else (tensor,)
    per_matrix = [_matrix_stats(matrix, tensor, info, weights, config, device) for matrix in matrices]
    del tensor, matrices
    stats = per_matrix[0][0] if len(per_matrix) == 1 else _combine([s for s, _ in per_matrix])
    return {
        **_base_row(info, config),
        "tensor_sha256": digest,
        "scanned": True,
        "skip_reason": None,
        "estimator": config.estimator,
        "svd_method": config.svd_method,
        "device": device.type,
        **asdict(stats),
        "singular_value_count": sum(count for _, count in per_matrix),
        "slice_snr": [s.snr for s, _ in per_matrix] if len(info.shape) == 3 else None,
        "scan_seconds": time.perf_counter() - started,
    }


def _combine(stats: list[SpectrumStats]) -> SpectrumStats:
    count = len(stats)
    return SpectrumStats(
        sigma=sum(s.sigma for s in stats) / count,
        threshold=sum(s.threshold for s in stats) / count,
        signal_count=sum(s.signal_count for s in stats),
        signal_sum=sum(s.signal_sum for s in stats),
        noise_sum=sum(s.noise_sum for s in stats),
        max_singular_value=max(s.max_singular_value for s in stats),
        snr=sum(s.snr for s in stats) / count,
    )


def _matrix_stats(
    matrix: torch.Tensor, tensor: torch.Tensor, info: TensorInfo, weights: ModelWeights, config: ScanConfig, device: torch.device
) -> tuple[SpectrumStats, int]:
    """The estimator's statistics for one matrix of `tensor`, and its number of singular values."""
    try:
        values = singular_values(matrix, config.svd_method, device)
    except NonFiniteMatrixError as exc:
        _require_finite(tensor, info, weights)  # names the NaN/Inf values
        raise CorruptWeightsError(
            f"tensor {info.name!r} in {weights.root / info.shard} is too large in magnitude for the Gram route ({exc}); "
            "scan it with --svd-method svd"
        ) from exc
    except torch.linalg.LinAlgError as exc:
        raise SpectrumError(
            f"the singular values of {info.name!r} did not converge with --svd-method {config.svd_method} ({exc}); "
            "retry with the other --svd-method"
        ) from exc
    rows, cols = matrix.shape
    return estimate(config.estimator, values, rows, cols), int(values.size)


def _require_finite(tensor: torch.Tensor, info: TensorInfo, weights: ModelWeights) -> None:
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    nan_count = int(torch.isnan(tensor).sum())
    inf_count = int(bad.shape[0]) - nan_count
    first = [int(i) for i in bad[0]]
    raise CorruptWeightsError(
        f"tensor {info.name!r} in {weights.root / info.shard} has {nan_count} NaN and {inf_count} Inf value(s) "
        f"(first at index {first}); the checkpoint is damaged or was saved from a diverged run"
    )


class PartialScan:
    """Rows finished so far, one JSON line each after a header line naming what was scanned."""

    def __init__(self, path: Path, fingerprint: str, settings: dict):
        self.path = path
        self.header = {"fingerprint": fingerprint, "settings": settings}

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if header != self.header:
            self.path.unlink()  # made from other weights or settings: start over
            return {}
        rows: dict[str, dict] = {}
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # The last line of a killed scan may be cut short: keep the good rows only, so the
                # next append starts on a fresh line.
                self._rewrite(rows.values())
                break
            rows[row["tensor_name"]] = row
        return rows

    def _rewrite(self, rows) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in [self.header, *rows]))
        os.replace(temporary, self.path)

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        with self.path.open("a") as handle:
            if fresh:
                handle.write(json.dumps(self.header) + "\n")
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="Hugging Face model folder with *.safetensors weights (single file or sharded)")
    parser.add_argument("--out", "-o", help="local output Parquet SNR table (needed unless --store is given)")
    add_store_arguments(parser)
    parser.add_argument("--work-dir", help=f"with --store and no --out: where the table is built (default: ${WORK_DIR_ENV} or ~/.cache/spectrum/work)")
    parser.add_argument("--model-id", help="model id recorded in the table (default: the folder name)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="reference", help="SNR estimator (default: reference)")
    parser.add_argument(
        "--svd-method", choices=SVD_METHODS, default="gram", help="gram: float64 Gram eigenvalues (fast, default); svd: exact float64 SVD"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (GPU when present); default cpu")
    parser.add_argument("--include", action="append", default=[], metavar="REGEX", help="scan only module types matching REGEX (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="skip module types matching REGEX (repeatable)")
    parser.add_argument("--reference-json", metavar="PATH", help="also write the reference tool's snr_results JSON (flat layout)")
    parser.add_argument(
        "--workers", type=int, help="matrices decomposed side by side, sharing the CPU threads (default: half the cores; 1 on a GPU)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: when on a terminal)")


def config_from_args(args: argparse.Namespace) -> ScanConfig:
    return ScanConfig(
        model_dir=args.model_dir,
        output=args.out,
        model_id=args.model_id,
        estimator=args.estimator,
        svd_method=args.svd_method,
        device=args.device,
        include=args.include,
        exclude=args.exclude,
        reference_json=args.reference_json,
        overwrite=args.overwrite,
        progress=args.progress,
        workers=args.workers,
    )


def cli(args: argparse.Namespace) -> str:
    config = config_from_args(args)
    store = store_from_args(args)
    if store is None:
        return report(run(replace(config, model_dir=str(materialize(config.model_dir, None)))))
    outcome, result = run_in_store(config, store, run_id=args.run_id, force=args.force, work_dir=args.work_dir)
    lines = [report(result, destination=None if not config.output else str(result.output))] if result is not None else []
    return "\n".join([*lines, describe(outcome, store)])


def report(result: ScanResult, destination: str | None = "") -> str:
    skipped = len(result.rows) - result.scanned
    resumed = f", {result.resumed} resumed from a partial scan" if result.resumed else ""
    target = f" -> {destination or result.output}" if destination is not None else ""
    return f"scanned {result.scanned} matrices ({skipped} tensors not scanned{resumed}) in {result.seconds:.1f}s{target}"


def main(argv: list[str] | None = None) -> int:
    from .cli_support import run_stage_main

    return run_stage_main("python -m stages.snr_scan", __doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
