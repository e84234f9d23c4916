"""The promote stage: the promotion gate checked on an evaluate run's `evaluation` table, its decision committed as a run.

The evaluate runs here are committed by hand (an evaluation table, no models): the gate reads nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from stages import promote
from stages.base.contracts import DECISION_FILE, EVALUATE, EVALUATION_TABLE, PROMOTE, SUCCEEDED
from stages.core.execution import Produced, execute_stage
from stages.core.stage import StageContext
from stages.evaluate import EVALUATION_SCHEMA
from stages.promote import PromoteConfig
from stages.store import list_runs, open_store, read_output, read_table_output, record_reuse, succeeded_manifest

from .helpers import snapshot, stage_cli

HELDOUT = "heldout_perplexity.max_relative_change=-0.01"
GENERAL = "general_perplexity.max_relative_change=0.05"


def rows(heldout: tuple[float, float], general: tuple[float, float]) -> list[dict]:
    found = []
    for dataset, role, (base, trained) in (("heldout", "domain", heldout), ("python-docs", "general", general)):
        for model, value in (("trained", trained), ("base", base), ("delta", trained - base)):
            found.append(
                {
                    "model": model,
                    "metric": "perplexity",
                    "dataset": dataset,
                    "value": value,
                    "tokens": 64,
                    "role": role,
                    "dataset_sha256": None,
                }
            )
    return found


def commit_evaluation(store, run_id: str, table_rows: list[dict], step: str | None = None) -> None:
    """A committed evaluate run (or step) whose evaluation table holds `table_rows`."""

    def produce(run):
        return Produced([run.write_table(EVALUATION_TABLE, pa.Table.from_pylist(table_rows, schema=EVALUATION_SCHEMA))])

    context = StageContext(store, run_id=run_id, progress=False, step=step)
    execute_stage(EVALUATE, context, {"fake": f"{run_id}/{step}"}, [], produce)


@pytest.fixture
def store(tmp_path):
    store = open_store(str(tmp_path / "store"))
    commit_evaluation(store, "better", rows(heldout=(10.0, 9.0), general=(20.0, 20.4)))  # -10% held-out, +2% general
    commit_evaluation(store, "forgets", rows(heldout=(10.0, 9.0), general=(20.0, 22.0)))  # +10% general
    return store


def gate(store, evaluate_run: str, *rules: str, run_id: str | None = None):
    return promote.STAGE.run(
        PromoteConfig(evaluate_run=evaluate_run, rules=list(rules)), StageContext(store, run_id=run_id, progress=False)
    )


def test_a_model_that_passes_the_gate_is_recorded_with_every_rule_and_its_value(store):
    result = gate(store, "better", HELDOUT, GENERAL)
    decision = result.detail
    assert list(decision) == ["passed", "evaluate_run", "gate", "rules"]
    assert decision["passed"] is True and decision["evaluate_run"] == "better" and decision["gate"] == [HELDOUT, GENERAL]
    assert [(r["rule"], r["dataset"], r["passed"]) for r in decision["rules"]] == [
        (HELDOUT, "heldout", True),
        (GENERAL, "python-docs", True),
    ]
    assert decision["rules"][0]["measured"] == pytest.approx(-0.1) and decision["rules"][1]["measured"] == pytest.approx(0.02)
    assert result.lines[0] == "promotion gate on evaluate run better: PASSED"
    assert result.lines[1].startswith(f"  PASS {HELDOUT}: perplexity on heldout: 10 -> 9, relative change -10.000%")
    # the decision is the stage's output, read back as its manifest recorded it
    manifest = result.manifest
    assert manifest.stage == PROMOTE and manifest.status == SUCCEEDED and not result.cached
    data, _ = read_output(store, manifest, DECISION_FILE)
    assert json.loads(data) == decision
    # its input is the evaluation table it checked; its parameters the gate's rules and the evaluate run
    _, table = read_table_output(store, succeeded_manifest(store, "better", EVALUATE, "an evaluation"), EVALUATION_TABLE)
    assert [(i["uri"], i["sha256"]) for i in manifest.inputs] == [(table.uri, table.sha256)]
    assert manifest.parameters == {"rules": [HELDOUT, GENERAL], "evaluate_run": "better"}


def test_a_failed_gate_is_a_decision_not_an_error(store, capsys):
    code, out, err = stage_cli(
        capsys, promote.STAGE, "--evaluate-run", "forgets", "--rule", HELDOUT, "--rule", GENERAL, "--store", store.root_uri
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "promotion gate on evaluate run forgets: FAILED (1 of 2 checks)"
    assert lines[1].startswith(f"  PASS {HELDOUT}:")
    assert lines[2] == f"  FAIL {GENERAL}: perplexity on python-docs: 20 -> 22, relative change +10.000% (must be at most +5.000%)"
    (run_id,) = [run for run, stages in list_runs(store).items() if PROMOTE in stages]
    decision = json.loads(read_output(store, succeeded_manifest(store, run_id, PROMOTE, "a decision"), DECISION_FILE)[0])
    assert decision["passed"] is False and [r["passed"] for r in decision["rules"]] == [True, False]


def test_a_metric_the_evaluation_lacks_fails_the_gate(store):
    decision = gate(store, "better", HELDOUT, "lm_eval.hellaswag.min_delta=-0.01", "sft_eval_loss.max_delta=0").detail
    assert decision["passed"] is False
    assert {r["rule"]: (r["passed"], r["measured"]) for r in decision["rules"]} == {
        HELDOUT: (True, pytest.approx(-0.1)),
        "lm_eval.hellaswag.min_delta=-0.01": (False, None),
        "sft_eval_loss.max_delta=0.0": (False, None),
    }
    reasons = {r["metric"]: r["reason"] for r in decision["rules"] if not r["passed"]}
    assert reasons["lm_eval.hellaswag"].startswith("the evaluation has no lm-evaluation-harness scores of task hellaswag")
    assert reasons["sft_eval_loss"].startswith("the evaluation has no sft_eval_loss on chat rows")


def test_the_same_evaluation_and_gate_reuse_the_decision(store):
    first = gate(store, "better", HELDOUT, GENERAL)
    again = gate(store, "better", GENERAL, HELDOUT)  # the same gate, its rules in another order
    assert again.cached and again.manifest.run_id == first.manifest.run_id and again.detail == first.detail
    assert "reusing run" in again.lines[-1]
    other_gate = gate(store, "better", HELDOUT)
    other_evaluation = gate(store, "forgets", HELDOUT, GENERAL)
    assert not other_gate.cached and not other_evaluation.cached
    assert len({first.manifest.run_id, other_gate.manifest.run_id, other_evaluation.manifest.run_id}) == 3


def test_a_decision_in_the_evaluated_run_names_that_run(store):
    """As a pipeline runs it: the promote stage of the run that trained and evaluated."""
    result = gate(store, "better", HELDOUT, run_id="better")
    assert result.manifest.run_id == "better"
    assert list_runs(store)["better"] == [EVALUATE, PROMOTE]


def test_an_evaluate_step_is_checked_by_its_reference(store):
    commit_evaluation(store, "better", rows(heldout=(10.0, 10.5), general=(20.0, 20.0)), step="sft")
    decision = gate(store, "better/evaluate.sft", HELDOUT).detail
    assert decision["evaluate_run"] == "better/evaluate.sft" and decision["passed"] is False
    assert decision["rules"][0]["measured"] == pytest.approx(0.05)


def test_a_reused_evaluation_is_checked_where_it_was_measured(store):
    """An evaluate stage that reused another run's work: the decision names the run that measured."""
    record_reuse(store, succeeded_manifest(store, "better", EVALUATE, "an evaluation"), "later", EVALUATE)
    first, later = gate(store, "better", HELDOUT), gate(store, "later", HELDOUT)
    assert later.detail["evaluate_run"] == "better"
    assert later.cached and later.manifest.run_id == first.manifest.run_id


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--evaluate-run", "better", "--rule", "heldout_perplexity.max_relative_chnage=-0.01"],
            "error: --rule 'heldout_perplexity.max_relative_chnage=-0.01': "
            "max_relative_chnage: not a rule (did you mean max_relative_change?)",
        ),
        (
            ["--evaluate-run", "better", "--rule", "forgetting.max_delta=1"],
            "error: --rule 'forgetting.max_delta=1': forgetting: unknown metric",
        ),
        (
            ["--evaluate-run", "better", "--rule", "general_perplexity.max_delta=a lot"],
            "error: --rule 'general_perplexity.max_delta=a lot': expected a number",
        ),
        (
            ["--evaluate-run", "better", "--rule", HELDOUT, "--rule", HELDOUT],
            "error: --rule: heldout_perplexity.max_relative_change is given twice",
        ),
        (["--evaluate-run", "better"], "error: the gate has no rules: pass --rule METRIC.KIND=VALUE"),
        (["--rule", HELDOUT], "error: nothing to check: pass --evaluate-run RUN"),
        (["--evaluate-run", "no-such-run", "--rule", HELDOUT], "error: run 'no-such-run' has no committed manifest for stage 'evaluate'"),
        (["--evaluate-run", "better/cpt", "--rule", HELDOUT], "error: --evaluate-run 'better/cpt' names a cpt step"),
    ],
)
def test_bad_options_are_one_error_line_and_leave_the_store_as_it_was(store, capsys, argv, message):
    before = snapshot(store)
    code, out, err = stage_cli(capsys, promote.STAGE, *argv, "--store", store.root_uri)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert out == "" and snapshot(store) == before


@pytest.mark.integration
def test_the_stage_runs_as_a_module(store):
    """`python -m stages.promote`, the container entrypoint."""
    argv = [sys.executable, "-m", "stages.promote", "--evaluate-run", "better", "--rule", HELDOUT, "--store", store.root_uri]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("promotion gate on evaluate run better: PASSED\n")


def test_the_command_line_of_a_config_parses_back_to_it(tmp_path):
    """What a container or subprocess runs for the stage (stages.core.cli.command_line) is the config the pipeline made."""
    import argparse

    from stages.core.cli import command_line, config_from_args, stage_parser

    config = PromoteConfig(evaluate_run="r/evaluate.sft", rules=[HELDOUT, "lm_eval.hellaswag.acc_norm.min_delta=-0.01"])
    argv = command_line(promote.STAGE, config, StageContext(open_store(str(tmp_path / "store")), run_id="r", progress=False))
    args = stage_parser(promote.STAGE, argparse.ArgumentParser()).parse_args(argv)
    assert config_from_args(PromoteConfig, args) == config, argv
