"""spectrum compare over seeds: the paired t-intervals against hand-computed numbers, the summary, the controls' options."""

from __future__ import annotations

import math

import pytest

from stages import compare
from stages.base.errors import InputError
from stages.compare_stats import interval_text, paired_interval, significant, spread, summarize, t_quantile_975
from stages.layer_select import SelectConfig


def test_the_t_quantile_matches_scipy_within_1e_4():
    stats = pytest.importorskip("scipy.stats")  # a check only: the code needs no scipy
    for df in range(1, 201):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-8 if df <= 30 else 1e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_a_paired_interval_by_hand():
    # differences -0.5, -0.4, -0.5: mean -0.46667, sd 0.057735, se 0.033333, t(0.975, 2) = 4.302653, half-width 0.143422
    interval = paired_interval([10.0 - 10.5, 10.2 - 10.6, 10.4 - 10.9])
    assert interval.n == 3 and interval.mean == pytest.approx(-0.466667, abs=1e-6)
    assert interval.low == pytest.approx(-0.610088, abs=1e-6) and interval.high == pytest.approx(-0.323245, abs=1e-6)
    assert interval.excludes_zero
    # differences 0.1, -0.3: mean -0.1, sd 0.282843, se 0.2, t(0.975, 1) = 12.706205: [-2.641241, 2.441241]
    wide = paired_interval([0.1, -0.3])
    assert (wide.low, wide.high) == (pytest.approx(-2.641241, abs=1e-6), pytest.approx(2.441241, abs=1e-6))
    assert not wide.excludes_zero
    assert paired_interval([0.2]) is None and paired_interval([]) is None  # no spread to measure
    same = paired_interval([5.0, 5.0, 5.0])  # e.g. a memory peak that no seed moves: a zero-width interval says nothing
    assert same.constant and not same.excludes_zero and interval_text(same.to_dict(), 0) == "+5 (the same every seed)"
    assert spread([1.0, 2.0, 4.0]).sd == pytest.approx(math.sqrt(7 / 3)) and spread([3.0]).sd is None and spread([]) is None


def row(method: str, seed: int, heldout: float, **values) -> dict:
    return {"method": method, "seed": seed, "heldout_perplexity": heldout, "trainable_share": 0.3, **values}


def test_the_summary_pairs_by_seed_and_skips_what_only_one_side_has():
    rows = [
        row("spectrum-25", 0, 10.5),
        row("spectrum-25", 1, 10.6),
        row("spectrum-25", 2, 10.9),
        row("spectrum-25-random", 2, 10.4),  # the order of the rows does not matter: the seed pairs them
        row("spectrum-25-random", 0, 10.0),
        row("spectrum-25-random", 1, 10.2),
        row("spectrum-25-random", 3, 99.0),  # the baseline has no seed 3: not paired
        row("lora", 0, 11.0, general_perplexity=None),
    ]
    summary = {entry["method"]: entry for entry in summarize(rows)}
    assert list(summary) == ["spectrum-25", "spectrum-25-random", "lora"]
    assert summary["spectrum-25"]["differences"] is None and summary["spectrum-25"]["seeds"] == [0, 1, 2]
    heldout = summary["spectrum-25-random"]["differences"]["heldout_perplexity"]
    assert heldout["n"] == 3 and heldout["low"] == pytest.approx(-0.610088, abs=1e-6) and heldout["excludes_zero"] is True
    assert summary["spectrum-25-random"]["metrics"]["heldout_perplexity"]["n"] == 4  # its own spread: every seed it ran
    assert summary["spectrum-25"]["metrics"]["heldout_perplexity"]["mean"] == pytest.approx(32 / 3)
    assert summary["lora"]["differences"]["heldout_perplexity"] is None  # one pair: no interval
    assert summary["lora"]["metrics"]["general_perplexity"] is None
    assert all(entry["differences"] is None for entry in summarize([row("full", 0, 9.0), row("full", 1, 9.1)]))  # no baseline


def test_the_markdown_shows_spreads_intervals_and_what_is_significant():
    rows = [row("spectrum-25", s, h) for s, h in enumerate((10.5, 10.6, 10.9))]
    rows += [row("spectrum-25-random", s, h) for s, h in enumerate((10.0, 10.2, 10.4))]
    rows += [row("spectrum-25-inverse", s, h) for s, h in enumerate((10.6, 10.3, 11.0))]
    summary = summarize(rows)
    text = compare.summary_markdown(summary)
    assert "Mean ± standard deviation over 3 seeds:" in text
    assert "| spectrum-25 | 3 | 10.67 ± 0.21 | – | – | – | – |" in text
    assert "| spectrum-25-random | -0.47 [-0.61, -0.32] * | – | – | – | – |" in text
    assert "| spectrum-25-inverse | -0.03 [-0.61, +0.54] | – | – | – | – |" in text  # differences 0.1, -0.3, 0.1: sd 0.2309
    assert significant(summary) == ["spectrum-25-random: held-out ppl lower than spectrum-25 by -0.47 [-0.61, -0.32] *"]
    alone = compare.summary_markdown(summarize([row("full", 0, 9.0), row("full", 1, 9.1)]))
    assert alone.rstrip().endswith("No paired differences: spectrum-25 is not among the arms.")


def full_row(**overrides) -> dict:
    values = dict(method="full", seed=0, trainable_share=1.0, step_seconds=0.5, time_ratio=1.0, peak_memory_mib=900.0, memory_ratio=1.0)
    values.update(final_loss=2.5, heldout_perplexity_base=12.0, heldout_perplexity=10.0, general_perplexity_base=9.0)
    return {**values, "general_perplexity": 9.5, **overrides}


def test_the_per_seed_table_has_a_seed_column_only_with_more_than_one_seed():
    one = compare.markdown_table([full_row()]).splitlines()
    assert (
        one[0].startswith("| method | trainable |")
        and one[2] == "| full | 100.0% | 0.500 | 1.00× | 900 | 1.00× | 2.500 | 12.00 → 10.00 | 9.00 → 9.50 |"
    )
    two = compare.markdown_table([full_row(), full_row(seed=1)]).splitlines()
    assert two[0].startswith("| method | seed | trainable |") and two[1].count("---") == 10
    assert two[3].startswith("| full | 1 | 100.0% |")


def config(**overrides) -> compare.CompareConfig:
    return compare.CompareConfig(model="m", data="d", **overrides)


def test_the_controls_select_as_spectrum_25_does_but_for_their_ranking_or_embeddings():
    options = {name: compare.stage_options(compare.METHODS[name], config(), seed=2) for name in compare.METHODS}
    reference = options["spectrum-25"]["layer_select"]
    assert reference == {"top_percent": 25.0, "depth_aware": False}  # as before: its arms' cache keys hold
    assert options["spectrum-25-random"]["layer_select"] == {**reference, "rank_by": "random", "rank_seed": 2}
    assert options["spectrum-25-inverse"]["layer_select"] == {**reference, "rank_by": "inverse"}
    assert options["spectrum-25-no-embeddings"]["layer_select"] == {**reference, "always_train": []}
    assert all(o["cpt"]["seed"] == 2 for o in options.values())
    assert compare.stage_options(compare.METHODS["spectrum-25-random"], config(seed=5))["layer_select"]["rank_seed"] == 5
    for name in ("spectrum-25-random", "spectrum-25-inverse", "spectrum-25-no-embeddings"):  # each a valid selection
        SelectConfig(snr_run="scan", **options[name]["layer_select"])


def test_seeds_name_the_runs_and_enter_the_cache_key_only_above_one():
    method = compare.METHODS["lora"]
    assert compare.arm_run_id("c", method, 0, config()) == "c-lora"  # one seed: today's run ids
    assert compare.arm_run_id("c", method, 1, config(seeds=3)) == "c-lora-s1"
    assert "seeds" not in config().cache_parameters() and config(seeds=3).cache_parameters()["seeds"] == 3
    assert config(seeds=3, seed=4).training_seeds == [4, 5, 6]


@pytest.mark.parametrize(
    ("options", "message"), [({"seeds": 0}, "--seeds must be a whole number 1 or more"), ({"seed": -1}, "--seed must be 0")]
)
def test_bad_seeds_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        compare.check(config(**options))
