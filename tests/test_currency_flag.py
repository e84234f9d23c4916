"""`--currency` marks the cost `spectrum report` shows, as the pipeline config's cost.currency does."""

from __future__ import annotations

from stages.base.contracts import EVALUATION_TABLE, TRAINING_METRICS_TABLE
from stages.store import open_store

from .test_report import commit, evaluation_rows, gpu, metrics_rows


def test_spectrum_report_shows_the_cost_in_the_currency_given(tmp_path, capsys):
    from spectrum_cli.main import main

    store = open_store(str(tmp_path / "store"))
    trained = commit(store, "train", "cpt", {TRAINING_METRICS_TABLE: metrics_rows(3)}, compute=gpu(4, 900))
    commit(store, "eval", "evaluate", {EVALUATION_TABLE: evaluation_rows()}, inputs=trained, compute=gpu(1, 360))
    out = tmp_path / "r.html"
    argv = ["report", "eval", "--store", store.root_uri, "--out", str(out), "--price-per-device-hour", "2", "--currency", "$"]
    assert main(argv) == 0
    assert "Run eval: 0.1000 GPU-h, cost \\$0.20." in out.with_suffix(".md").read_text()
    capsys.readouterr()
    assert main(["report", "eval", "--store", store.root_uri, "--out", str(tmp_path / "x.html"), "--currency", "$"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --currency '$' marks a cost: give it with --price-per-device-hour") and not (tmp_path / "x.html").exists()
