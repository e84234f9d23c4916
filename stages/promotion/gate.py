"""The promotion gate: rules on an evaluation's numbers that a trained model must pass to be promoted.

A gate is a mapping of metric to rules, as a pipeline config declares it:

    gate:
      heldout_perplexity: {max_relative_change: -0.01}   # held-out perplexity must improve by 1%
      general_perplexity: {max_relative_change: 0.05}    # the forgetting probe may rise 5% at most
      lm_eval: {hellaswag: {min_delta: -0.01}}           # every hellaswag score may fall 0.01 at most

or as flat rules, one per `--rule` (what a pipeline passes the promote stage):
`heldout_perplexity.max_relative_change=-0.01`, `lm_eval.hellaswag.min_delta=-0.01`.

Metrics (rows of the evaluate stage's `evaluation` table, measured on both the trained and the base model):
- heldout_perplexity: perplexity on the domain dataset (role domain: the training run's held-out split, or --data);
- general_perplexity: perplexity on the general corpus (role general: the forgetting probe);
- sft_eval_loss: the loss on held-out chat rows (role chat);
- lm_eval.TASK: every score of an lm-evaluation-harness task (role task); lm_eval.TASK.SCORE: one of them (acc_norm, say).

Kinds: max_relative_change and min_relative_change bound (trained - base) / base; max_delta and min_delta bound
trained - base. A rule whose metric the evaluation lacks (or lacks on the base model, or holds twice, or as a
non-finite number) fails with the reason: a gate never passes on a number it could not see.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..base.documents import shown
from ..base.errors import InputError

HELDOUT_PERPLEXITY = "heldout_perplexity"
GENERAL_PERPLEXITY = "general_perplexity"
SFT_EVAL_LOSS = "sft_eval_loss"
LM_EVAL = "lm_eval"
METRICS = (HELDOUT_PERPLEXITY, GENERAL_PERPLEXITY, SFT_EVAL_LOSS, LM_EVAL)

MAX_RELATIVE_CHANGE = "max_relative_change"
MIN_RELATIVE_CHANGE = "min_relative_change"
MAX_DELTA = "max_delta"
MIN_DELTA = "min_delta"
KINDS = (MAX_RELATIVE_CHANGE, MIN_RELATIVE_CHANGE, MAX_DELTA, MIN_DELTA)

EXAMPLE = "heldout_perplexity: {max_relative_change: -0.01}"
FLAT_EXAMPLE = "heldout_perplexity.max_relative_change=-0.01"
METRICS_TEXT = "heldout_perplexity, general_perplexity, sft_eval_loss, lm_eval.TASK or lm_eval.TASK.SCORE"
LM_EVAL_PREFIX = "lm_eval:"  # the evaluation table's metric of a harness score: lm_eval:acc, lm_eval:acc_norm, ...


@dataclass(frozen=True)
class Selector:
    """Which rows of the evaluation a metric measures, and how to say what is missing."""

    role: str
    dataset: str | None  # None: every dataset of the role
    matches: Callable[[str], bool]  # on the row's metric
    missing: str  # "the evaluation has no ..." completed


_SIMPLE = {
    HELDOUT_PERPLEXITY: Selector(
        "domain", None, lambda m: m == "perplexity", "perplexity on a domain dataset (role domain): evaluate a cpt run, or pass --data"
    ),
    GENERAL_PERPLEXITY: Selector(
        "general", None, lambda m: m == "perplexity", "perplexity on a general dataset (role general, the forgetting probe)"
    ),
    SFT_EVAL_LOSS: Selector(
        "chat", None, lambda m: m == "sft_eval_loss", "sft_eval_loss on chat rows (role chat): evaluate an sft run, or pass --chat-data"
    ),
}


@dataclass(frozen=True)
class Rule:
    """One bound on one metric: `metric.kind=threshold`."""

    metric: str  # heldout_perplexity, general_perplexity, sft_eval_loss, lm_eval.TASK or lm_eval.TASK.SCORE
    kind: str  # one of KINDS
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.metric}.{self.kind}={self.threshold!r}"

    @property
    def relative(self) -> bool:
        return self.kind in (MAX_RELATIVE_CHANGE, MIN_RELATIVE_CHANGE)

    @property
    def is_maximum(self) -> bool:
        return self.kind in (MAX_RELATIVE_CHANGE, MAX_DELTA)

    def selector(self) -> Selector:
        if self.metric in _SIMPLE:
            return _SIMPLE[self.metric]
        _, task, *score = self.metric.split(".")
        if score:
            wanted = LM_EVAL_PREFIX + score[0]
            return Selector("task", task, lambda m: m == wanted, f"score {score[0]} of the lm-evaluation-harness task {task}")
        return Selector(
            "task",
            task,
            lambda m: m.startswith(LM_EVAL_PREFIX),
            f"lm-evaluation-harness scores of task {task}: evaluate with --task {task}",
        )


@dataclass(frozen=True)
class RuleResult:
    """A rule checked on one dataset (or task score) of an evaluation."""

    rule: str  # the rule as text (Rule.text)
    metric: str
    kind: str
    threshold: float
    dataset: str | None  # the evaluation's dataset or task it was measured on; None when none was found
    evaluation_metric: str | None  # the evaluation table's metric: perplexity, sft_eval_loss, lm_eval:acc, ...
    base: float | None
    trained: float | None
    measured: float | None  # the relative change or delta the rule bounds; None when it could not be computed
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def line(self) -> str:
        """`PASS heldout_perplexity.max_relative_change=-0.01: <reason>`, for the stage's output."""
        return f"{'PASS' if self.passed else 'FAIL'} {self.rule}: {self.reason}"


@dataclass(frozen=True)
class Gate:
    """The rules a trained model must all pass, in a canonical order (so the same gate is the same cache key)."""

    rules: tuple[Rule, ...]

    @classmethod
    def of(cls, rules: Iterable[Rule], where: str) -> Gate:
        """The gate of these rules; an empty gate, a rule given twice or contradicting bounds are errors naming `where`."""
        ordered = sorted(rules, key=_order)
        if not ordered:
            raise InputError(f"{where}: the gate is empty; name at least one rule, e.g. {EXAMPLE}")
        for before, after in zip(ordered, ordered[1:], strict=False):
            if (before.metric, before.kind) == (after.metric, after.kind):
                raise InputError(
                    f"{where}: {before.metric}.{before.kind} is given twice ({before.threshold!r} and {after.threshold!r}); keep one"
                )
        _refuse_contradictions(ordered, where)
        return cls(tuple(ordered))

    @classmethod
    def from_rules(cls, texts: Iterable[str], where: str = "--rule") -> Gate:
        """The gate of flat rules `METRIC.KIND=VALUE` (see the module docstring)."""
        return cls.of([_flat_rule(text, where) for text in texts], where)

    def to_rules(self) -> list[str]:
        return [rule.text for rule in self.rules]

    def to_document(self) -> dict[str, Any]:
        """The gate as the mapping a config declares (parse_gate reads it back)."""
        document: dict[str, Any] = {}
        for rule in self.rules:
            place = document
            for part in rule.metric.split("."):
                place = place.setdefault(part, {})
            place[rule.kind] = rule.threshold
        return document

    def check(self, rows: Iterable[Mapping[str, Any]]) -> list[RuleResult]:
        """Every rule on the evaluation table's rows: one result per dataset (or task score) a rule measures."""
        rows = list(rows)
        return [result for rule in self.rules for result in _check_rule(rule, rows)]


def passed(results: Iterable[RuleResult]) -> bool:
    """The gate's decision: every rule passed (and there was at least one)."""
    results = list(results)
    return bool(results) and all(r.passed for r in results)


# --- declaring a gate --------------------------------------------------------------------------------


def parse_gate(document: Any, where: str = "gate") -> Gate:
    """The gate a config's mapping declares; errors name the field (`gate.heldout_perplexity.max_relative_chnage: ...`)."""
    if document is None or (isinstance(document, Mapping) and not document):
        raise InputError(f"{where}: the gate is empty; name at least one rule, e.g. {EXAMPLE}")
    if not isinstance(document, Mapping):
        raise InputError(f"{where}: expected a mapping of metric to rules, e.g. {EXAMPLE}, found {shown(document)}")
    rules: list[Rule] = []
    for metric, value in document.items():
        at = f"{where}.{_name(metric)}"
        if metric == LM_EVAL:
            rules += _lm_eval_rules(value, at)
        elif metric in _SIMPLE:
            rules += _kind_rules(metric, value, at)
        else:
            raise InputError(f"{at}: {_metric_problem(metric)}")
    return Gate.of(rules, where)


def _lm_eval_rules(value: Any, at: str) -> list[Rule]:
    tasks = _mapping(value, at, "a mapping of task to rules, e.g. lm_eval: {hellaswag: {min_delta: -0.01}}")
    rules = []
    for task, task_rules in tasks.items():
        task_at = f"{at}.{_name(task)}"
        _require_part(task, task_at, "task")
        for key, item in _mapping(task_rules, task_at, "a mapping of rule (or score) to value, e.g. {min_delta: -0.01}").items():
            if key in KINDS:
                rules.append(Rule(f"{LM_EVAL}.{task}", key, _number(item, f"{task_at}.{key}")))
            elif isinstance(item, Mapping):  # a score of the task: lm_eval: {task: {acc_norm: {min_delta: ...}}}
                _require_part(key, f"{task_at}.{_name(key)}", "score")
                rules += _kind_rules(f"{LM_EVAL}.{task}.{key}", item, f"{task_at}.{key}")
            else:
                raise InputError(f"{task_at}.{_name(key)}: {_kind_problem(key)}")
    return rules


def _kind_rules(metric: str, value: Any, at: str) -> list[Rule]:
    rules = []
    for kind, threshold in _mapping(value, at, f"a mapping of rule to value, e.g. {{{MAX_RELATIVE_CHANGE}: -0.01}}").items():
        if kind not in KINDS:
            raise InputError(f"{at}.{_name(kind)}: {_kind_problem(kind)}")
        rules.append(Rule(metric, kind, _number(threshold, f"{at}.{kind}")))
    return rules


def _flat_rule(text: Any, where: str) -> Rule:
    """`METRIC.KIND=VALUE` -> Rule; errors name the rule as given."""
    if not isinstance(text, str):
        raise InputError(f"{where} {shown(text)}: expected METRIC.KIND=VALUE text, e.g. {FLAT_EXAMPLE}")
    at = f"{where} {shown(text)}"
    name, separator, value = text.partition("=")
    parts = name.strip().split(".")
    if not separator or len(parts) < 2:
        raise InputError(f"{at}: expected METRIC.KIND=VALUE, e.g. {FLAT_EXAMPLE}")
    *path, kind = parts
    metric = ".".join(path)
    if path[0] not in METRICS:
        raise InputError(f"{at}: {_name(path[0])}: {_metric_problem(path[0])}")
    if path[0] == LM_EVAL and not 2 <= len(path) <= 3:
        raise InputError(
            f"{at}: {_name(metric)}: write {LM_EVAL}.TASK.KIND=VALUE (every score of the task) or {LM_EVAL}.TASK.SCORE.KIND=VALUE"
        )
    if path[0] != LM_EVAL and len(path) > 1:
        raise InputError(f"{at}: {path[0]} has no tasks or scores: write {path[0]}.KIND=VALUE")
    for part, what in zip(path[1:], ("task", "score"), strict=False):
        _require_part(part, f"{at}: {what} {shown(part)}", what)
    if kind not in KINDS:
        raise InputError(f"{at}: {_name(kind)}: {_kind_problem(kind)}")
    return Rule(metric, kind, _number_text(value.strip(), at))


def _mapping(value: Any, at: str, expected: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise InputError(f"{at}: expected {expected}, found {shown(value)}")
    if not value:
        raise InputError(f"{at}: empty; expected {expected}")
    return value


def _require_part(part: Any, at: str, what: str) -> None:
    """A task or score name: text without '.', '=' or spaces (so the flat form reads it back)."""
    if not isinstance(part, str) or not part or any(c in part for c in ".= \t\n") or not part.isprintable():
        raise InputError(f"{at}: not a {what} name (text without '.', '=' or spaces)")
    if part in KINDS:
        raise InputError(
            f"{at}: {part} is a rule, not a {what} name: the rules of {LM_EVAL} are per task, e.g. {LM_EVAL}.TASK.{part}=VALUE"
        )


def _metric_problem(metric: Any) -> str:
    known = [*_SIMPLE, LM_EVAL]
    return f"unknown metric{_suggest(metric, known)}; the gate's metrics are {METRICS_TEXT}"


def _kind_problem(kind: Any) -> str:
    return f"not a rule{_suggest(kind, KINDS)}; the rules are {', '.join(KINDS)}"


def _number(value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{at}: expected a number (a fraction for a relative change: 0.05 is 5%), found {shown(value)}")
    if not math.isfinite(value):
        raise InputError(f"{at}: expected a finite number, found {value}")
    return float(value)


def _number_text(text: str, at: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{at}: expected a number after '=' (a fraction for a relative change: 0.05 is 5%), found {shown(text)}") from None
    return _number(value, at)


def _refuse_contradictions(rules: list[Rule], where: str) -> None:
    """A minimum above the maximum of the same measure could never pass: a mistake, refused before anything runs."""
    bounds = {(r.metric, r.relative, r.is_maximum): r for r in rules}
    for (metric, relative, is_maximum), low in bounds.items():
        high = bounds.get((metric, relative, True))
        if not is_maximum and high is not None and low.threshold > high.threshold:
            raise InputError(
                f"{where}: {low.text} and {high.text} contradict each other: no value is at least the one and at most the other"
            )


def _order(rule: Rule) -> tuple:
    head = rule.metric.split(".", 1)[0]
    return (METRICS.index(head), rule.metric, KINDS.index(rule.kind))


def _suggest(word: Any, choices: Iterable[str]) -> str:
    if not isinstance(word, str) or len(word) > 100:  # difflib is quadratic in the word's length
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1) or [c for c in choices if word and c.startswith(word)][:1]
    return f" (did you mean {close[0]}?)" if close else ""


def _name(key: Any) -> str:
    return key if isinstance(key, str) and 0 < len(key) <= 60 and key.isprintable() else shown(key, 60)


# --- checking a gate ---------------------------------------------------------------------------------


def _check_rule(rule: Rule, rows: list[Mapping[str, Any]]) -> list[RuleResult]:
    selector = rule.selector()
    found: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        if row.get("role") != selector.role or row.get("model") not in ("base", "trained") or not isinstance(row.get("metric"), str):
            continue
        if (selector.dataset is None or row.get("dataset") == selector.dataset) and selector.matches(row["metric"]):
            values = found.setdefault((str(row.get("dataset")), row["metric"]), {"base": [], "trained": []})
            values[row["model"]].append(row.get("value"))
    if not found:
        return [_result(rule, None, None, None, None, None, False, f"the evaluation has no {selector.missing}")]
    return [_measure(rule, dataset, metric, values) for (dataset, metric), values in sorted(found.items())]


def _measure(rule: Rule, dataset: str, metric: str, values: dict[str, list[float]]) -> RuleResult:
    what = f"{metric} on {dataset}"
    base, trained = values["base"], values["trained"]
    single = {label: found[0] if len(found) == 1 else None for label, found in values.items()}

    def failed(reason: str) -> RuleResult:
        return _result(rule, dataset, metric, single["base"], single["trained"], None, False, reason)

    for label, found in values.items():
        if len(found) > 1:
            return failed(f"the evaluation holds {len(found)} {label} values of {what}: which one the rule means is not clear")
    if not trained:
        return failed(f"{what} was not measured on the trained model")
    if not base:
        return failed(f"{what} was measured on the trained model only: without the base model's value no change can be computed")
    before, after = base[0], trained[0]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)):
        return failed(f"{what} is not a finite number (base {before}, trained {after}): it was not measured")
    if rule.relative and before == 0:
        return failed(f"{what} is 0 on the base model: a relative change is undefined; bound the delta instead")
    measured = (after - before) / before if rule.relative else after - before
    ok = measured <= rule.threshold if rule.is_maximum else measured >= rule.threshold
    shown_value, shown_limit = (
        (f"{measured:+.3%}", f"{rule.threshold:+.3%}") if rule.relative else (f"{measured:+.6g}", f"{rule.threshold:+.6g}")
    )
    change = "relative change" if rule.relative else "delta"
    bound = "at most" if rule.is_maximum else "at least"
    reason = f"{what}: {before:.6g} -> {after:.6g}, {change} {shown_value} (must be {bound} {shown_limit})"
    return _result(rule, dataset, metric, before, after, measured, ok, reason)


def _result(
    rule: Rule,
    dataset: str | None,
    metric: str | None,
    base: float | None,
    trained: float | None,
    measured: float | None,
    ok: bool,
    reason: str,
) -> RuleResult:
    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    return RuleResult(
        rule.text, rule.metric, rule.kind, rule.threshold, dataset, metric, number(base), number(trained), number(measured), ok, reason
    )
