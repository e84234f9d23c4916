"""The layer_select stage: reference-exact per-type policy, other policies, always-train roles, refusals."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from stages.base.contracts import SELECTION_JSON_FILE, SELECTION_TABLE_FILE, UNFROZEN_YAML_FILE
from stages.base.errors import InputError, OutputExistsError
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig, run
from stages.scan.table import load_reference_json
from stages.snr_scan import ScanConfig
from stages.snr_scan import run as run_scan
from stages.weights.naming import layer_index

from .helpers import LLAMA_JSON, LLAMA_YAML_50, QUIET, TINYLLAMA_JSON

OUTPUTS = (SELECTION_TABLE_FILE, UNFROZEN_YAML_FILE, SELECTION_JSON_FILE)


def select(source: Path, out_dir: Path, **options):
    return run(SelectConfig(snr_input=str(source), out_dir=str(out_dir), **options), StageContext()).detail


def selection_rows(out_dir: Path) -> list[dict]:
    return pq.read_table(out_dir / SELECTION_TABLE_FILE).to_pylist()


def yaml_entries(out_dir: Path) -> list[str]:
    return yaml.safe_load((out_dir / UNFROZEN_YAML_FILE).read_text())["unfrozen_parameters"]


def summary_of(out_dir: Path) -> dict:
    return json.loads((out_dir / SELECTION_JSON_FILE).read_text())


def _to_flat(sorted_path: Path, out: Path) -> Path:
    data = json.loads(sorted_path.read_text())
    flat = {name: {"snr": snr, "type": kind} for kind, members in data.items() for name, snr in members.items()}
    out.write_text(json.dumps(flat, indent=4))  # json writes Infinity / NaN tokens as the reference does
    return out


def _to_sorted(flat_path: Path, out: Path) -> Path:
    data = json.loads(flat_path.read_text())
    grouped: dict[str, dict[str, float]] = {}
    for name, value in data.items():
        grouped.setdefault(value["type"], {})[name] = value["snr"]
    out.write_text(json.dumps(grouped, indent=4))
    return out


# --- the reference policy on reference files ---------------------------------------------------


def test_yaml_is_byte_identical_to_the_reference_tool(tmp_path):
    select(LLAMA_JSON, tmp_path / "sel", top_percent=50)
    assert (tmp_path / "sel" / UNFROZEN_YAML_FILE).read_bytes() == LLAMA_YAML_50.read_bytes()


def test_flat_layout_of_the_same_data_gives_the_same_yaml(tmp_path):
    flat = _to_flat(LLAMA_JSON, tmp_path / "flat.json")
    assert "Infinity" in flat.read_text()
    select(flat, tmp_path / "sel", top_percent=50)
    assert (tmp_path / "sel" / UNFROZEN_YAML_FILE).read_bytes() == LLAMA_YAML_50.read_bytes()


@pytest.mark.parametrize("percent", [25, 50, 33.3, 100])
def test_flat_and_sorted_tinyllama_give_the_same_selection(tmp_path, percent):
    as_sorted = _to_sorted(TINYLLAMA_JSON, tmp_path / "sorted.json")
    a = select(TINYLLAMA_JSON, tmp_path / "flat-sel", top_percent=percent)
    b = select(as_sorted, tmp_path / "sorted-sel", top_percent=percent)
    assert (tmp_path / "flat-sel" / UNFROZEN_YAML_FILE).read_bytes() == (tmp_path / "sorted-sel" / UNFROZEN_YAML_FILE).read_bytes()
    assert a.summary["trainable_tensors"] == b.summary["trainable_tensors"]


@pytest.mark.parametrize("percent", [25, 50, 33.3, 10, 100])
def test_per_type_counts_follow_the_reference_rule(tmp_path, percent):
    entries = load_reference_json(TINYLLAMA_JSON)
    assert len(entries) == 201 and any(math.isinf(e.snr) for e in entries)  # Infinity tokens parsed
    counts = Counter(e.module_type for e in entries)
    result = select(TINYLLAMA_JSON, tmp_path / "sel", top_percent=percent, always_train=[])
    picked = Counter(e.module_type for e in result.entries if e.picked)
    for kind, count in counts.items():
        assert picked.get(kind, 0) == int(count * percent / 100), kind
    # within each type the picked ones are exactly the highest snr
    for kind in counts:
        members = [e for e in result.entries if e.module_type == kind]
        chosen = [e.snr for e in members if e.picked]
        others = [e.snr for e in members if not e.picked]
        if chosen and others:
            assert min(chosen) >= max(others)


def test_per_type_picks_in_descending_snr_order_in_the_yaml(tmp_path):
    select(TINYLLAMA_JSON, tmp_path / "sel", top_percent=50)
    snr = {e.name: e.snr for e in load_reference_json(TINYLLAMA_JSON)}
    text = (tmp_path / "sel" / UNFROZEN_YAML_FILE).read_text().splitlines()
    assert text[:3] == ["unfrozen_parameters:", "- ^lm_head.weight$", "- ^model.embed_tokens.weight$"]
    sections: dict[str, list[str]] = {}
    current = None
    for line in text[3:]:
        if line.startswith("# "):
            current = line[2:].removesuffix(" layers")
            sections[current] = []
        else:
            sections[current].append(line.removeprefix("- "))
    assert sections["mlp.down_proj"] and len(sections["mlp.down_proj"]) == 11
    for names in sections.values():
        values = [snr[n] for n in names]
        assert values == sorted(values, reverse=True)


def test_reference_json_with_nan_tokens_loads(tmp_path):
    source = tmp_path / "snr.json"
    source.write_text(
        '{"model.layers.0.mlp.up_proj": {"snr": NaN, "type": "mlp.up_proj"},'
        ' "model.layers.1.mlp.up_proj": {"snr": 2.5, "type": "mlp.up_proj"},'
        ' "model.layers.2.mlp.up_proj": {"snr": 1.5, "type": "mlp.up_proj"},'
        ' "model.layers.0.input_layernorm": {"snr": Infinity, "type": "input_layernorm"}}'
    )
    entries = {e.name: e.snr for e in load_reference_json(source)}
    assert math.isnan(entries["model.layers.0.mlp.up_proj"]) and entries["model.layers.0.input_layernorm"] == math.inf
    select(source, tmp_path / "sel", top_percent=100, always_train=[])
    assert set(yaml_entries(tmp_path / "sel")) == set(entries)


def test_global_policy_on_a_reference_json(tmp_path):
    result = select(TINYLLAMA_JSON, tmp_path / "sel", policy="global", top_percent=25, always_train=[])
    entries = load_reference_json(TINYLLAMA_JSON)
    keep = int(len(entries) * 25 / 100)
    picked = [e for e in result.entries if e.picked]
    assert len(picked) == keep
    threshold = sorted((e.snr for e in entries), reverse=True)[keep - 1]
    assert all(e.snr >= threshold for e in picked)


# --- policies on an SNR table -------------------------------------------------------------------


def test_per_type_on_a_scan_table(tiny_snr_table, tmp_path):
    out = tmp_path / "sel"
    result = select(tiny_snr_table, out, top_percent=50)
    rows = selection_rows(out)
    snr_rows = pq.read_table(tiny_snr_table).to_pylist()
    assert [r["tensor_name"] for r in rows] == [r["tensor_name"] for r in snr_rows]  # every tensor listed
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        assert r["reason"], r["tensor_name"]
        if r["rank"] is not None:
            by_type.setdefault(r["module_type"], []).append(r)
        else:
            assert r["selected"] is False and r["reason"].startswith("not scanned")
    for _kind, members in by_type.items():
        ranked = sorted(members, key=lambda r: r["rank"])
        assert [r["rank"] for r in ranked] == list(range(1, len(members) + 1))
        assert all(r["group_size"] == len(members) for r in members)
        assert [r["snr"] for r in ranked] == sorted((r["snr"] for r in members), reverse=True)
        assert sum(r["picked_by_policy"] for r in members) == int(len(members) * 50 / 100)
    assert yaml_entries(out)[:2] == ["^lm_head.weight$", "^model.embed_tokens.weight$"]
    assert result.summary["roles_source"] == "model-config"
    assert result.summary["model_id"] == "tiny-llama"


def test_json_counts_trainable_parameters(tiny_snr_table, tmp_path):
    out = tmp_path / "sel"
    select(tiny_snr_table, out, top_percent=50)
    rows = selection_rows(out)
    summary = summary_of(out)
    selected = [r for r in rows if r["selected"]]
    assert summary["trainable_tensors"] == [r["tensor_name"] for r in selected]
    assert summary["trainable_parameters"] == sum(r["parameter_count"] for r in selected)
    assert summary["total_parameters"] == sum(r["parameter_count"] for r in pq.read_table(tiny_snr_table).to_pylist())
    assert summary["trainable_fraction"] == pytest.approx(summary["trainable_parameters"] / summary["total_parameters"])
    assert set(summary["unfrozen_parameters"]) == set(yaml_entries(out))
    assert summary["by_type"]["mlp.up_proj"] == {"selected": 1, "candidates": 2}
    assert summary["by_type"]["lm_head"] == {"selected": 1, "candidates": 1}  # always trained


def test_global_policy_takes_the_top_across_types(tiny_snr_table, tmp_path):
    result = select(tiny_snr_table, tmp_path / "sel", policy="global", top_percent=50, always_train=[])
    candidates = [e for e in result.entries if e.candidate]
    assert len(candidates) == 16
    ranked = sorted(candidates, key=lambda e: e.snr, reverse=True)
    picked = (e.tensor_name for e in result.entries if e.picked)
    assert [e.tensor_name for e in ranked[:8]] == sorted(picked, key=[e.tensor_name for e in ranked].index)
    assert [e.rank for e in ranked] == list(range(1, 17))
    assert result.summary["top_percent"] == 50 and result.summary["policy"] == "global"


def _greedy_budget(rows, percent, always):
    total = sum(r["parameter_count"] for r in rows)
    budget = total * percent / 100
    used = sum(r["parameter_count"] for r in rows if r["tensor_name"] in always)
    picked = []
    for r in sorted((r for r in rows if r["scanned"]), key=lambda r: r["snr"], reverse=True):
        if r["tensor_name"] in always:
            continue
        if used + r["parameter_count"] <= budget:
            used += r["parameter_count"]
            picked.append(r["tensor_name"])
    return picked, used, budget


@pytest.mark.parametrize(("percent", "always"), [(20, []), (45, []), (60, ["output_embeddings", "input_embeddings"]), (100, [])])
def test_budget_policy_stays_within_budget_highest_snr_first(tiny_snr_table, tmp_path, percent, always):
    out = tmp_path / "sel"
    result = select(tiny_snr_table, out, policy="budget", budget_percent=percent, top_percent=None, always_train=always)
    snr_rows = pq.read_table(tiny_snr_table).to_pylist()
    always_names = {"lm_head.weight", "model.embed_tokens.weight"} if always else set()
    expected, used, budget = _greedy_budget(snr_rows, percent, always_names)
    picked = [e.tensor_name for e in sorted((e for e in result.entries if e.picked), key=lambda e: e.rank)]
    assert picked == expected
    summary = summary_of(out)
    assert summary["trainable_parameters"] == used <= budget
    assert summary["trainable_fraction"] <= percent / 100
    assert summary["budget_percent"] == percent and summary["top_percent"] is None
    # the best-ranked candidate that is not always-trained is taken whenever it fits at all
    best = max((r for r in snr_rows if r["scanned"] and r["tensor_name"] not in always_names), key=lambda r: r["snr"])
    if best["parameter_count"] + sum(r["parameter_count"] for r in snr_rows if r["tensor_name"] in always_names) <= budget:
        assert best["tensor_name"] in picked
    if percent == 100:
        assert len(picked) == 16


def test_budget_smaller_than_the_always_train_tensors_is_an_error(tiny_snr_table, tmp_path):
    with pytest.raises(InputError, match="always-train tensors alone"):
        select(tiny_snr_table, tmp_path / "sel", policy="budget", budget_percent=10)
    assert not (tmp_path / "sel").exists()


def test_budget_policy_needs_parameter_counts(tmp_path):
    with pytest.raises(InputError, match="parameter counts"):
        select(LLAMA_JSON, tmp_path / "sel", policy="budget", budget_percent=30)
    assert not (tmp_path / "sel").exists()


def test_budget_policy_needs_a_budget(tiny_snr_table, tmp_path):
    with pytest.raises(InputError, match="--budget-percent"):
        select(tiny_snr_table, tmp_path / "sel", policy="budget")


def test_include_and_exclude_types(tiny_snr_table, tmp_path):
    result = select(tiny_snr_table, tmp_path / "inc", top_percent=100, include_types=["^mlp\\."], always_train=[])
    assert {e.module_type for e in result.entries if e.picked} == {"mlp.up_proj", "mlp.down_proj", "mlp.gate_proj"}
    q = next(e for e in result.entries if e.tensor_name == "model.layers.0.self_attn.q_proj.weight")
    assert not q.selected and "not in --include-type" in q.reason
    assert [line for line in (tmp_path / "inc" / UNFROZEN_YAML_FILE).read_text().splitlines() if line.startswith("#")] == [
        "# mlp.down_proj layers",
        "# mlp.gate_proj layers",
        "# mlp.up_proj layers",
    ]

    result = select(tiny_snr_table, tmp_path / "exc", top_percent=100, exclude_types=["self_attn", "embed"])
    picked_types = {e.module_type for e in result.entries if e.picked}
    assert picked_types == {"mlp.up_proj", "mlp.down_proj", "mlp.gate_proj", "lm_head"}
    embed = next(e for e in result.entries if e.tensor_name == "model.embed_tokens.weight")
    assert embed.selected and embed.always_train and not embed.picked  # always-train wins over the exclusion


@pytest.mark.parametrize("option", ["include_types", "exclude_types"])
def test_type_filter_matching_nothing_is_an_error(tiny_snr_table, tmp_path, option):
    with pytest.raises(InputError, match="'experts' matches no module type"):
        select(tiny_snr_table, tmp_path / "sel", **{option: ["experts"]})
    assert not (tmp_path / "sel").exists()


@pytest.mark.parametrize("estimator", ["reference", "gavish-donoho"])
def test_an_all_zero_matrix_is_never_selected(tmp_path, write_checkpoint, estimator):
    """The reference formula scores an all-zero matrix +inf (0/0 over S[0] = 0), which would rank it first."""
    g = torch.Generator().manual_seed(0)
    folder = write_checkpoint(
        tmp_path / "m",
        {f"model.layers.{i}.mlp.up_proj.weight": (torch.zeros(24, 16) if i == 0 else torch.randn(24, 16, generator=g)) for i in range(5)},
    )
    table = tmp_path / "snr.parquet"
    run_scan(ScanConfig(model_dir=str(folder), output=str(table), estimator=estimator), QUIET)
    result = select(table, tmp_path / "sel", top_percent=50, always_train=[])
    zero = next(e for e in result.entries if e.tensor_name == "model.layers.0.mlp.up_proj.weight")
    assert not zero.candidate and not zero.picked and zero.snr is None
    assert zero.reason.startswith("not scanned: all-zero matrix (rank 0)")
    assert sum(e.picked for e in result.entries) == 2  # int(4 scanned * 50%)


def test_nan_snr_ranks_last(tmp_path, write_checkpoint):
    g = torch.Generator().manual_seed(0)
    folder = write_checkpoint(tmp_path / "m", {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(24, 16, generator=g) for i in range(4)})
    table = tmp_path / "snr.parquet"
    run_scan(ScanConfig(model_dir=str(folder), output=str(table)), QUIET)
    scanned = pq.read_table(table)
    names, values = scanned.column("tensor_name").to_pylist(), scanned.column("snr").to_pylist()
    snr = [math.nan if name.startswith("model.layers.0.") else value for name, value in zip(names, values, strict=True)]
    pq.write_table(scanned.set_column(scanned.schema.get_field_index("snr"), "snr", pa.array(snr, pa.float64())), table)
    result = select(table, tmp_path / "sel", top_percent=75, always_train=[])
    nan = next(e for e in result.entries if e.tensor_name == "model.layers.0.mlp.up_proj.weight")
    assert math.isnan(nan.snr) and nan.rank == 4 and not nan.picked
    assert sum(e.picked for e in result.entries) == 3


# --- always train -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "lines", "tensors"),
    [
        ({}, ["^lm_head.weight$", "^model.embed_tokens.weight$"], ["lm_head.weight", "model.embed_tokens.weight"]),
        ({"architecture": "qwen2"}, ["^lm_head.weight$", "^model.embed_tokens.weight$"], ["lm_head.weight", "model.embed_tokens.weight"]),
        # tied: the reference still lists both lines (the first matches nothing; trainers ignore it)
        ({"tie_word_embeddings": True}, ["^lm_head.weight$", "^model.embed_tokens.weight$"], ["model.embed_tokens.weight"]),
    ],
    ids=["llama", "qwen2", "tied"],
)
def test_always_train_roles_resolve_to_real_names(synthetic_model, tmp_path, overrides, lines, tensors):
    table = tmp_path / "snr.parquet"
    run_scan(ScanConfig(model_dir=str(synthetic_model(**overrides)), output=str(table)), QUIET)
    out = tmp_path / "sel"
    result = select(table, out, top_percent=50)
    assert yaml_entries(out)[: len(lines)] == lines
    assert not any(line.startswith("^") for line in yaml_entries(out)[len(lines) :])
    always = sorted(e.tensor_name for e in result.entries if e.always_train)
    assert always == tensors


def test_always_train_roles_on_a_bert_checkpoint(minilm_scan, tmp_path):
    _, scan = minilm_scan
    out = tmp_path / "sel"
    select(scan.output, out, top_percent=50)
    assert yaml_entries(out)[0] == "^embeddings.word_embeddings.weight$"
    assert sum(line.startswith("^") for line in yaml_entries(out)) == 1  # tied: one tensor, both roles


def test_always_train_regex(tiny_snr_table, tmp_path):
    out = tmp_path / "sel"
    result = select(tiny_snr_table, out, top_percent=50, always_train=["model\\.norm", "input_embeddings"])
    assert yaml_entries(out)[:2] == ["model\\.norm", "^model.embed_tokens.weight$"]
    norm = next(e for e in result.entries if e.tensor_name == "model.norm.weight")
    assert norm.selected and norm.always_train and "pattern 'model\\\\.norm'" in norm.reason
    head = next(e for e in result.entries if e.tensor_name == "lm_head.weight")
    assert not head.selected  # the only lm_head is not in its type's top 50% of 1


def test_always_train_regex_matching_nothing_is_an_error(tiny_snr_table, tmp_path):
    with pytest.raises(InputError) as raised:
        select(tiny_snr_table, tmp_path / "sel", always_train=["transformer\\.wte"])
    assert "always-train pattern" in str(raised.value) and "transformer" in str(raised.value)
    assert "matches no tensor" in str(raised.value)
    assert not (tmp_path / "sel").exists()


def test_always_train_invalid_regex(tiny_snr_table, tmp_path):
    with pytest.raises(InputError, match="not a valid regular expression"):
        select(tiny_snr_table, tmp_path / "sel", always_train=["lm_head[("])


def test_always_train_role_that_cannot_be_resolved_is_an_error(tmp_path):
    source = tmp_path / "snr.json"
    source.write_text(
        json.dumps({"backbone.blocks.0.mix": {"snr": 1.0, "type": "mix"}, "backbone.blocks.1.mix": {"snr": 2.0, "type": "mix"}})
    )
    with pytest.raises(InputError) as raised:
        select(source, tmp_path / "sel")
    assert "'output_embeddings' matches no tensor" in str(raised.value)
    assert not (tmp_path / "sel").exists()
    select(source, tmp_path / "ok", always_train=[])  # without the roles it works
    assert yaml_entries(tmp_path / "ok") == ["backbone.blocks.1.mix"]


def test_roles_fall_back_to_conventional_names_without_a_config(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").unlink()
    table = tmp_path / "snr.parquet"
    run_scan(ScanConfig(model_dir=str(model), output=str(table)), QUIET)
    result = select(table, tmp_path / "sel", top_percent=50)
    assert result.summary["roles_source"] == "conventional-names"
    assert yaml_entries(tmp_path / "sel")[:2] == ["^lm_head.weight$", "^model.embed_tokens.weight$"]


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [0, -5, 150, float("nan"), float("inf")])
@pytest.mark.parametrize("policy", ["per-type", "global"])
def test_top_percent_outside_range(tiny_snr_table, tmp_path, percent, policy):
    with pytest.raises(InputError, match="--top-percent must be in \\(0, 100\\]"):
        select(tiny_snr_table, tmp_path / "sel", policy=policy, top_percent=percent)
    assert not (tmp_path / "sel").exists()


@pytest.mark.parametrize("percent", [0, -5, 150, float("nan")])
def test_budget_percent_outside_range(tiny_snr_table, tmp_path, percent):
    with pytest.raises(InputError, match="--budget-percent must be in \\(0, 100\\]"):
        select(tiny_snr_table, tmp_path / "sel", policy="budget", budget_percent=percent)


def test_unknown_policy(tiny_snr_table, tmp_path):
    with pytest.raises(InputError, match="unknown policy 'random'"):
        select(tiny_snr_table, tmp_path / "sel", policy="random")


def test_a_selection_that_trains_nothing_is_an_error(tiny_snr_table, tmp_path):
    out = tmp_path / "sel"
    with pytest.raises(InputError, match="would train nothing"):
        select(tiny_snr_table, out, top_percent=1, always_train=[])
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("existing", OUTPUTS)
def test_existing_outputs_are_refused(tiny_snr_table, tmp_path, existing):
    out = tmp_path / "sel"
    out.mkdir()
    (out / existing).write_bytes(b"earlier selection")
    with pytest.raises(OutputExistsError, match=existing):
        select(tiny_snr_table, out)
    assert (out / existing).read_bytes() == b"earlier selection"
    assert sorted(p.name for p in out.iterdir()) == [existing]


def test_overwrite_replaces_all_outputs(tiny_snr_table, tmp_path):
    out = tmp_path / "sel"
    select(tiny_snr_table, out, top_percent=100)
    select(tiny_snr_table, out, top_percent=50, overwrite=True)
    assert summary_of(out)["top_percent"] == 50
    assert {r["top_percent"] for r in selection_rows(out)} == {50.0}
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.json", None, "does not exist"),
        ("broken.json", '{"a": {"snr": 1.0, "type"', "is not valid JSON"),
        ("empty.json", "{}", "holds no SNR entries"),
        ("wrong.json", '{"a": 3}', "neither"),
        ("text.json", '{"a": {"snr": "high", "type": "t"}}', "not a number"),
        ("table.parquet", "not parquet at all", "not a readable Parquet SNR table"),
    ],
)
def test_bad_snr_inputs(tmp_path, name, content, fragment):
    source = tmp_path / name
    if content is not None:
        source.write_text(content)
    with pytest.raises(InputError, match=fragment):
        select(source, tmp_path / "sel")
    assert not (tmp_path / "sel").exists()


def test_parquet_that_is_not_an_snr_table(tmp_path):
    import pyarrow as pa

    source = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), source)
    with pytest.raises(InputError, match="missing column"):
        select(source, tmp_path / "sel")


# --- depth-aware -----------------------------------------------------------------------------------


def test_depth_aware_keeps_the_share_takes_upper_layers_and_freezes_the_embeddings(synthetic_model, tmp_path):
    table = tmp_path / "snr.parquet"
    run_scan(ScanConfig(model_dir=str(synthetic_model(num_hidden_layers=8)), output=str(table)), QUIET)
    reference = select(table, tmp_path / "ref", top_percent=25)
    deep = select(table, tmp_path / "deep", top_percent=25, depth_aware=True)
    assert sum(e.picked for e in deep.entries) == sum(e.picked for e in reference.entries)  # the same per-type share
    picked = [e for e in deep.entries if e.picked]
    assert picked and all(layer_index(e.tensor_name) >= 4 for e in picked)  # 25% of 8 layers: the best 2 of the upper 4
    assert not any(e.always_train for e in deep.entries)
    per_type = {}
    for e in picked:
        per_type[e.module_type] = per_type.get(e.module_type, 0) + 1
    assert set(per_type.values()) == {2}
    assert deep.summary["depth_aware"] is True and "^lm_head.weight$" not in yaml_entries(tmp_path / "deep")
    with pytest.raises(InputError, match="--depth-aware applies to the per-type policy"):
        select(table, tmp_path / "g", policy="global", depth_aware=True)
