"""Reading a data drop: every malformed file is one `error:` line naming the file, the line or record, and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.base.errors import InputError
from stages.data import drops
from stages.data.drops import count_file_records, iter_records, iter_texts


def drop_of(tmp_path: Path, name: str, data: bytes) -> Path:
    folder = tmp_path / f"drop-{name}"
    folder.mkdir()
    (folder / name).write_bytes(data)
    return folder


def texts(folder: Path) -> list[str]:
    return [text for _, text in iter_texts(folder)]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        # a number where the text belongs: the field is there, it is not text (it used to read "has no 'text' text field (it has: text)")
        ("n.jsonl", b'{"text": "fine"}\n{"text": 12345}\n', r"n\.jsonl, line 2: field 'text' is a number \(12345\), not text"),
        ("null.jsonl", b'{"text": null}\n', r"null\.jsonl, line 1: field 'text' is null \(None\), not text"),
        ("list.json", b'[{"text": ["a", "b"]}]', r"list\.json, record 1: field 'text' is a list \(\['a', 'b'\]\), not text"),
        ("missing.jsonl", b'{"body": "x"}\n', r"missing\.jsonl, line 1 has no 'text' text field \(it has: body\)"),
        ("top.json", b"12345", r"top\.json, record 1 is a number \(12345\), not text or an object with a 'text' field"),
        ("items.jsonl", b"[1, 2]\n", r"items\.jsonl, line 1 is a list \(\[1, 2\]\), not text or an object"),
        ("binary.parquet", None, r"binary\.parquet, row 1: field 'text' is binary data"),
    ],
)
def test_a_record_without_text_names_the_file_line_and_what_it_holds(tmp_path, name, data, message):
    if data is None:
        folder = tmp_path / "drop-parquet"
        folder.mkdir()
        pq.write_table(pa.table({"text": pa.array([b"\x00\x01"], pa.binary())}), folder / name)
    else:
        folder = drop_of(tmp_path, name, data)
    with pytest.raises(InputError, match=message):
        texts(folder)


def test_malformed_json_in_a_drop_is_an_error_with_its_position_not_a_traceback(tmp_path):
    folder = drop_of(tmp_path, "broken.json", b'[{"text": "a"},\n {"text": "b"\n')
    with pytest.raises(InputError, match=r"broken\.json is not valid JSON: Expecting ',' delimiter at line 3, column 1"):
        texts(folder)  # json.JSONDecodeError escaped as a traceback before


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("latin.json", b'[{"text": "caf\xe9"}]', r"latin\.json is not UTF-8 text \(byte 14\)"),
        ("latin.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"latin\.jsonl, line 2 is not UTF-8 text"),
        ("latin.txt", b"fine\ncaf\xe9\n", r"latin\.txt, line 2 is not UTF-8 text"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', r"bad\.jsonl, line 2 is not JSON \(Expecting value, column 10\)"),
        ("deep.jsonl", b"[" * 100_000 + b"\n", r"deep\.jsonl, line 1 is nested too deeply"),
        ("deep.json", b"[" * 100_000, r"deep\.json is nested too deeply"),
        ("bad.parquet", b"PAR1 not parquet at all PAR1", r"bad\.parquet is not a readable Parquet file"),
    ],
)
def test_unreadable_files_are_clear_errors_for_the_trainers_too(tmp_path, name, data, message):
    folder = drop_of(tmp_path, name, data)
    with pytest.raises(InputError, match=message):
        texts(folder)
    with pytest.raises(InputError, match=message.split(" ")[0]):
        count_file_records(folder / name, name)


def test_huge_lines_and_json_files_are_refused_before_they_are_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(drops, "MAX_LINE_BYTES", 64)
    monkeypatch.setattr(drops, "MAX_JSON_BYTES", 64)
    long_line = drop_of(tmp_path, "long.jsonl", b'{"text": "short"}\n{"text": "' + b"x" * 200 + b'"}\n')
    with pytest.raises(InputError, match=r"long\.jsonl, line 2 is longer than 0 MiB"):
        texts(long_line)
    with pytest.raises(InputError, match=r"long\.jsonl, line 2 is longer"):
        count_file_records(long_line / "long.jsonl", "long.jsonl")
    exact = drop_of(tmp_path, "exact.txt", b"y" * 63 + b"\n" + b"z" * 10)  # a line of exactly the bound, then an unterminated one
    assert texts(exact) == ["y" * 63, "z" * 10]
    big = drop_of(tmp_path, "big.json", json.dumps([{"text": "x" * 100}]).encode())
    with pytest.raises(InputError, match=r"big\.json is more than 0 MiB of JSON, which is parsed whole; .* \.jsonl"):
        texts(big)


def test_a_json_object_is_one_record_when_counted_and_when_read(tmp_path):
    folder = drop_of(tmp_path, "one.json", b'{"text": "a document", "source": "x"}')
    assert count_file_records(folder / "one.json", "one.json") == 1 == len(list(iter_records(folder / "one.json", ".json")))


def test_a_damaged_saved_dataset_is_a_clear_error(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    (folder / "dataset_info.json").write_text("not json")
    with pytest.raises(InputError, match=r"saved looks like a datasets save_to_disk folder but cannot be loaded"):
        texts(folder)
