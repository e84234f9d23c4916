"""layer_select --rank-by: inverse (lowest snr first) and random (seeded) controls with the snr ranking's counts and always-trained set."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.base.contracts import SELECTION_JSON_FILE, SELECTION_TABLE_FILE, UNFROZEN_YAML_FILE
from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig, run
from stages.scan.table import read_table_metadata
from stages.selection.document import SelectionDocument
from stages.snr_scan import ScanConfig
from stages.snr_scan import run as run_scan

from .helpers import QUIET, cli


@pytest.fixture(scope="module")
def snr_table(synthetic_model, tmp_path_factory) -> Path:
    """The SNR table of an 8-layer synthetic Llama: 8 tensors per module type to choose from."""
    out = tmp_path_factory.mktemp("ranking-scan") / "snr.parquet"
    run_scan(ScanConfig(model_dir=str(synthetic_model(num_hidden_layers=8)), output=str(out)), QUIET)
    return out


def select(table: Path, out_dir: Path, **options):
    return run(SelectConfig(snr_input=str(table), out_dir=str(out_dir), top_percent=25, **options), StageContext()).detail


def picked(result) -> dict[str, set[str]]:
    """Module type -> the tensors the policy picked."""
    chosen: dict[str, set[str]] = {}
    for e in result.entries:
        if e.picked:
            chosen.setdefault(e.module_type, set()).add(e.tensor_name)
    return chosen


def always(result) -> set[str]:
    return {e.tensor_name for e in result.entries if e.always_train}


def test_the_default_ranking_is_snr_and_its_outputs_record_nothing_new(snr_table, tmp_path):
    select(snr_table, tmp_path / "default")
    select(snr_table, tmp_path / "snr", rank_by="snr")
    for name in (SELECTION_TABLE_FILE, UNFROZEN_YAML_FILE, SELECTION_JSON_FILE):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "snr" / name).read_bytes()
    document = json.loads((tmp_path / "default" / SELECTION_JSON_FILE).read_text())
    assert "rank_by" not in document and "rank_seed" not in document
    assert "ranking" not in read_table_metadata(pq.read_table(tmp_path / "default" / SELECTION_TABLE_FILE))
    assert SelectConfig(snr_input="x").cache_parameters().keys().isdisjoint({"rank_by", "rank_seed"})  # earlier cache keys hold


@pytest.mark.parametrize("policy", ["per-type", "global"])
def test_inverse_takes_the_lowest_snr_with_the_same_counts_and_always_trained(snr_table, tmp_path, policy):
    reference = select(snr_table, tmp_path / "snr", policy=policy)
    inverse = select(snr_table, tmp_path / "inverse", policy=policy, rank_by="inverse")
    if policy == "per-type":
        assert {k: len(v) for k, v in picked(inverse).items()} == {k: len(v) for k, v in picked(reference).items()}
    assert sum(map(len, picked(inverse).values())) == sum(map(len, picked(reference).values()))
    assert always(inverse) == always(reference) == {"lm_head.weight", "model.embed_tokens.weight"}
    groups: dict[str, list] = {}
    for e in inverse.entries:
        if e.rank is not None:
            groups.setdefault(e.module_type if policy == "per-type" else "all", []).append(e)
    for members in groups.values():
        keep = sum(e.picked for e in members)
        lowest = sorted(members, key=lambda e: e.snr)[:keep]
        assert {e.tensor_name for e in members if e.picked} == {e.tensor_name for e in lowest}
    assert next(e for e in inverse.entries if e.picked).reason.endswith(f"by inverse snr (lowest first); the top 25% keeps {keep}")
    assert json.loads((tmp_path / "inverse" / SELECTION_JSON_FILE).read_text())["rank_by"] == "inverse"


def test_random_is_seeded_reproducible_and_keeps_the_counts_and_always_trained(snr_table, tmp_path):
    reference = select(snr_table, tmp_path / "snr")
    first = select(snr_table, tmp_path / "r1", rank_by="random", rank_seed=1)
    again = select(snr_table, tmp_path / "r1-again", rank_by="random", rank_seed=1)
    seeds = [select(snr_table, tmp_path / f"s{seed}", rank_by="random", rank_seed=seed) for seed in range(2, 6)]
    assert (tmp_path / "r1" / UNFROZEN_YAML_FILE).read_bytes() == (tmp_path / "r1-again" / UNFROZEN_YAML_FILE).read_bytes()
    assert picked(first) == picked(again)
    assert any(picked(other) != picked(first) for other in seeds)  # another seed, another draw
    counts = {k: len(v) for k, v in picked(reference).items()}
    assert all({k: len(v) for k, v in picked(r).items()} == counts for r in (first, *seeds))
    assert all(always(r) == always(reference) for r in (first, *seeds))
    # recorded: selection.json, the table's metadata and the reasons; the cache key tells seeds apart
    document = json.loads((tmp_path / "r1" / SELECTION_JSON_FILE).read_text())
    assert (document["rank_by"], document["rank_seed"]) == ("random", 1)
    metadata = read_table_metadata(pq.read_table(tmp_path / "r1" / SELECTION_TABLE_FILE))
    assert json.loads(metadata["ranking"]) == {"rank_by": "random", "rank_seed": 1}
    assert "by random order (seed 1)" in next(e for e in first.entries if e.picked).reason
    assert SelectConfig(snr_input="x", rank_by="random").cache_parameters()["rank_seed"] == 0  # the default seed, recorded


def test_a_random_selection_selects_the_same_again_from_its_document(snr_table, tmp_path):
    """sft --rescan selects again with the policy selection.json records: the ranking and its seed included."""
    first = select(snr_table, tmp_path / "r", rank_by="random", rank_seed=7)
    document = SelectionDocument.from_json((tmp_path / "r" / SELECTION_JSON_FILE).read_bytes(), "selection.json")
    again = run(SelectConfig(snr_input=str(snr_table), out_dir=str(tmp_path / "again"), **document.policy), StageContext()).detail
    assert picked(again) == picked(first)


def test_random_with_the_budget_policy_stays_within_the_budget(snr_table, tmp_path):
    result = run(
        SelectConfig(snr_input=str(snr_table), out_dir=str(tmp_path / "b"), policy="budget", budget_percent=40, rank_by="random"),
        StageContext(),
    ).detail
    assert result.summary["trainable_fraction"] <= 0.40 and result.summary["rank_by"] == "random"
    assert any("by random order (seed 0), fits the 40% parameter budget" in e.reason for e in result.entries)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank_by": "alphabetical"}, "unknown --rank-by 'alphabetical'; choose one of snr, inverse, random"),
        ({"rank_seed": 3}, "--rank-seed seeds --rank-by random, not snr"),
        ({"rank_by": "inverse", "rank_seed": 3}, "--rank-seed seeds --rank-by random, not inverse"),
        ({"rank_by": "random", "rank_seed": -1}, "--rank-seed must be a whole number 0 or more, got -1"),
    ],
)
def test_bad_rankings_are_refused(snr_table, tmp_path, options, message):
    with pytest.raises(InputError) as caught:
        select(snr_table, tmp_path / "bad", **options)
    assert message in str(caught.value)
    assert not (tmp_path / "bad").exists()


def test_the_command_line_refuses_an_unknown_ranking(snr_table, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal of a choice
        cli(capsys, "select", str(snr_table), "-o", str(tmp_path / "out"), "--rank-by", "lowest")
    assert exited.value.code == 2 and "argument --rank-by: invalid choice: 'lowest'" in capsys.readouterr().err
    code, out, err = cli(capsys, "select", str(snr_table), "-o", str(tmp_path / "out"), "--rank-by", "random", "--rank-seed", "4")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / SELECTION_JSON_FILE).read_text())["rank_seed"] == 4
