"""Data-drop files: which formats a drop may hold, and reading them record by record.

download validates a drop with these readers before storing it; the trainers read with them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import InputError

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def count_saved_dataset_records(folder: Path, where: str) -> int:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many kinds for a damaged folder
        raise InputError(f"{where} looks like a datasets save_to_disk folder but cannot be loaded: {exc}") from exc
    parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    return sum(part.num_rows for part in parts)


def count_file_records(path: Path, where: str) -> int:
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
        text = decode_utf8(path.read_bytes(), where)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
        return len(document) if isinstance(document, (list, dict)) else 1
    records = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = decode_utf8(raw, f"{where}, line {number}")
            if not line.strip():
                continue
            if suffix == ".jsonl":
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{where}, line {number} is not JSON ({exc.msg}); each line of a .jsonl file must be one JSON value"
                    ) from exc
            records += 1
    return records


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        at = f" (line {line}, byte {exc.start})" if line > 1 or b"\n" in data else f" (byte {exc.start})"
        raise InputError(f"{where} is not UTF-8 text{at}: re-encode it as UTF-8") from exc
