"""Data-drop files: which formats a drop may hold, and reading them record by record.

download validates a drop with these readers before storing it; the trainers read with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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


def iter_texts(folder: Path, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(where, text) for every document of a drop (a folder, or one data file), streamed file by file, in a stable order.

    A document is a non-empty line of a .txt file, or a record of a .jsonl/.json/.parquet file or
    of a datasets save_to_disk folder, whose `text_field` holds a string (a JSON string record is
    its own text). Anything else is an InputError naming the file and the line or row.
    """
    from ..core.files import all_files

    if is_saved_dataset(folder):
        yield from _saved_dataset_texts(folder, text_field)
        return
    for path in [folder] if folder.is_file() else [folder / name for name in all_files(folder)]:
        suffix = path.suffix.lower()
        if suffix not in DATA_SUFFIXES:
            raise InputError(f"{path} is not a data file ({', '.join(DATA_SUFFIXES)}); a drop holds only those")
        for where, record in iter_records(path, suffix):
            yield where, _text_of(record, text_field, where)


def iter_records(path: Path, suffix: str) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of one data file: a .txt line, a JSON value, a Parquet row."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}, row {row}", record
        return
    if suffix == ".json":
        document = json.loads(decode_utf8(path.read_bytes(), str(path)))
        for index, record in enumerate(document if isinstance(document, list) else [document], 1):
            yield f"{path}, record {index}", record
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = decode_utf8(raw, f"{path}, line {number}")
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            if suffix == ".txt":
                yield where, line.rstrip("\r\n")
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where} is not JSON ({exc.msg}); each line of a .jsonl file must be one JSON value") from exc


def _saved_dataset_texts(folder: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    parts = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, part in parts:
        if text_field not in part.column_names:
            raise InputError(f"{folder}{f' split {split}' if split else ''} has no {text_field!r} column; pass --text-field")
        for index, text in enumerate(part[text_field], 1):
            where = f"{folder}{f' split {split}' if split else ''}, row {index}"
            yield where, _text_of(text, text_field, where)


def _text_of(record: object, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return record[text_field]
    fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    raise InputError(f"{where} has no {text_field!r} text field (it has: {fields}); pass --text-field NAME")
