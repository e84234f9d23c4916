"""promote stage: the promotion gate, checked on what the evaluate stage measured.

The gate's rules (--rule METRIC.KIND=VALUE, repeatable; stages/promotion/gate.py) are checked on the
`evaluation` table of an evaluate run (--evaluate-run RUN): held-out perplexity must improve, the
forgetting probe may not rise too far, an lm-eval score may not fall. The decision, with every rule and
the value it measured, is the stage's decision.json in the store; a metric the evaluation lacks fails
its rule with the reason. A failed gate is a decision, not an error: the stage succeeds (exit 0) and
its decision says FAILED; what a line does with it (promote or keep production) is the line's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .base.contracts import DECISION_FILE, EVALUATE, EVALUATION_TABLE, PROMOTE
from .base.errors import InputError
from .base.parquet import read_parquet
from .core.cli import stage_main
from .core.execution import Produced, StageRun, execute_stage, require_store_in
from .core.stage import From, Stage, StageConfig, StageContext, StageResult, option
from .promotion.gate import FLAT_EXAMPLE, METRICS_TEXT, Gate, passed
from .store import StageRef, read_output, read_table_output, resolve_run_reference, succeeded_manifest


@dataclass
class PromoteConfig(StageConfig):
    evaluate_run: StageRef | None = option(
        metavar="RUN",
        default=None,
        wired=From(EVALUATE),
        help="the evaluate run (RUN or RUN/evaluate.STEP) whose evaluation the gate checks",
    )
    rules: list[str] = option(
        "--rule",
        default_factory=list,
        cache=True,
        metavar="METRIC.KIND=VALUE",
        help=f"a rule of the gate (repeatable), e.g. {FLAT_EXAMPLE}; metrics: {METRICS_TEXT}; "
        "kinds: max_relative_change, min_relative_change, max_delta, min_delta",
    )


def check(config: PromoteConfig) -> None:
    """The options alone: an evaluate run and a gate of well-formed rules."""
    gate_of(config)


def gate_of(config: PromoteConfig) -> Gate:
    if config.evaluate_run is None:
        raise InputError("nothing to check: pass --evaluate-run RUN, the evaluate run whose numbers the gate checks")
    if not config.rules:
        raise InputError(f"the gate has no rules: pass --rule METRIC.KIND=VALUE (repeatable), e.g. --rule {FLAT_EXAMPLE}")
    return Gate.from_rules(config.rules)


def run(config: PromoteConfig, context: StageContext) -> StageResult[dict[str, Any]]:
    store = require_store_in(context, PROMOTE)
    gate = gate_of(config)
    evaluation = succeeded_manifest(
        store, *resolve_run_reference(config.evaluate_run, EVALUATE, "--evaluate-run"), "evaluation for the promotion gate"
    )
    evaluated = StageRef.of(evaluation)  # the run that measured (a reuse record is followed)
    data, table_info = read_table_output(store, evaluation, EVALUATION_TABLE)
    # The decision names the evaluate run, so the run is part of what determines it (and of the cache key).
    parameters = {"rules": gate.to_rules(), "evaluate_run": str(evaluated)}

    def produce(stage: StageRun) -> Produced[dict[str, Any]]:
        rows = read_parquet(data).to_pylist()
        decision = decide(gate, rows, evaluated)
        return Produced([stage.put_bytes(DECISION_FILE, _json(decision))], decision)

    outcome = execute_stage(PROMOTE, context, parameters, [table_info], produce)
    decision = json.loads(read_output(store, outcome.manifest, DECISION_FILE)[0])
    return StageResult(PROMOTE, (*report(decision), outcome.describe(store)), outcome.manifest, outcome.cached, detail=decision)


def decide(gate: Gate, rows: list[dict[str, Any]], evaluated: StageRef) -> dict[str, Any]:
    """decision.json: whether the gate passed, the evaluate run it was checked on, the gate, and each rule's result
    (one per dataset or task score the rule measured)."""
    results = gate.check(rows)
    return {"passed": passed(results), "evaluate_run": str(evaluated), "gate": gate.to_rules(), "rules": [r.to_dict() for r in results]}


def report(decision: dict[str, Any]) -> list[str]:
    results = decision["rules"]
    failed = sum(not r["passed"] for r in results)
    verdict = "PASSED" if decision["passed"] else f"FAILED ({failed} of {len(results)} checks)"
    lines = [f"promotion gate on evaluate run {decision['evaluate_run']}: {verdict}"]
    return lines + [f"  {'PASS' if r['passed'] else 'FAIL'} {r['rule']}: {r['reason']}" for r in results]


def _json(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, allow_nan=False) + "\n").encode()


STAGE = Stage(
    name=PROMOTE,
    command="promote",
    config=PromoteConfig,
    run=run,
    description=__doc__,
    check=check,
)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE))
