"""Run ids: checked when the context is made, before any output; a secret-looking one is refused without echoing it."""

from __future__ import annotations

import pytest

from stages.base.errors import InputError
from stages.core.stage import StageContext

from .helpers import cli


def test_a_secret_looking_run_id_is_refused_before_any_output(tiny_snr_table, tmp_path, capsys):
    store = tmp_path / "store"
    token = "hf_" + "a1B2c3D4e5" * 4
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "-o", str(tmp_path / "sel"), "--store", str(store), "--run-id", token)
    assert code == 2 and err.startswith("error:") and token not in err
    assert not (tmp_path / "sel").exists()
    assert not (store / "runs").exists()


def test_a_run_id_is_validated_when_the_context_is_made():
    with pytest.raises(InputError, match="invalid run id"):
        StageContext(run_id="../escape")
