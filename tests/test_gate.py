"""The promotion gate's rules (stages/promotion/gate.py): declared as a config mapping or flat `--rule` text, and checked on
the rows of an evaluation table. A metric the evaluation lacks fails its rule; nothing passes on a number it did not see."""

from __future__ import annotations

import math

import pytest

from stages.base.errors import InputError
from stages.promotion.gate import Gate, parse_gate, passed

GATE = {
    "heldout_perplexity": {"max_relative_change": -0.01},
    "general_perplexity": {"max_relative_change": 0.05},
    "lm_eval": {"hellaswag": {"min_delta": -0.01, "acc_norm": {"min_delta": 0}}},
}
RULES = [
    "heldout_perplexity.max_relative_change=-0.01",
    "general_perplexity.max_relative_change=0.05",
    "lm_eval.hellaswag.min_delta=-0.01",
    "lm_eval.hellaswag.acc_norm.min_delta=0.0",
]


def row(model: str, metric: str, dataset: str, value: float, role: str) -> dict:
    return {"model": model, "metric": metric, "dataset": dataset, "value": value, "tokens": 100, "role": role, "dataset_sha256": None}


def measured(metric: str, dataset: str, role: str, base: float, trained: float) -> list[dict]:
    """The rows evaluate writes for one metric of one dataset: base, trained and their delta."""
    return [
        row("base", metric, dataset, base, role),
        row("trained", metric, dataset, trained, role),
        row("delta", metric, dataset, trained - base, role),
    ]


def evaluation(heldout=(10.0, 9.0), general=(20.0, 20.5), acc=(0.50, 0.50), acc_norm=(0.40, 0.41)) -> list[dict]:
    rows = measured("perplexity", "heldout", "domain", *heldout) + measured("perplexity", "python-docs", "general", *general)
    rows += measured("nll_per_token", "heldout", "domain", 2.3, 2.2)  # not a gate metric: never measured by a perplexity rule
    rows += measured("lm_eval:acc", "hellaswag", "task", *acc) + measured("lm_eval:acc_norm", "hellaswag", "task", *acc_norm)
    return rows


# --- declaring ---------------------------------------------------------------------------------------


def test_the_mapping_and_the_flat_rules_are_the_same_gate():
    gate = parse_gate(GATE)
    assert gate.to_rules() == RULES
    assert Gate.from_rules(RULES) == gate
    assert parse_gate(gate.to_document()) == gate


def test_the_order_rules_are_given_in_does_not_change_the_gate():
    assert Gate.from_rules(reversed(RULES)).to_rules() == RULES


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"heldout_perplexity": {"max_relative_chnage": -0.01}},
            "gate.heldout_perplexity.max_relative_chnage: not a rule (did you mean max_relative_change?)",
        ),
        ({"heldout": {"max_delta": 1}}, "gate.heldout: unknown metric (did you mean heldout_perplexity?)"),
        ({"perplexity_of_everything": {"max_delta": 1}}, "gate.perplexity_of_everything: unknown metric; the gate's metrics are"),
        ({"heldout_perplexity": {"max_delta": "5%"}}, "gate.heldout_perplexity.max_delta: expected a number"),
        ({"heldout_perplexity": {"max_delta": True}}, "gate.heldout_perplexity.max_delta: expected a number"),
        ({"heldout_perplexity": {"max_delta": float("nan")}}, "gate.heldout_perplexity.max_delta: expected a finite number"),
        ({"heldout_perplexity": -0.01}, "gate.heldout_perplexity: expected a mapping of rule to value"),
        ({"heldout_perplexity": {}}, "gate.heldout_perplexity: empty"),
        ({}, "gate: the gate is empty"),
        (None, "gate: the gate is empty"),
        (["heldout_perplexity"], "gate: expected a mapping of metric to rules"),
        ({"lm_eval": {"hellaswag": {"min_detla": -0.01}}}, "gate.lm_eval.hellaswag.min_detla: not a rule (did you mean min_delta?)"),
        ({"lm_eval": {"min_delta": -0.01}}, "gate.lm_eval.min_delta: min_delta is a rule, not a task name"),
        (
            {"lm_eval": {"hellaswag": {"acc": {"min_detla": 0}}}},
            "gate.lm_eval.hellaswag.acc.min_detla: not a rule (did you mean min_delta?)",
        ),
        ({"lm_eval": {"hella swag": {"min_delta": 0}}}, "gate.lm_eval.hella swag: not a task name"),
        ({"lm_eval": []}, "gate.lm_eval: expected a mapping of task to rules"),
        (
            {"heldout_perplexity": {"min_delta": 1, "max_delta": 0}},
            "gate: heldout_perplexity.min_delta=1.0 and heldout_perplexity.max_delta=0.0 contradict each other",
        ),
    ],
)
def test_a_bad_gate_is_an_error_naming_the_field(document, message):
    with pytest.raises(InputError) as raised:
        parse_gate(document)
    assert str(raised.value).startswith(message), raised.value
    assert "\n" not in str(raised.value)


def test_errors_name_the_place_the_caller_gives():
    with pytest.raises(InputError, match=r"^pipeline.yaml: gate.lm_eval.hellaswag.min_detla: not a rule"):
        parse_gate({"lm_eval": {"hellaswag": {"min_detla": 0}}}, "pipeline.yaml: gate")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            ["heldout_perplexity.max_relative_chnage=-0.01"],
            "--rule 'heldout_perplexity.max_relative_chnage=-0.01': max_relative_chnage: not a rule (did you mean max_relative_change?)",
        ),
        (["heldout_perplexity"], "--rule 'heldout_perplexity': expected METRIC.KIND=VALUE"),
        (["heldout_perplexity.max_delta"], "--rule 'heldout_perplexity.max_delta': expected METRIC.KIND=VALUE"),
        (["max_delta=1"], "--rule 'max_delta=1': expected METRIC.KIND=VALUE"),
        (["heldout_perplexity.max_delta=five"], "--rule 'heldout_perplexity.max_delta=five': expected a number after '='"),
        (["heldout_perplexity.max_delta=inf"], "--rule 'heldout_perplexity.max_delta=inf': expected a finite number"),
        (
            ["helout_perplexity.max_delta=1"],
            "--rule 'helout_perplexity.max_delta=1': helout_perplexity: unknown metric (did you mean heldout_perplexity?)",
        ),
        (["lm_eval.min_delta=1"], "--rule 'lm_eval.min_delta=1': lm_eval: write lm_eval.TASK.KIND=VALUE"),
        (["lm_eval.a.b.c.min_delta=1"], "--rule 'lm_eval.a.b.c.min_delta=1': lm_eval.a.b.c: write lm_eval.TASK.KIND=VALUE"),
        (
            ["general_perplexity.python.max_delta=1"],
            "--rule 'general_perplexity.python.max_delta=1': general_perplexity has no tasks or scores",
        ),
        (["heldout_perplexity.max_delta=1", "heldout_perplexity.max_delta=2"], "--rule: heldout_perplexity.max_delta is given twice"),
        ([], "--rule: the gate is empty"),
    ],
)
def test_a_bad_flat_rule_is_an_error_naming_the_rule(rules, message):
    with pytest.raises(InputError) as raised:
        Gate.from_rules(rules)
    assert str(raised.value).startswith(message), raised.value


# --- checking ----------------------------------------------------------------------------------------


def test_a_model_that_improves_and_forgets_little_passes():
    results = parse_gate(GATE).check(evaluation())
    assert passed(results)
    by_rule = {(r.rule, r.evaluation_metric): r for r in results}
    heldout = by_rule[(RULES[0], "perplexity")]
    assert (heldout.dataset, heldout.base, heldout.trained) == ("heldout", 10.0, 9.0)
    assert heldout.measured == pytest.approx(-0.1)
    assert by_rule[(RULES[1], "perplexity")].measured == pytest.approx(0.025)
    # a task rule bounds every score of the task, one result each; a score rule only its score
    assert sorted(m for rule, m in by_rule if rule == RULES[2]) == ["lm_eval:acc", "lm_eval:acc_norm"]
    assert [m for rule, m in by_rule if rule == RULES[3]] == ["lm_eval:acc_norm"]
    assert by_rule[(RULES[3], "lm_eval:acc_norm")].measured == pytest.approx(0.01)
    assert "-10.000% (must be at most -1.000%)" in heldout.reason


def test_more_forgetting_than_allowed_fails_with_the_measured_value():
    results = parse_gate(GATE).check(evaluation(general=(20.0, 21.2)))
    assert not passed(results)
    (failed,) = [r for r in results if not r.passed]
    assert failed.rule == "general_perplexity.max_relative_change=0.05"
    assert failed.measured == pytest.approx(0.06)
    assert "python-docs: 20 -> 21.2, relative change +6.000% (must be at most +5.000%)" in failed.reason


def test_a_held_out_perplexity_that_did_not_improve_enough_fails():
    results = Gate.from_rules(["heldout_perplexity.max_relative_change=-0.01"]).check(evaluation(heldout=(10.0, 9.95)))
    assert [(r.passed, r.measured) for r in results] == [(False, pytest.approx(-0.005))]


@pytest.mark.parametrize(
    ("rule", "passes"),
    [
        ("lm_eval.hellaswag.acc.min_delta=-0.01", True),  # 0.50 -> 0.495
        ("lm_eval.hellaswag.acc.min_delta=0", False),
        ("lm_eval.hellaswag.acc.max_delta=-0.01", False),
        ("lm_eval.hellaswag.acc.max_delta=0", True),
        ("lm_eval.hellaswag.acc.min_relative_change=-0.02", True),  # -1%
        ("lm_eval.hellaswag.acc.min_relative_change=-0.005", False),
        ("lm_eval.hellaswag.acc.max_relative_change=-0.02", False),
    ],
)
def test_each_kind_bounds_its_measure(rule, passes):
    (result,) = Gate.from_rules([rule]).check(evaluation(acc=(0.50, 0.495)))
    assert result.passed is passes, result.reason


@pytest.mark.parametrize(
    ("rules", "rows", "reason"),
    [
        (
            ["general_perplexity.max_relative_change=0.05"],
            measured("perplexity", "heldout", "domain", 10, 9),
            "the evaluation has no perplexity on a general dataset",
        ),
        (["heldout_perplexity.max_relative_change=0"], [], "the evaluation has no perplexity on a domain dataset"),
        (
            ["sft_eval_loss.max_relative_change=0"],
            evaluation(),
            "the evaluation has no sft_eval_loss on chat rows (role chat): evaluate an sft run, or pass --chat-data",
        ),
        (
            ["lm_eval.arc_easy.min_delta=0"],
            evaluation(),
            "the evaluation has no lm-evaluation-harness scores of task arc_easy: evaluate with --task arc_easy",
        ),
        (["lm_eval.hellaswag.f1.min_delta=0"], evaluation(), "the evaluation has no score f1 of the lm-evaluation-harness task hellaswag"),
        (
            ["heldout_perplexity.max_relative_change=0"],
            [row("trained", "perplexity", "heldout", 9.0, "domain")],  # evaluated without a base model: no deltas
            "perplexity on heldout was measured on the trained model only",
        ),
        (
            ["heldout_perplexity.max_relative_change=0"],
            [row("base", "perplexity", "heldout", 9.0, "domain")],
            "perplexity on heldout was not measured on the trained model",
        ),
        (
            ["lm_eval.hellaswag.min_delta=0"],
            measured("lm_eval:acc", "hellaswag", "task", math.nan, 0.5),  # a score the harness could not compute
            "lm_eval:acc on hellaswag is not a finite number (base nan, trained 0.5)",
        ),
        (
            ["lm_eval.gsm8k.min_delta=0"],  # two filters of one score collapse to one metric name: which is meant is unknown
            measured("lm_eval:exact_match", "gsm8k", "task", 0.1, 0.2) + measured("lm_eval:exact_match", "gsm8k", "task", 0.3, 0.2),
            "the evaluation holds 2 base values of lm_eval:exact_match on gsm8k",
        ),
        (
            ["lm_eval.hellaswag.min_relative_change=0"],
            measured("lm_eval:acc", "hellaswag", "task", 0.0, 0.5),
            "lm_eval:acc on hellaswag is 0 on the base model: a relative change is undefined",
        ),
    ],
)
def test_a_metric_the_evaluation_cannot_give_fails_its_rule_with_the_reason(rules, rows, reason):
    results = Gate.from_rules(rules).check(rows)
    assert not passed(results)
    assert len(results) == 1 and not results[0].passed and results[0].measured is None
    assert results[0].reason.startswith(reason), results[0].reason


def test_a_rule_that_fails_is_not_hidden_by_those_that_pass():
    results = Gate.from_rules([*RULES, "sft_eval_loss.max_delta=0"]).check(evaluation())
    assert [r.passed for r in results].count(False) == 1 and not passed(results)


def test_a_decision_without_results_is_not_a_pass():
    assert passed([]) is False


def test_a_result_is_plain_json():
    (result,) = Gate.from_rules(["heldout_perplexity.max_delta=0"]).check(evaluation())
    assert result.to_dict() == {
        "rule": "heldout_perplexity.max_delta=0.0",
        "metric": "heldout_perplexity",
        "kind": "max_delta",
        "threshold": 0.0,
        "dataset": "heldout",
        "evaluation_metric": "perplexity",
        "base": 10.0,
        "trained": 9.0,
        "measured": -1.0,
        "passed": True,
        "reason": "perplexity on heldout: 10 -> 9, delta -1 (must be at most +0)",
    }
