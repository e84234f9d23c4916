"""`spectrum line status|promote|rollback` through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from spectrum_cli.line_command import first_reason
from spectrum_cli.main import main
from stages.base import settings
from stages.store import lines as L
from stages.store import open_store

LINE = "acme-legal"
BASE = {"uri": "hf://org/base", "sha256": "b" * 64}


@pytest.fixture(autouse=True)
def no_default_store(monkeypatch):
    monkeypatch.delenv(settings.STORE_ENV, raising=False)


def three_generations(store) -> None:
    """Generations 1 and 3 promoted by the gate, 2 rejected (its first reason: held-out perplexity rose)."""
    for n, decision in ((1, L.PROMOTED), (2, L.REJECTED), (3, L.PROMOTED)):
        reasons = [
            {"rule": "heldout_perplexity.max_relative_change", "limit": -0.01, "value": 0.02 if n == 2 else -0.05, "passed": n != 2},
            {"rule": "general_perplexity.max_relative_change", "limit": 0.05, "value": 0.0, "passed": True},
        ]
        L.record_decision(
            store,
            LINE,
            drop=f"2024-0{n}",
            run_id=f"run-{n}",
            starting_model=BASE,
            model=store.uri(f"runs/run-{n}/cpt/model"),
            decision=decision,
            reasons=reasons,
        )


def spectrum(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def store(tmp_path):
    return open_store((tmp_path / "store").as_uri())


def test_status_of_a_line_without_generations(store, capsys):
    code, out, err = spectrum(capsys, "line", "status", LINE, "--store", store.root_uri)

    assert (code, err) == (0, "")
    assert "generations:\n  none yet" in out and out.rstrip().endswith("production: none yet (the config's model)")


def test_status_lists_generations_pointer_history_and_production(store, capsys):
    three_generations(store)

    code, out, err = spectrum(capsys, "line", "status", LINE, "--store", store.root_uri)

    assert (code, err) == (0, "")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert [row[:4] for row in rows] == [
        ["1", "2024-01", "run-1", "promoted"],
        ["2", "2024-02", "run-2", "rejected"],
        ["3", "2024-03", "run-3", "promoted"],
    ]
    assert "rule=heldout_perplexity.max_relative_change, limit=-0.01, passed=false, value=0.02" in out
    assert "gate -> generation 1 (run run-1)" in out and "gate -> generation 3 (run run-3)" in out
    assert out.rstrip().endswith(f"production: generation 3 (run run-3, model {store.uri('runs/run-3/cpt/model')})")


def test_status_json_is_the_line_status(store, capsys):
    three_generations(store)

    code, out, _ = spectrum(capsys, "line", "status", LINE, "--store", store.root_uri, "--json")

    assert code == 0 and json.loads(out) == json.loads(json.dumps(L.line_status(store, LINE)))


def test_manual_promotion_and_rollback_append_and_show_in_status(store, capsys):
    three_generations(store)

    code, out, err = spectrum(capsys, "line", "promote", LINE, "--run", "run-2", "--why", "probe was broken", "--store", store.root_uri)
    assert (code, err) == (0, "")
    assert "manual -> generation 2 (run run-2): probe was broken" in out and "production: generation 2 (run run-2" in out

    code, out, err = spectrum(capsys, "line", "rollback", LINE, "--to", "1", "--store", store.root_uri)
    assert (code, err) == (0, "")
    assert "rollback -> generation 1 (run run-1): rolled back to generation 1 by hand" in out

    _, out, _ = spectrum(capsys, "line", "status", LINE, "--store", store.root_uri)
    history = out.split("production history:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [h.split()[0] for h in history] == ["#1", "#2", "#3", "#4"]
    assert [h.split()[2] for h in history] == ["gate", "gate", "manual", "rollback"]
    assert out.rstrip().endswith(f"production: generation 1 (run run-1, model {store.uri('runs/run-1/cpt/model')})")


@pytest.mark.parametrize(
    ("reasons", "shown"),
    [
        ([], "-"),
        (
            [
                {"rule": "a.max_relative_change=-0.01", "passed": True, "reason": "improved 3%"},
                {"rule": "b.max_relative_change=0.05", "passed": False, "reason": "rose 9%, more than 5%", "measured": 0.09},
            ],
            "FAIL b.max_relative_change=0.05: rose 9%, more than 5%",
        ),
        ([{"rule": "a", "passed": True, "reason": "fine"}], "PASS a: fine"),
        ([{"value": 1, "metric": "m"}], "metric=m, value=1"),
        ([{"rule": "r", "reason": "x" * 300}], "r: " + "x" * 96 + "…"),
    ],
)
def test_first_reason_is_the_first_failed_rule_in_one_line(reasons, shown):
    assert first_reason(reasons) == shown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["promote", LINE, "--run", "run-9", "--why", "x"], "error: run run-9 is not a complete generation of line acme-legal"),
        (["rollback", LINE, "--to", "2"], "error: cannot roll back line acme-legal to generation 2: generation 2 was never production"),
        (["rollback", LINE, "--to", "7"], "error: line acme-legal has no generation 7"),
        (["rollback", LINE, "--to", "0"], "error: generation must be a whole number from 1, got 0"),
        (["status", "../etc"], "error: invalid line name '../etc'"),
    ],
)
def test_refusals_are_one_error_line_and_write_nothing(store, capsys, argv, message):
    three_generations(store)
    before = {key: store.get_bytes(key) for key in store.list("lines/")}

    code, out, err = spectrum(capsys, "line", *argv, "--store", store.root_uri)

    assert (code, out) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    assert {key: store.get_bytes(key) for key in store.list("lines/")} == before


def test_a_store_is_required(capsys):
    code, _, err = spectrum(capsys, "line", "status", LINE)

    assert code == 2 and err.startswith("error: no artifact store: pass --store")


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["promote", LINE, "--run", "run-1"], "the following arguments are required: --why"),
        (["rollback", LINE, "--to", "two"], "argument --to: invalid int value: 'two'"),
        (["rollback", LINE], "the following arguments are required: --to"),
        (["sideways", LINE], "invalid choice: 'sideways'"),
    ],
)
def test_usage_mistakes(capsys, argv, complaint):
    with pytest.raises(SystemExit) as exit_:
        main(["line", *argv])

    assert exit_.value.code == 2 and complaint in capsys.readouterr().err


@pytest.mark.parametrize("action", [[], ["status"], ["promote"], ["rollback"]])
def test_help(capsys, action):
    with pytest.raises(SystemExit) as exit_:
        main(["line", *action, "--help"])

    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: spectrum line {' '.join(action)}".rstrip())


@pytest.mark.integration
def test_status_promote_and_rollback_on_the_s3_server(s3_env, capsys):
    from tests.s3_server import fresh_bucket

    uri = f"s3://{fresh_bucket()}/spectrum"
    store = open_store(uri)
    three_generations(store)
    where = ["--store", uri, "--s3-endpoint-url", s3_env.endpoint_url]

    assert spectrum(capsys, "line", "promote", LINE, "--run", "run-2", "--why", "by hand", *where)[0] == 0
    assert spectrum(capsys, "line", "rollback", LINE, "--to", "3", *where)[0] == 0
    code, out, err = spectrum(capsys, "line", "status", LINE, *where)

    assert (code, err) == (0, "")
    assert out.rstrip().endswith(f"production: generation 3 (run run-3, model {store.uri('runs/run-3/cpt/model')})")
    assert [p.action for p in L.pointer_history(store, LINE)] == [L.GATE, L.GATE, L.MANUAL, L.ROLLBACK]
