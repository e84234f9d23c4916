"""`spectrum compare`'s bad inputs: refused with one `error:` line naming what was wrong, before any arm trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import compare
from stages.base.settings import STORE_ENV
from stages.store import list_runs, open_store

from .helpers import cli


@pytest.fixture
def drop(tmp_path) -> Path:
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "logs.jsonl").write_text(json.dumps({"text": "the pump holds nominal pressure"}) + "\n")
    return folder


def refused(capsys, tmp_path: Path, *argv: str, code: int = 2) -> str:
    """The one error line of `spectrum compare ARGV`, checked to leave no run in the store."""
    exit_code, _, err = cli(capsys, "compare", *argv)
    assert exit_code == code, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    store = tmp_path / "store"
    assert not store.exists() or list_runs(open_store(str(store))) == {}
    return err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "magic"], "unknown comparison method(s) magic; choose from full, spectrum-50,"),
        (["--method", "full", "--method", "lora", "--method", "magic", "--method", "other"], "unknown comparison method(s) magic, other"),
        (["--method", "full", "--method", "full"], "--method lists a method twice: full, full"),
        (["--step", "x"], "--step does not apply to compare: its arms are runs of their own"),
        (["--seeds", "0"], "--seeds must be a whole number 1 or more (the runs of each arm), got 0"),
    ],
)
def test_bad_options_are_refused(tmp_path, drop, capsys, options, message):
    err = refused(capsys, tmp_path, str(tmp_path / "model"), "--data", str(drop), "--store", str(tmp_path / "store"), *options)
    assert message in err


def test_without_data_it_asks_for_data(tmp_path, capsys):
    err = refused(capsys, tmp_path, str(tmp_path / "model"), "--store", str(tmp_path / "store"))
    assert "no data: pass --data (the drop every arm trains on)" in err


def test_without_a_store_it_names_store_and_its_variable(tmp_path, drop, capsys, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    err = refused(capsys, tmp_path, str(tmp_path / "model"), "--data", str(drop))
    assert "no artifact store: the compare stage" in err and "--store" in err and STORE_ENV in err


@pytest.mark.parametrize("existing", [compare.COMPARISON_JSON_FILE, compare.COMPARISON_MARKDOWN_FILE])
def test_existing_out_dir_files_are_kept_without_overwrite(tmp_path, drop, capsys, existing):
    out = tmp_path / "out"
    out.mkdir()
    (out / existing).write_text("precious")
    argv = [str(tmp_path / "model"), "--data", str(drop), "--store", str(tmp_path / "store"), "--out-dir", str(out)]
    err = refused(capsys, tmp_path, *argv, code=4)
    assert f"{out / existing} already exists" in err and "--overwrite" in err
    assert (out / existing).read_text() == "precious"


@pytest.mark.integration  # starts the compare flow (Prefect): the missing model is found by the arm's first stage
def test_a_model_folder_that_does_not_exist_is_named_and_nothing_is_committed(prefect_api, tmp_path, drop, capsys):
    missing = tmp_path / "no-such-model"
    code, _, err = cli(capsys, "compare", str(missing), "--data", str(drop), "--store", str(tmp_path / "store"), "--method", "spectrum-50")
    assert code == 2, err
    assert f"error: {missing} is not a folder (or does not exist)" in err
    assert list_runs(open_store(str(tmp_path / "store"))) == {}


@pytest.mark.integration
def test_a_model_folder_that_does_not_exist_is_refused_before_any_arm_runs(prefect_api, tmp_path, drop, capsys):
    missing = tmp_path / "no-such-model"
    err = refused(capsys, tmp_path, str(missing), "--data", str(drop), "--store", str(tmp_path / "store"), "--method", "full")
    assert str(missing) in err


def row(**overrides) -> dict:
    values = dict(method="lora", trainable_share=0.02, step_seconds=0.5, time_ratio=None, peak_memory_mib=900.0, memory_ratio=None)
    values.update(final_loss=2.5, heldout_perplexity_base=None, heldout_perplexity=None)
    values.update(general_perplexity_base=None, general_perplexity=None)
    return {**values, **overrides}


def test_markdown_table_shows_a_dash_for_missing_perplexities_and_ratios():
    table = compare.markdown_table([row(), row(method="full", time_ratio=1.0, memory_ratio=1.0, general_perplexity_base=9.5)])
    header, rule, lora, full = table.splitlines()
    assert header.startswith("| method |") and rule.startswith("|---|")
    assert lora == "| lora | 2.0% | 0.500 | – | 900 | – | 2.500 | – | – |"
    assert full == "| full | 2.0% | 0.500 | 1.00× | 900 | 1.00× | 2.500 | – | – |"  # a perplexity without its base is a dash too
