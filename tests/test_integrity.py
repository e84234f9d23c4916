"""Every read of a stored object is verified against what its manifest recorded: the version, the sha256, the size.

`ArtifactStore.read_recorded` is the one place that reads an object a manifest names; select
--snr-run and the download summary go through it, and a stored model's local cache copy is
hashed before it is reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from stages import __version__, snr_scan
from stages.base.contracts import SNR_SCAN, SNR_TABLE
from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.download import DownloadConfig, read_summary
from stages.download import run as download_run
from stages.layer_select import SelectConfig
from stages.layer_select import run as select_run
from stages.snr_scan import ScanConfig
from stages.store import FileStore, IntegrityError, commit_manifest, load_manifest, open_store, start_manifest, table_key
from stages.store.manifest import output_key
from stages.store.trees import materialize

SNR_KEY = "tables/snr/stage=snr_scan/run_id={run}/part-0.parquet"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "spectrum-cache"
    monkeypatch.setenv("SPECTRUM_CACHE", str(cache))
    return cache


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_of(store: FileStore, key: str) -> Path:
    """The file behind `key` in a file store, made writable (as someone bypassing the store would)."""
    path = Path(unquote(urlsplit(store.uri(key)).path))
    path.chmod(0o644)
    return path


def rewrite_outside_the_store(store, key: str, data: bytes, s3_env=None) -> None:
    """Change the bytes under `key` behind the store's back: in place on a file store, as a new S3 version."""
    if isinstance(store, FileStore):
        file_of(store, key).write_bytes(data)
        return
    parts = urlsplit(store.uri(key))
    s3_env.client().put_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"), Body=data)


def store_context(store, tmp_path) -> StageContext:
    return StageContext(store, work_dir=tmp_path / "work", progress=False)


def other_table(data: bytes) -> bytes:
    """A valid SNR table that differs from `data`: every snr doubled."""
    table = pq.read_table(pa.BufferReader(data))
    column = table.schema.get_field_index("snr")
    table = table.set_column(column, "snr", pc.multiply(table["snr"], 2.0))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# --- the one verified read -------------------------------------------------------------------------


def test_read_recorded_returns_the_bytes_and_what_was_read(store):
    info = store.put_bytes("runs/r/x/out.json", b'{"a": 1}')
    data, read = store.read_recorded(info.to_dict())
    assert data == b'{"a": 1}' and read == info


@pytest.mark.parametrize(
    "change",
    [
        {"sha256": "0" * 64},
        {"size": 3},
        {"sha256": "0" * 64, "size": 3},
    ],
    ids=["sha256", "size", "both"],
)
def test_read_recorded_refuses_bytes_the_manifest_did_not_record(store, change):
    info = store.put_bytes("runs/r/x/out.json", b'{"a": 1}')
    with pytest.raises(IntegrityError) as raised:
        store.read_recorded({**info.to_dict(), **change})
    message = str(raised.value)
    assert info.uri in message and "does not hold the bytes its manifest recorded" in message
    assert "re-run the stage that wrote it" in message


def test_download_recorded_streams_the_recorded_bytes_or_refuses(store, tmp_path):
    info = store.put_bytes("runs/r/x/out.json", b'{"a": 1}')
    target = tmp_path / "copy.json"
    assert store.download_recorded(info.to_dict(), target) == info and target.read_bytes() == b'{"a": 1}'
    target.write_bytes(b"kept")
    with pytest.raises(IntegrityError, match="sha256"):
        store.download_recorded({**info.to_dict(), "sha256": "0" * 64}, target)
    assert target.read_bytes() == b"kept"  # other bytes never replace the file
    with pytest.raises(IntegrityError, match="does not hold the bytes its manifest recorded"):
        store.download_recorded({**info.to_dict(), "size": 3}, target)
    with pytest.raises(IntegrityError, match="names no key and sha256"):
        store.download_recorded({"uri": "file:///x"}, target)


def test_read_recorded_needs_a_key_and_a_sha256(store):
    with pytest.raises(IntegrityError, match="names no key and sha256"):
        store.read_recorded({"uri": "file:///x"})


@pytest.mark.integration
def test_read_recorded_reads_the_recorded_s3_version(s3_env, s3_store):
    info = s3_store.put_bytes("runs/r/x/out.json", b"recorded")
    assert info.version_id is not None
    rewrite_outside_the_store(s3_store, info.key, b"written later", s3_env)
    assert s3_store.get_bytes(info.key) == b"written later"
    data, read = s3_store.read_recorded(info.to_dict())
    assert data == b"recorded" and read.version_id == info.version_id and read.sha256 == info.sha256


# --- select --snr-run reads the table the scan recorded --------------------------------------------


@pytest.fixture
def scanned(store, tiny_model, tmp_path):
    """(store, snr run id, the recorded table output) of a committed scan of tiny_model."""
    outcome = snr_scan.run(ScanConfig(model_dir=str(tiny_model), model_id="tiny", workers=1), store_context(store, tmp_path))
    run = outcome.manifest.run_id
    recorded = next(o for o in outcome.manifest.outputs if o["key"] == SNR_KEY.format(run=run))
    return store, run, recorded


def select_config(run: str, **overrides) -> SelectConfig:
    return SelectConfig(**{"snr_input": None, "out_dir": None, "snr_run": run, **overrides})


def keys(store) -> list[str]:
    return store.list("")


@pytest.mark.parametrize("how", ["different-table", "same-size-garbage", "truncated"])
def test_select_refuses_a_table_changed_after_the_scan(tiny_model, tmp_path, how):
    """On a file store a changed object is changed in place (on S3 it is a new version: see the next test)."""
    store = open_store((tmp_path / "store").as_uri())
    outcome = snr_scan.run(ScanConfig(model_dir=str(tiny_model), model_id="tiny", workers=1), store_context(store, tmp_path))
    run = outcome.manifest.run_id
    recorded = next(o for o in outcome.manifest.outputs if o["key"] == SNR_KEY.format(run=run))
    original = store.get_bytes(recorded["key"])
    changed = {
        "different-table": other_table(original),
        "same-size-garbage": bytes(b ^ 0x01 for b in original),
        "truncated": original[:-10],
    }[how]
    file_of(store, recorded["key"]).write_bytes(changed)
    before = keys(store)
    out = tmp_path / "selection"
    with pytest.raises(IntegrityError) as raised:
        select_run(select_config(run, out_dir=str(out)), StageContext(store))
    message = str(raised.value)
    assert store.uri(recorded["key"]) in message and recorded["sha256"] in message and "re-run the stage" in message
    assert keys(store) == before  # no run, no manifest, no output
    assert not out.exists()


@pytest.mark.integration
def test_select_reads_the_table_version_the_scan_recorded(s3_env, s3_store, tiny_model, tmp_path):
    outcome = snr_scan.run(ScanConfig(model_dir=str(tiny_model), model_id="tiny", workers=1), store_context(s3_store, tmp_path))
    run = outcome.manifest.run_id
    recorded = next(o for o in outcome.manifest.outputs if o["key"] == SNR_KEY.format(run=run))
    assert recorded["version_id"] is not None
    original = s3_store.get_bytes(recorded["key"])
    rewrite_outside_the_store(s3_store, recorded["key"], other_table(original), s3_env)

    selection = select_run(select_config(run), StageContext(s3_store))
    (ref,) = selection.manifest.inputs
    assert ref["uri"] == recorded["uri"] and ref["version_id"] == recorded["version_id"]
    assert ref["sha256"] == recorded["sha256"] == sha(original) and ref["size"] == len(original)


def test_select_records_the_verified_input(scanned):
    store, run, recorded = scanned
    (ref,) = select_run(select_config(run), StageContext(store)).manifest.inputs
    assert {k: ref.get(k) for k in ("uri", "sha256", "size", "version_id")} == {
        k: recorded.get(k) for k in ("uri", "sha256", "size", "version_id")
    }


def test_select_refuses_a_scan_manifest_that_records_no_table(store):
    run = "20260101T000000Z-notable0"
    manifest = start_manifest(SNR_SCAN, __version__, run, {}, [])
    commit_manifest(store, manifest.finish([store.put_bytes(output_key(run, SNR_SCAN, "notes.txt"), b"x")]))
    store.put_bytes(table_key(SNR_TABLE, SNR_SCAN, run), b"a table nobody recorded")
    with pytest.raises(InputError, match=f"manifest of run {run} records no output 'tables/snr/.*re-run the stage"):
        select_run(select_config(run), StageContext(store))


# --- the download summary ---------------------------------------------------------------------


def test_the_download_summary_is_read_verified(tiny_model, tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    outcome = download_run(DownloadConfig(model=str(tiny_model)), StageContext(store, progress=False))
    recorded = next(o for o in outcome.manifest.outputs if o["key"].endswith("/download.json"))
    summary = json.loads(store.get_bytes(recorded["key"]))
    assert read_summary(store, outcome.manifest) == summary
    summary["model"]["uri"] = "file:///somewhere/else"
    file_of(store, recorded["key"]).write_bytes(json.dumps(summary).encode())
    with pytest.raises(IntegrityError, match="download.json does not hold the bytes its manifest recorded"):
        read_summary(store, load_manifest(store, outcome.manifest.run_id, "download"))


# --- a stored model's local cache copy is hashed before it is reused -------------------------------


def test_a_scan_never_reads_a_cache_copy_changed_in_place(synthetic_model, tmp_path, private_cache):
    """The scan's manifest records the stored files' sha256: the bytes it scans must be those bytes."""
    folder = synthetic_model(max_shard_bytes=100_000)
    store = open_store((tmp_path / "store").as_uri())
    downloaded = download_run(DownloadConfig(model=str(folder)), StageContext(store, progress=False))
    uri = read_summary(store, downloaded.manifest)["model"]["uri"]
    local = materialize(uri, store)
    assert local.parent == private_cache
    shard = sorted(local.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # same size, other tensor bytes
    shard.write_bytes(bytes(data))

    scanned = snr_scan.run(ScanConfig(model_dir=uri, model_id="m", workers=1), store_context(store, tmp_path)).detail
    reference = ScanConfig(model_dir=str(folder), output=str(tmp_path / "ref.parquet"), model_id="m", workers=1)
    expected = snr_scan.run(reference, StageContext(progress=False)).detail
    assert [r.get("tensor_sha256") for r in scanned.rows] == [r.get("tensor_sha256") for r in expected.rows]
    assert shard.read_bytes() == (folder / shard.name).read_bytes()  # the cache copy was fetched again
    shutil.rmtree(local)
