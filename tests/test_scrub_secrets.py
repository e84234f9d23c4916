"""Secrets: redacted in every message, never written to the store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stages.base.errors import SpectrumError
from stages.core.cli import execute
from stages.core.stage import StageContext
from stages.layer_select import run as select_run
from stages.store import (
    FileStore,
)
from stages.store.scrub import redact

from .helpers import REPO_ROOT, snapshot, store_config, store_scan

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


# --- secrets ------------------------------------------------------------------------------------


def test_no_secret_from_the_environment_reaches_the_store(store, tiny_model, tmp_path, monkeypatch):
    hf_token = "hf_" + "Q7x" * 12
    monkeypatch.setenv("HF_TOKEN", hf_token)
    if isinstance(store, FileStore):
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAZZZZZZZZZZZZZZZZ")
    secrets_ = [os.environ["HF_TOKEN"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    outcome, _ = store_scan(store, tiny_model, tmp_path / "work", reference_json=str(tmp_path / "ref.json"))
    select_run(store_config(outcome.manifest.run_id), StageContext(store))
    objects = snapshot(store)
    assert any(k.endswith("manifest.json") for k in objects) and any(k.endswith(".parquet") for k in objects)
    for key, data in objects.items():
        for secret in secrets_:
            assert secret.encode() not in data, f"{key} holds a secret from the environment"
            assert secret not in key


def test_a_store_under_the_current_directory_is_not_a_secret_leak(tiny_model, tmp_path, monkeypatch):
    from stages.store import open_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))  # as a shell sets it
    store = open_store(str(tmp_path / "store"))
    outcome, _ = store_scan(store, tiny_model, tmp_path / "work")
    assert outcome.manifest.status == "succeeded"
