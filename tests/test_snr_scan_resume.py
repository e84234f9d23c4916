"""Resuming an snr_scan: an interrupted, killed, stopped (SIGTERM) or disk-full scan keeps its work and the next run resumes."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from stages.base.contracts import FAILED, SNR_SCAN
from stages.store import list_runs, load_manifest, open_store

from .helpers import (
    REPO_ROOT,
    cli,
    interrupt_scan_after,
    no_decomposition,
    partial_journal,
    rows_of,
    scan,
    without,
)


def test_interrupted_scan_resumes_to_the_same_table(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=1)
    assert not out.exists()
    lines = partial_journal(out).read_text().splitlines()
    assert len(lines) == 1 + 5
    monkeypatch.undo()
    result = scan(tiny_model, out, model_id="tiny-llama")
    assert result.resumed == 5
    assert not partial_journal(out).exists()
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_partial_from_other_settings_is_discarded(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", estimator="gavish-donoho", workers=1)
    assert len(partial_journal(out).read_text().splitlines()) == 7
    monkeypatch.undo()
    result = scan(tiny_model, out, model_id="tiny-llama", estimator="reference")
    assert result.resumed == 0
    rows = rows_of(out)
    assert {r["estimator"] for r in rows if r["scanned"]} == {"reference"}
    assert without(rows, "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_partial_from_other_weights_is_discarded(synthetic_model, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(synthetic_model(), model)
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        scan(model, out, model_id="m", workers=1)
    monkeypatch.undo()
    # the folder now holds other weights (another seed): nothing of the partial scan may be reused
    shutil.rmtree(model)
    shutil.copytree(synthetic_model(seed=1), model)
    result = scan(model, out, model_id="m")
    assert result.resumed == 0
    fresh = scan(synthetic_model(seed=1), tmp_path / "fresh.parquet", model_id="m")
    assert without(rows_of(out), "scan_seconds") == without(rows_of(fresh.output), "scan_seconds")


def test_partial_whose_last_line_is_cut_short_is_tolerated(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=1)
    monkeypatch.undo()
    with partial_journal(out).open("a") as handle:
        handle.write('{"model_id": "tiny-llama", "tensor_name": "model.layers.1.mlp.do')  # killed mid-write
    result = scan(tiny_model, out, model_id="tiny-llama")
    assert result.resumed == 4
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_partial_with_a_damaged_header_starts_over(tiny_model, tiny_snr_table, tmp_path):
    out = tmp_path / "snr.parquet"
    partial_journal(out).write_text('{"fingerpr\n{"tensor_name": "lm_head.weight", "snr": 123.0}\n')
    result = scan(tiny_model, out, model_id="tiny-llama")
    assert result.resumed == 0
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_interrupted_parallel_scan_resumes_to_the_same_table(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=3)
    assert not out.exists()
    finished = len(partial_journal(out).read_text().splitlines()) - 1
    assert 0 <= finished <= 7  # rows are published in input order, up to the first unfinished matrix
    monkeypatch.undo()
    result = scan(tiny_model, out, model_id="tiny-llama", workers=3)
    assert result.resumed == finished
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_rows_scanned_after_a_torn_line_survive_a_second_interruption(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=1)
    with partial_journal(out).open("a") as handle:
        handle.write('{"model_id": "tiny-llama", "tensor_na')
    monkeypatch.undo()
    interrupt_scan_after(monkeypatch, 3)  # three more rows, then another kill
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=1)
    monkeypatch.undo()
    result = scan(tiny_model, out, model_id="tiny-llama")
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")
    assert result.resumed == 6


RESUME_SPEC = dict(
    hidden_size=1024,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=1024,
)


@pytest.mark.integration
def test_killed_scan_subprocess_resumes(synthetic_model, tmp_path):
    """SIGKILL a real `python -m stages.snr_scan` mid-scan; the next run resumes and gives the same table."""
    model = synthetic_model(**RESUME_SPEC)  # 30 matrices of 1024 x 1024: a few seconds of exact SVDs
    out = tmp_path / "snr.parquet"
    partial = partial_journal(out)
    command = [sys.executable, "-m", "stages.snr_scan", str(model), "--out", str(out), "--model-id", "m"]
    command += ["--svd-method", "svd", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if partial.exists() and partial.read_text().count("\n") >= 3:  # header + at least 2 rows
                break
            time.sleep(0.005)
        assert process.poll() is None, f"the scan ended before it could be killed: {process.communicate()}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed scan must not leave a table that looks complete"
    assert not list(tmp_path.glob("*.parquet"))
    killed_rows = partial.read_text().count("\n") - 1
    assert killed_rows >= 2

    result = scan(model, out, model_id="m", svd_method="svd")
    assert result.resumed >= 2
    assert result.resumed <= 30 - 1
    assert not partial.exists()
    uninterrupted = scan(model, tmp_path / "uninterrupted.parquet", model_id="m", svd_method="svd")
    assert uninterrupted.resumed == 0
    assert without(rows_of(out), "scan_seconds") == without(rows_of(uninterrupted.output), "scan_seconds")


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


# --- 10. SIGTERM is treated like Ctrl-C ------------------------------------------------------------


@pytest.mark.integration
def test_sigterm_records_a_failed_stage_and_keeps_the_work_for_resuming(synthetic_model, tmp_path):
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
