"""`spectrum evaluate --cpt-run/--sft-run RUN`: a run that cannot be evaluated is refused by name, and the store is left as it was.

The training runs here are committed by hand (their training.json and held-out split, no weights): the refusals come
before any model is fetched, so no training is needed to reach them.
"""

from __future__ import annotations

import json

import pytest

from stages import evaluate
from stages.base.contracts import CPT, HELDOUT_DATA_FILE, SFT, TRAINING_FILE
from stages.core.execution import Produced, execute_stage
from stages.core.stage import StageContext
from stages.store import list_runs, open_store

from .helpers import snapshot, stage_cli


def commit_training(store, run_id: str, stage: str, heldout: bytes) -> None:
    """A committed `stage` run with a training record and the held-out split `heldout`."""

    def produce(run):
        record = run.put_bytes(TRAINING_FILE, json.dumps({"model": "/nowhere/base"}).encode())
        return Produced([record, run.put_bytes(HELDOUT_DATA_FILE, heldout)])

    execute_stage(stage, StageContext(store, run_id=run_id, progress=False), {"fake": run_id}, [], produce)


def refused(capsys, store, *argv: str) -> str:
    before = snapshot(store)
    code, _, err = stage_cli(capsys, evaluate.STAGE, *argv, "--store", store.root_uri, "--no-progress")
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert snapshot(store) == before, "a refused evaluation changed the store"
    return err


@pytest.fixture
def store(tmp_path):
    store = open_store(str(tmp_path / "store"))
    commit_training(store, "cpt-empty", CPT, b"")
    commit_training(store, "sft-empty", SFT, b"\n")
    return store


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpt-run", "no-such-run"], "has no committed manifest for stage 'cpt'"),
        (["--sft-run", "no-such-run"], "has no committed manifest for stage 'sft'"),
        (["--cpt-run", "sft-empty"], "has no committed manifest for stage 'cpt'"),  # a run of the other training stage
        (["--sft-run", "cpt-empty"], "has no committed manifest for stage 'sft'"),
    ],
)
def test_a_run_without_that_training_is_named(store, capsys, argv, message):
    err = refused(capsys, store, *argv)
    assert argv[1] in err and message in err


def test_an_empty_held_out_split_asks_for_data(store, capsys):
    err = refused(capsys, store, "--cpt-run", "cpt-empty")
    assert "the held-out split of run cpt-empty is empty (no document fell in its --heldout-percent): pass --data" in err


def test_empty_held_out_chat_rows_ask_for_chat_data(store, capsys):
    err = refused(capsys, store, "--sft-run", "sft-empty")
    assert "the held-out chat rows of run sft-empty are empty (no row fell in its --heldout-percent): pass --chat-data" in err
    assert list_runs(store) == {"cpt-empty": [CPT], "sft-empty": [SFT]}
