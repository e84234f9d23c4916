"""The foundation under hostile and careless use: each class of defect, tested at its shared mechanism."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spectrum_cli.main import main
from stages import layer_select, snr_scan
from stages.base.contracts import FAILED, SNR_SCAN, SUCCEEDED
from stages.base.errors import InputError, SpectrumError
from stages.core.cli import execute
from stages.core.execution import StageRun
from stages.core.stage import StageContext
from stages.scan import engine
from stages.store import StoreError, find_manifest, list_runs, load_manifest, open_store
from stages.store.lineage import audit_run, list_run_summaries
from stages.store.scrub import redact

from .helpers import REPO_ROOT

MODEL_ID = "tiny-llama"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def store_scan(store, model: Path, work: Path, **context):
    config = snr_scan.ScanConfig(model_dir=str(model), model_id=MODEL_ID, workers=1)
    return snr_scan.run(config, StageContext(store, work_dir=work, progress=False, **context))


def no_decomposition(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("a matrix was decomposed although the work should have been reused")

    monkeypatch.setattr(engine, "singular_values", boom)


# --- 4. one unreadable or newer manifest does not break the store ---------------------------------


@pytest.mark.parametrize(
    "damage",
    ["truncated", "not-an-object", "missing-fields", "stray-layout", "bad-run-name"],
)
def test_an_unreadable_manifest_is_skipped_with_a_warning(store, tiny_model, tmp_path, monkeypatch, capsys, damage):
    good = store_scan(store, tiny_model, tmp_path / "work")
    damaged = {
        "truncated": ("runs/20990101T000000Z-aaaaaaaa/snr_scan/manifest.json", b'{"stage": "snr_scan", "run_'),
        "not-an-object": ("runs/20990101T000000Z-bbbbbbbb/snr_scan/manifest.json", b"[1, 2, 3]"),
        "missing-fields": ("runs/20990101T000000Z-cccccccc/snr_scan/manifest.json", b'{"stage": "snr_scan"}'),
        "stray-layout": ("runs/notes/manifest.json", b"{}"),
        "bad-run-name": ("runs/_hidden-run/snr_scan/manifest.json", b"{}"),
    }[damage]
    store.put_bytes(*damaged)
    # a stray file under runs/ never mattered, and still does not
    store.put_bytes("runs/README.txt", b"hand-written notes")
    # spectrum runs: the good run is listed, the damaged one named in a warning
    code, out, err = cli(capsys, "runs", "--store", store.root_uri)
    assert code == 0, err
    assert good.run_id in out
    if damage in ("truncated", "not-an-object", "missing-fields", "stray-layout"):
        assert "warning:" in err and "manifest.json" in err
    assert [s["run_id"] for s in list_run_summaries(store)] == [good.run_id]
    # audit of the good run, and a cache lookup, still work
    assert audit_run(store, good.run_id)["run_id"] == good.run_id
    no_decomposition(monkeypatch)
    again = store_scan(store, tiny_model, tmp_path / "work")
    assert again.cached and again.run_id == good.run_id


def test_a_manifest_from_a_newer_version_is_read_and_its_unknown_fields_kept(tmp_path, tiny_model, monkeypatch):
    store = open_store((tmp_path / "store").as_uri())
    first = store_scan(store, tiny_model, tmp_path / "work")
    path = tmp_path / "store" / "runs" / first.run_id / SNR_SCAN / "manifest.json"
    document = json.loads(path.read_text())
    document["attestation"] = {"signed_by": "ci", "format": 2}
    path.chmod(0o644)
    path.write_text(json.dumps(document))
    manifest = load_manifest(store, first.run_id, SNR_SCAN)
    assert manifest.extra == {"attestation": {"signed_by": "ci", "format": 2}}
    assert json.loads(manifest.to_json())["attestation"] == {"signed_by": "ci", "format": 2}
    assert find_manifest(store, SNR_SCAN, manifest.cache_key).run_id == first.run_id
    no_decomposition(monkeypatch)
    assert store_scan(store, tiny_model, tmp_path / "work").cached


# --- 9. the commit and its cache index agree ----------------------------------------------------


def test_a_failed_index_write_commits_nothing_and_the_next_run_recomputes(tmp_path, tiny_model):
    store = open_store((tmp_path / "store").as_uri())
    real = store.put_bytes

    def disk_full_at_the_index(key, data):
        if key.startswith("cache/"):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return real(key, data)

    store.put_bytes = disk_full_at_the_index
    with pytest.raises(OSError):
        store_scan(store, tiny_model, tmp_path / "work")
    (failed_run,) = list_runs(store)
    assert load_manifest(store, failed_run, SNR_SCAN).status == FAILED  # the store does not claim success
    store.put_bytes = real
    again = store_scan(store, tiny_model, tmp_path / "work")
    assert not again.cached and again.manifest.status == SUCCEEDED
    assert store_scan(store, tiny_model, tmp_path / "work").cached  # and from now on it is reused


def test_a_failed_manifest_write_leaves_an_index_entry_that_is_ignored(tmp_path, tiny_model):
    store = open_store((tmp_path / "store").as_uri())
    real = store.put_bytes

    def fail_manifests(key, data):
        if key.endswith("/manifest.json"):
            raise OSError(errno.EIO, "Input/output error", key)
        return real(key, data)

    store.put_bytes = fail_manifests
    with pytest.raises(OSError):
        store_scan(store, tiny_model, tmp_path / "work")
    store.put_bytes = real
    assert list_runs(store) == {}
    assert not store_scan(store, tiny_model, tmp_path / "work").cached


# --- 5. secrets: redacted in every message, refused before any work -------------------------------


def test_url_credentials_are_redacted_in_every_message(capsys):
    def fails(args):
        raise SpectrumError("could not reach http://AKIDEXAMPLE:wJalrXUtnFEMI@127.0.0.1:1/bucket")

    assert execute(fails, None) == 2
    err = capsys.readouterr().err
    assert "wJalrXUtnFEMI" not in err and "AKIDEXAMPLE" not in err and "http://***@127.0.0.1:1/bucket" in err
    assert redact("s3://bucket/key and https://user@host/x") == "s3://bucket/key and https://***@host/x"


@pytest.mark.integration
def test_an_endpoint_with_credentials_is_not_printed(tmp_path, tiny_model):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "stages.snr_scan", str(tiny_model), "--store", "s3://spectrum-test/x"]
    command += ["--s3-endpoint-url", "http://keyid:topsecretvalue@127.0.0.1:1", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "topsecretvalue" not in done.stderr + done.stdout and "keyid" not in done.stderr + done.stdout
    assert done.stderr.startswith("error:") and "***@127.0.0.1:1" in done.stderr


def test_a_secret_looking_run_id_is_refused_before_any_output(tiny_snr_table, tmp_path, capsys):
    store = tmp_path / "store"
    token = "hf_" + "a1B2c3D4e5" * 4
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "-o", str(tmp_path / "sel"), "--store", str(store), "--run-id", token)
    assert code == 2 and err.startswith("error:") and token not in err
    assert not (tmp_path / "sel").exists()
    assert not (store / "runs").exists()


# --- 6. filesystem errors: checked before the work, one line each ---------------------------------


def test_output_clashes_and_folders_are_refused_before_the_scan(tiny_model, tmp_path, capsys, monkeypatch):
    no_decomposition(monkeypatch)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    same = tmp_path / "snr.parquet"
    cases = [
        (["--out", str(folder)], "is a folder"),
        (["--out", str(a_file / "snr.parquet")], "is a file, not a folder"),
        (["--out", str(same), "--reference-json", str(same), "--overwrite"], "--out and --reference-json both name"),
        (["--out", str(same), "--device", "gpu"], "unknown --device 'gpu'"),
    ]
    for options, message in cases:
        code, _, err = cli(capsys, "scan", str(tiny_model), "--no-progress", *options)
        assert code == 2, (options, err)
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert not same.exists()


def test_disk_full_while_writing_is_one_line_and_keeps_the_resumable_work(tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "snr.parquet"

    def disk_full(path, data, overwrite=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("stages.scan.table.write_atomic", disk_full)
    code, _, err = cli(capsys, "scan", str(tiny_model), "--out", str(out), "--no-progress", "--workers", "1")
    assert code == 5
    assert err.startswith("error: No space left on device:") and "free some space" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not out.exists() and (tmp_path / "snr.parquet.partial.jsonl").exists()
    monkeypatch.undo()
    no_decomposition(monkeypatch)
    code, out_text, err = cli(capsys, "scan", str(tiny_model), "--out", str(out), "--no-progress", "--workers", "1")
    assert code == 0, err
    assert "resumed from a partial scan" in out_text


def test_a_binary_file_given_as_reference_json_is_a_clear_error(tmp_path, capsys):
    binary = tmp_path / "snr_results_m.json"
    binary.write_bytes(bytes(range(256)) * 4)
    code, _, err = cli(capsys, "select", str(binary), "-o", str(tmp_path / "sel"))
    assert code == 2 and "is not a JSON text file" in err and len(err.strip().splitlines()) == 1


# --- 7. mistyped store URIs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s4:/bucket/x", "unsupported URI scheme 's4'"),
        ("s3//bucket/x", "did you mean s3://bucket/x"),
        ("s3:bucket/x", "not a valid s3 URI"),
        ("file:/relative", "not a valid file URI"),
        ("file:relative/store", "not a valid file URI"),
    ],
)
def test_a_mistyped_store_uri_is_refused_and_creates_nothing(tiny_snr_table, tmp_path, capsys, monkeypatch, uri, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "--store", uri)
    assert code == 2 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_plain_folders_stay_plain_paths(tiny_snr_table, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "--store", "stores/local")
    assert code == 0, err
    assert (tmp_path / "stores" / "local" / "runs").is_dir()


# --- 10. SIGTERM is treated like Ctrl-C ------------------------------------------------------------


@pytest.mark.integration
def test_sigterm_records_a_failed_stage_and_keeps_the_work_for_resuming(synthetic_model, tmp_path):
    from .test_snr_scan import RESUME_SPEC

    model = synthetic_model(**RESUME_SPEC)  # 30 matrices of 1024 x 1024: seconds of exact SVDs
    store_dir, work = tmp_path / "store", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "SPECTRUM_WORK_DIR": str(work)}
    command = [sys.executable, "-m", "stages.snr_scan", str(model), "--store", str(store_dir), "--model-id", "m"]
    command += ["--svd-method", "svd", "--no-progress", "--workers", "1"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            journals = list(work.glob("*/snr.parquet.partial.jsonl"))
            if journals and journals[0].read_text().count("\n") >= 3:  # header + at least 2 rows
                break
            time.sleep(0.005)
        assert process.poll() is None, f"the scan ended before it could be stopped: {process.communicate()}"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM
    assert err.startswith("terminated (SIGTERM): the snr_scan stage of run "), err
    store = open_store(str(store_dir))
    (stopped,) = list_runs(store)
    assert load_manifest(store, stopped, SNR_SCAN).status == FAILED
    (journal,) = work.glob("*/snr.parquet.partial.jsonl")
    assert journal.read_text().count("\n") >= 3

    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from a partial scan" in done.stdout


# --- 11. a failed publish keeps the resumable work ---------------------------------------------------


def test_a_failed_publish_keeps_the_scan_journal_and_the_next_run_resumes(tmp_path, tiny_model, monkeypatch):
    store = open_store((tmp_path / "store").as_uri())
    work = tmp_path / "work"
    real = StageRun.write_table

    def store_down(self, table_name, table):
        raise StoreError("the store went away while publishing")

    monkeypatch.setattr(StageRun, "write_table", store_down)
    with pytest.raises(StoreError):
        store_scan(store, tiny_model, work)
    (journal,) = work.glob("*/snr.parquet.partial.jsonl")
    rows = journal.read_text().count("\n") - 1
    assert rows > 0
    monkeypatch.setattr(StageRun, "write_table", real)
    no_decomposition(monkeypatch)
    result = store_scan(store, tiny_model, work)
    assert not result.cached and result.detail.resumed == rows
    assert not journal.exists()


@pytest.mark.integration
def test_unfinished_s3_uploads_are_aborted(s3_env, tmp_path, monkeypatch):
    """A writer killed mid-upload leaves parts that are stored (and billed) until aborted."""
    from stages.store import S3Store, parse_store_uri, s3_backend

    from .s3_server import fresh_bucket

    mib = 1024 * 1024
    location = parse_store_uri(f"s3://{fresh_bucket()}/p")
    store = S3Store(location, part_size=5 * mib, copy_part_size=5 * mib)
    client, bucket = store._client, store._bucket

    # a failed upload of this writer is aborted at once
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(11 * mib))
    real_complete = client.complete_multipart_upload
    client.complete_multipart_upload = lambda **kwargs: (_ for _ in ()).throw(OSError("connection reset"))
    try:
        with pytest.raises((OSError, SpectrumError)):
            store.put_file("drops/big.bin", source)
    finally:
        client.complete_multipart_upload = real_complete
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert store.list("drops/") == []

    # the upload of a writer that was killed (here: begun and never finished) ...
    upload = client.create_multipart_upload(Bucket=bucket, Key="p/.spectrum-staging/killed-writer")["UploadId"]
    client.upload_part(Bucket=bucket, Key="p/.spectrum-staging/killed-writer", UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    # ... is left alone while it may still be running,
    S3Store(location)
    assert [u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [upload]
    # ... and aborted by the next writer once it is older than a writer can live
    monkeypatch.setattr(s3_backend, "STALE_UPLOAD_S", 0)
    S3Store(location)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# --- 12. the YAML reads back as the selection ----------------------------------------------------------


def test_tensor_names_with_yaml_syntax_are_quoted_and_read_back_exactly(tmp_path):
    names = [
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp: up_proj",
        "model.layers.2.mlp #up_proj",
        "model.layers.3.mlp\nup_proj",
        "model.layers.4.mlp.'up'",
        "model.layers.5.null",
    ]
    flat = {name: {"snr": 1.0 + index, "type": "mlp"} for index, name in enumerate(names)}
    source = tmp_path / "snr_results_m.json"
    source.write_text(json.dumps(flat))
    result = layer_select.run(
        layer_select.SelectConfig(snr_input=str(source), out_dir=str(tmp_path / "sel"), top_percent=100, always_train=[]),
        StageContext(),
    ).detail
    loaded = yaml.safe_load((tmp_path / "sel" / "unfrozen_parameters.yaml").read_text())["unfrozen_parameters"]
    assert sorted(loaded) == sorted(names)
    assert sorted(loaded) == sorted(result.summary["unfrozen_parameters"])


# --- 13. options that do not apply are errors ------------------------------------------------------------


def test_options_that_do_not_apply_are_errors(tiny_snr_table, tmp_path, capsys):
    cases = [
        (["select", str(tiny_snr_table), "-o", str(tmp_path / "a"), "--budget-percent", "20"], "--budget-percent applies only to"),
        (["select", str(tiny_snr_table), "-o", str(tmp_path / "b"), "--run-id", "r1"], "--run-id apply to runs in an artifact store"),
        (["select", str(tiny_snr_table), "-o", str(tmp_path / "c"), "--force"], "--force apply to runs in an artifact store"),
        (["demo", "--workdir", str(tmp_path / "d"), "--layers", "-1"], "--layers must be at least 1"),
        (["demo", "--workdir", str(tmp_path / "e"), "--top-percent", "0"], "--top-percent must be in (0, 100]"),
    ]
    for argv, message in cases:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_id_is_validated_when_the_context_is_made():
    with pytest.raises(InputError, match="invalid run id"):
        StageContext(run_id="../escape")
