"""Data-drop files: which formats a drop may hold, and reading them record by record.

download validates a drop with these readers before storing it; the trainers read with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..base.documents import clip, kind_of, shown
from ..base.errors import InputError

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MAX_LINE_BYTES = 64 * 1024 * 1024  # one line of a .txt/.jsonl file: far more than any document, less than memory
MAX_JSON_BYTES = 256 * 1024 * 1024  # a whole .json file is parsed at once (several times its size in memory); use .jsonl beyond


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def count_saved_dataset_records(folder: Path, where: str) -> int:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many kinds for a damaged folder
        raise InputError(f"{where} looks like a datasets save_to_disk folder but cannot be loaded: {clip(str(exc))}") from None
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
            raise InputError(f"{where} is not a readable Parquet file: {clip(str(exc))}") from None
    if suffix == ".json":
        document = _load_json_file(path, where)
        return len(document) if isinstance(document, list) else 1  # as iter_records reads it: a list's items, else one record
    records = 0
    for number, line in _lines(path, where):
        if suffix == ".jsonl":
            _json_line(line, f"{where}, line {number}")
        records += 1
    return records


def _load_json_file(path: Path, where: str) -> object:
    """The JSON document of a .json data file, bounded in size; InputError with the line and column of a syntax error."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise InputError(
            f"{where} is more than {MAX_JSON_BYTES // 2**20} MiB of JSON, which is parsed whole; split it, or write it as .jsonl"
        )
    text = decode_utf8(data, where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; fix or remove the file") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to be a data file") from None


def _lines(path: Path, where: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a text file, each bounded in length and checked to be UTF-8."""
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise InputError(
                    f"{where}, line {number} is longer than {MAX_LINE_BYTES // 2**20} MiB; is it a data file? "
                    "Split the text into lines (or records) of a reasonable size"
                )
            line = decode_utf8(raw, f"{where}, line {number}")
            if line.strip():
                yield number, line


def _json_line(line: str, where: str) -> object:
    try:
        return json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{where} is not JSON ({exc.msg}, column {exc.colno}); each line of a .jsonl file must be one JSON value"
        ) from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to be a record") from None


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        at = f" (line {line}, byte {exc.start})" if line > 1 or b"\n" in data else f" (byte {exc.start})"
        raise InputError(f"{where} is not UTF-8 text{at}: re-encode it as UTF-8") from None


def iter_texts(folder: Path, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(where, text) for every document of a drop (a folder, or one data file), streamed file by file, in a stable order.

    A document is a non-empty line of a .txt file, or a record of a .jsonl/.json/.parquet file or
    of a datasets save_to_disk folder, whose `text_field` holds a string (a JSON string record is
    its own text). Anything else is an InputError naming the file and the line or row.
    """
    from ..base.files import all_files

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
        yield from _parquet_rows(path)
        return
    if suffix == ".json":
        document = _load_json_file(path, str(path))
        for index, record in enumerate(document if isinstance(document, list) else [document], 1):
            yield f"{path}, record {index}", record
        return
    for number, line in _lines(path, str(path)):
        where = f"{path}, line {number}"
        yield where, (line.rstrip("\r\n") if suffix == ".txt" else _json_line(line, where))


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}, row {row}", record
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file (after row {row}): {clip(str(exc))}") from None


def _saved_dataset_texts(folder: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many kinds for a damaged folder
        raise InputError(f"{folder} looks like a datasets save_to_disk folder but cannot be loaded: {clip(str(exc))}") from None
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
    if not isinstance(record, dict):
        raise InputError(f"{where} is {kind_of(record)} ({shown(record)}), not text or an object with a {text_field!r} field")
    if text_field not in record:
        fields = ", ".join(clip(str(name), 60) for name in list(record)[:20]) + (" …" if len(record) > 20 else "")
        raise InputError(f"{where} has no {text_field!r} text field (it has: {fields or 'no fields'}); pass --text-field NAME")
    value = record[text_field]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {text_field!r} is {kind_of(value)} ({shown(value)}), not text; make it a string")
    return value
