"""The download stage's data drops: every file kind, saved datasets, store prefixes, and the drops it refuses."""

from __future__ import annotations

import pytest

from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.download import DownloadConfig, read_summary, run
from stages.store.trees import materialize

from .helpers import (
    folder_bytes,
    isolated_environment,  # noqa: F401  (fixture)
    local_store,
    write_drop,
)


def test_data_drop_of_every_file_kind(store, tmp_path):
    drop = write_drop(tmp_path / "drop")
    outcome = run(DownloadConfig(data=str(drop)), StageContext(store, progress=False))
    summary = read_summary(store, outcome.manifest)["data"]
    assert summary["format"] == "files" and summary["records"] == 2 + 2 + 3 + 4 and summary["files"] == 4
    assert folder_bytes(materialize(summary["uri"], store)) == folder_bytes(drop)
    assert len([ref for ref in outcome.manifest.inputs if ref["role"] == "data"]) == 4


def test_datasets_save_to_disk_folder(store, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a", "b", "c"]}), "test": datasets.Dataset.from_dict({"text": ["d"]})}
    ).save_to_disk(str(folder))
    outcome = run(DownloadConfig(data=str(folder)), StageContext(store, progress=False))
    summary = read_summary(store, outcome.manifest)["data"]
    assert summary["format"] == "datasets" and summary["records"] == 4
    loaded = datasets.load_from_disk(str(materialize(summary["uri"], store)))
    assert loaded["train"]["text"] == ["a", "b", "c"] and loaded["test"].num_rows == 1


def test_a_drop_from_a_store_prefix(store, tmp_path):
    drop = write_drop(tmp_path / "drop")
    for name, data in folder_bytes(drop).items():
        store.put_bytes(f"drops/2026-01/{name}", data)
    for source in ("store:drops/2026-01", store.uri("drops/2026-01")):
        outcome = run(DownloadConfig(data=source), StageContext(store, progress=False))
        summary = read_summary(store, outcome.manifest)["data"]
        assert summary["records"] == 11
        assert folder_bytes(materialize(summary["uri"], store)) == folder_bytes(drop)
    with pytest.raises(InputError, match="is empty: nothing is stored under it"):
        run(DownloadConfig(data="store:drops/2027-01"), StageContext(store))


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "is empty: it has no .txt"),
        ({"a.txt": b"", "b.jsonl": b"\n\n"}, r"is empty: its 2 file\(s\) hold no records"),
        ({"a.txt": b"x", "report.pdf": b"%PDF", "sub/x.csv": b"a,b"}, r"unsupported types: report\.pdf, sub/x\.csv"),
        ({"ok.jsonl": b'{"a": 1}\n', "bad.jsonl": b'{"a": 1}\n\n{"a": \n'}, r"bad\.jsonl in data drop .*, line 3 is not JSON"),
        ({"t.parquet": b"PAR1 this is not parquet"}, r"t\.parquet in data drop .* is not a readable Parquet file"),
        ({"t.txt": b"fine\nlatin-1 \xe9t\xe9\n"}, r"t\.txt in data drop .*, line 2 is not UTF-8 text"),
        ({"t.json": b"[1, 2,\n 3,]"}, r"t\.json in data drop .* is not valid JSON: .* line 2"),
        ({"t.json": b'["\xff"]'}, r"t\.json in data drop .* is not UTF-8 text"),
    ],
    ids=["empty", "no-records", "unsupported", "bad-jsonl", "bad-parquet", "not-utf8", "bad-json", "json-not-utf8"],
)
def test_bad_drops_are_refused(tmp_path, files, message):
    drop = tmp_path / "drop"
    drop.mkdir()
    for name, data in files.items():
        (drop / name).parent.mkdir(parents=True, exist_ok=True)
        (drop / name).write_bytes(data)
    store = local_store(tmp_path)
    with pytest.raises(InputError, match=message):
        run(DownloadConfig(data=str(drop)), StageContext(store))
    assert store.list() == []


def test_a_broken_saved_dataset_is_refused(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (folder / "dataset_info.json").write_text("{}")
    with pytest.raises(InputError, match="looks like a datasets save_to_disk folder but cannot be loaded"):
        run(DownloadConfig(data=str(folder)), StageContext(local_store(tmp_path)))


def test_a_missing_drop_folder(tmp_path):
    with pytest.raises(InputError, match="data drop folder .*nowhere does not exist"):
        run(DownloadConfig(data=str(tmp_path / "nowhere")), StageContext(local_store(tmp_path)))
