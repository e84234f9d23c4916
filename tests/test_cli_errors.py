"""How the CLI ends: bounded `error:` lines and a SIGTERM line that says only what is true."""

from __future__ import annotations

import argparse

import pytest

from stages.base.errors import InputError
from stages.core.cli import MAX_ERROR_CHARS, Terminated, execute
from stages.core.execution import execute_stage
from stages.core.stage import StageContext
from stages.store import FileStore, load_manifest


def test_an_error_message_built_from_huge_input_is_cut_and_says_so(capsys):
    def action(args):
        raise InputError("bad value " + "x" * 10_000_000 + " http://user:secret@host/")

    assert execute(action, argparse.Namespace()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad value xxx") and len(err) < MAX_ERROR_CHARS + 200
    assert "more characters left out" in err and "secret" not in err


def test_sigterm_before_any_stage_started_does_not_claim_a_recorded_failure(capsys):
    def action(args):
        raise Terminated()

    assert execute(action, argparse.Namespace()) == 143
    err = capsys.readouterr().err
    assert err.startswith("terminated (SIGTERM): nothing was recorded as failed"), err


@pytest.mark.parametrize("signal_class, code", [(Terminated, 143), (KeyboardInterrupt, 130)])
def test_a_stopped_stage_names_the_failure_it_recorded(tmp_path, capsys, signal_class, code):
    store = FileStore(tmp_path / "store")

    def stopped(stage_run):
        raise signal_class()

    def action(args):
        execute_stage("snr_scan", StageContext(store=store, run_id="r1"), {}, [], stopped)

    assert execute(action, argparse.Namespace()) == code
    err = capsys.readouterr().err
    assert "the snr_scan stage of run r1 was recorded as failed" in err, err
    assert load_manifest(store, "r1", "snr_scan").status == "failed"


@pytest.mark.parametrize("code, exit_code", [(28, 5), (30, 5), (13, 5), (5, 2)])  # ENOSPC, EROFS, EACCES refused; EIO a store error
def test_a_file_store_refused_by_its_file_system_exits_5_naming_the_object(tmp_path, monkeypatch, capsys, code, exit_code):
    import os

    store = FileStore(tmp_path / "store")

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "store" / ".spectrum-tmp-x"))

    monkeypatch.setattr(os, "fsync", refuse)
    assert execute(lambda args: store.put_bytes("runs/r/s/out.txt", b"x"), argparse.Namespace()) == exit_code
    err = capsys.readouterr().err
    assert f"{os.strerror(code)}" in err and "runs/r/s/out.txt" in err and ".spectrum-tmp" not in err
    assert not store.exists("runs/r/s/out.txt")
