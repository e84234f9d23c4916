"""The statistics of a comparison over seeds: mean ± standard deviation per arm, and paired 95% t-intervals.

An arm's difference to the baseline arm (Spectrum-25) is paired by seed: the seed fixes the data
order (and the random arm's draw), so arm − baseline per seed removes what the seed alone moves.
The interval is mean(d) ± t(0.975, n − 1) · sd(d) / √n over the n seeds both arms ran; it
"excludes zero" when both ends have the same sign. Differences that are the same for every seed
(no spread: a zero-width interval) are reported as such and never as significant. The t quantile comes from a table (n − 1 ≤ 30)
and a Cornish–Fisher expansion beyond (within 1e-4 there), so no statistics package is needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

BASELINE = "spectrum-25"
# The metrics a summary carries, as the comparison table names them (lower is better for each).
METRICS = ("step_seconds", "train_seconds", "peak_memory_mib", "final_loss", "heldout_perplexity", "general_perplexity")
# How the tables show them: metric, heading, digits.
COLUMNS = (
    ("heldout_perplexity", "held-out ppl", 2),
    ("general_perplexity", "general ppl", 2),
    ("final_loss", "final loss", 3),
    ("step_seconds", "s/step", 3),
    ("peak_memory_mib", "peak MiB", 0),
)
# t(0.975, df) for df = 1..30.
_T975 = (
    12.706204736,
    4.302652730,
    3.182446305,
    2.776445105,
    2.570581836,
    2.446911851,
    2.364624252,
    2.306004135,
    2.262157163,
    2.228138852,
    2.200985160,
    2.178812830,
    2.160368656,
    2.144786688,
    2.131449546,
    2.119905299,
    2.109815578,
    2.100922040,
    2.093024054,
    2.085963447,
    2.079613845,
    2.073873068,
    2.068657610,
    2.063898562,
    2.059538553,
    2.055529439,
    2.051830516,
    2.048407142,
    2.045229642,
    2.042272456,
)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (the two-sided 95% interval's factor)."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least one degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384)
    return z + sum(term / df**power for power, term in enumerate(terms, start=1))


@dataclass(frozen=True)
class Spread:
    """A metric over seeds: its mean and sample standard deviation (None with one seed)."""

    mean: float
    sd: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


@dataclass(frozen=True)
class Interval:
    """A paired difference (arm − baseline) over seeds: its mean and 95% t-interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def constant(self) -> bool:
        """Every seed gave the same difference: a t-interval needs spread, so it says nothing here (not significant)."""
        return self.low == self.high

    @property
    def excludes_zero(self) -> bool:
        return not self.constant and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean, "low": self.low, "high": self.high, "n": self.n,
            "excludes_zero": self.excludes_zero, "constant": self.constant,
        }  # fmt: skip


def spread(values: Sequence[float]) -> Spread | None:
    """Mean and standard deviation of `values` (None when there are none)."""
    if not values:
        return None
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def paired_interval(differences: Sequence[float]) -> Interval | None:
    """The 95% t-interval of the mean of paired differences (None under two pairs: no spread to measure)."""
    n = len(differences)
    if n < 2:
        return None
    mean = statistics.fmean(differences)
    half = t_quantile_975(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def summarize(rows: Iterable[dict[str, Any]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Per method (in the rows' order): its seeds, each metric's spread, and each metric's paired difference to `baseline`.

    Rows are the comparison table's, one per method and seed (a row without a seed counts as seed None).
    `differences` is None for the baseline itself and when the baseline did not run.
    """
    by_method: dict[str, dict[Any, dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row.get("seed")] = row
    base = by_method.get(baseline)
    summary = []
    for method, seeds in by_method.items():
        entry: dict[str, Any] = {"method": method, "seeds": sorted(seeds, key=lambda s: (s is None, s))}
        entry["metrics"] = {m: _dict(spread(_values(seeds.values(), m))) for m in METRICS}
        entry["trainable_share"] = _dict(spread(_values(seeds.values(), "trainable_share")))
        if base is None or method == baseline:
            entry["differences"] = None
        else:
            paired = [seed for seed in entry["seeds"] if seed in base]
            entry["differences"] = {m: _dict(paired_interval(_differences(seeds, base, paired, m))) for m in METRICS}
        summary.append(entry)
    return summary


def significant(summary: list[dict[str, Any]], baseline: str = BASELINE) -> list[str]:
    """One line per arm and metric whose paired interval excludes zero (`lower` or `higher` than the baseline)."""
    found = []
    for entry in summary:
        for metric, heading, digits in COLUMNS:
            interval = (entry["differences"] or {}).get(metric)
            if interval and interval["excludes_zero"]:
                side = "lower" if interval["high"] < 0 else "higher"
                found.append(f"{entry['method']}: {heading} {side} than {baseline} by {interval_text(interval, digits)}")
    return found


def spread_text(spread: dict[str, Any] | None, digits: int) -> str:
    """`mean ± sd` (`mean` with one seed, `–` without a value)."""
    if spread is None:
        return "–"
    return f"{spread['mean']:.{digits}f}" + (f" ± {spread['sd']:.{digits}f}" if spread["sd"] is not None else "")


def interval_text(interval: dict[str, Any] | None, digits: int) -> str:
    """`+mean [+low, +high]`, with ` *` when the interval excludes zero (`–` without an interval)."""
    if interval is None:
        return "–"
    if interval.get("constant"):
        return f"{interval['mean']:+.{digits}f} (the same every seed)"
    mark = " *" if interval["excludes_zero"] else ""
    return f"{interval['mean']:+.{digits}f} [{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]{mark}"


def spread_table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the mean ± sd table: per method, its seed count and each metric's spread (markdown and report)."""
    header = ["method", "seeds", *(heading for _, heading, _ in COLUMNS)]
    rows = [[str(e["method"]), str(len(e["seeds"])), *(spread_text(e["metrics"][m], d) for m, _, d in COLUMNS)] for e in summary]
    return header, rows


def difference_table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """The header and rows of the paired-difference table (None when the baseline did not run: nothing is paired)."""
    compared = [entry for entry in summary if entry["differences"] is not None]
    if not compared:
        return None
    header = ["method", *(heading for _, heading, _ in COLUMNS)]
    return header, [[str(e["method"]), *(interval_text(e["differences"][m], d) for m, _, d in COLUMNS)] for e in compared]


def _differences(arm: dict[Any, dict[str, Any]], base: dict[Any, dict[str, Any]], seeds: list[Any], metric: str) -> list[float]:
    """arm − base for `metric`, per seed both measured."""
    pairs = ((arm[seed].get(metric), base[seed].get(metric)) for seed in seeds)
    return [a - b for a, b in pairs if _number(a) and _number(b)]


def _values(rows: Iterable[dict[str, Any]], metric: str) -> list[float]:
    return [row[metric] for row in rows if _number(row.get(metric))]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _dict(value: Spread | Interval | None) -> dict[str, Any] | None:
    return None if value is None else value.to_dict()
