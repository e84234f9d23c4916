"""The SNR table: one row per tensor, Parquet on disk, and the reference tool's JSON layouts."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..base.errors import InputError
from ..base.files import write_atomic
from ..base.parquet import read_parquet

SNR_SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("tensor_name", pa.string()),
        ("module_name", pa.string()),
        ("module_type", pa.string()),
        ("layer_index", pa.int64()),
        ("is_input_embedding", pa.bool_()),
        ("is_output_embedding", pa.bool_()),
        ("shard", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("rows", pa.int64()),
        ("cols", pa.int64()),
        ("parameter_count", pa.int64()),
        ("tensor_sha256", pa.string()),
        ("scanned", pa.bool_()),
        ("skip_reason", pa.string()),
        ("estimator", pa.string()),
        ("svd_method", pa.string()),
        ("device", pa.string()),
        ("sigma", pa.float64()),
        ("threshold", pa.float64()),
        ("signal_count", pa.int64()),
        ("singular_value_count", pa.int64()),
        ("max_singular_value", pa.float64()),
        ("signal_sum", pa.float64()),
        ("noise_sum", pa.float64()),
        ("snr", pa.float64()),
        ("slice_snr", pa.list_(pa.float64())),  # per expert, for a stack of matrices (fused MoE experts)
        ("scan_seconds", pa.float64()),
        ("code_version", pa.string()),
    ]
)
METADATA_PREFIX = "spectrum."


def rows_to_table(rows: list[dict], metadata: dict[str, str]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=SNR_SCHEMA)
    encoded = {f"{METADATA_PREFIX}{k}".encode(): str(v).encode() for k, v in metadata.items()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **encoded})


def write_parquet(table: pa.Table, path: Path, overwrite: bool = False) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_atomic(path, buffer.getvalue(), overwrite=overwrite)


def read_table_metadata(table: pa.Table) -> dict[str, str]:
    raw = table.schema.metadata or {}
    return {k.decode()[len(METADATA_PREFIX) :]: v.decode() for k, v in raw.items() if k.decode().startswith(METADATA_PREFIX)}


def read_snr_table(source: Path | bytes, where: str | None = None) -> pa.Table:
    """Read an SNR table from a local file or from bytes fetched from the store (`where` names them)."""
    where = where or str(source)
    try:
        table = read_parquet(source)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{where} is not a readable Parquet SNR table: {exc}") from exc
    missing = [name for name in ("tensor_name", "module_type", "snr", "scanned") if name not in table.column_names]
    if missing:
        raise InputError(f"{where} is not an SNR table from `spectrum scan`: missing column(s) {', '.join(missing)}")
    return table


def reference_json(rows: list[dict]) -> str:
    """The reference tool's flat layout, {module: {"snr": x, "type": t}}, for scanned matrices."""
    flat = {r["module_name"]: {"snr": r["snr"], "type": r["module_type"]} for r in rows if r["scanned"]}
    return json.dumps(flat, indent=4)


@dataclass(frozen=True)
class ReferenceEntry:
    name: str  # module name, as the reference tool writes it
    module_type: str
    snr: float


def load_reference_json(path: Path) -> list[ReferenceEntry]:
    """Read either reference layout (flat or sorted), accepting the `Infinity`/`NaN` tokens."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"reference SNR file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise InputError(f"reference SNR file {path} is a folder; pass the snr_results JSON file") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a JSON text file (not UTF-8 at byte {exc.start}); pass a reference snr_results JSON") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path} holds no SNR entries; expected {{name: {{'snr': x, 'type': t}}}} or {{type: {{name: snr}}}}")
    entries: list[ReferenceEntry] = []
    for key, value in data.items():
        if isinstance(value, dict) and "snr" in value and "type" in value and not isinstance(value["snr"], dict):
            entries.append(ReferenceEntry(key, str(value["type"]), _as_float(value["snr"], path, key)))
        elif isinstance(value, dict):
            entries.extend(ReferenceEntry(name, key, _as_float(snr, path, name)) for name, snr in value.items())
        else:
            raise InputError(f"{path}: entry {key!r} is neither {{'snr', 'type'}} (flat layout) nor {{name: snr}} (sorted layout)")
    return entries


def _as_float(value: object, path: Path, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if value is None:
            return math.nan
        raise InputError(f"{path}: the snr of {name!r} is {value!r}, not a number")
    return float(value)
