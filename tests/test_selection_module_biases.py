"""One selection, one meaning: a selected module trains its weight and its bias, in selection.json, the YAML, freezing and the audit.

Axolotl applies `unfrozen_parameters` with `re.match`, so the module name the reference YAML
lists trains the module's `.bias` too (Qwen2's q/k/v projections have one). selection.json,
freezing, the selection table's reasons and the trainable share must say the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from stages.base.contracts import SELECTION_JSON_FILE, SELECTION_TABLE_FILE, UNFROZEN_YAML_FILE
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig
from stages.layer_select import run as run_select
from stages.snr_scan import ScanConfig
from stages.snr_scan import run as run_scan
from stages.training.freezing import apply_selection
from stages.training.selection import load_selection

from .helpers import QUIET


@pytest.fixture(scope="module")
def qwen2(synthetic_model, tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, SNR table) of a tiny synthetic Qwen2: q/k/v projections with biases."""
    model = synthetic_model(architecture="qwen2")
    table = tmp_path_factory.mktemp("qwen2-scan") / "snr.parquet"
    run_scan(ScanConfig(model_dir=str(model), output=str(table)), QUIET)
    return model, table


def select(table: Path, out: Path, **options):
    return run_select(SelectConfig(snr_input=str(table), out_dir=str(out), **options), StageContext()).detail


def meta_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))


def axolotl_trains(model: torch.nn.Module, yaml_file: Path) -> set[str]:
    """What Axolotl unfreezes for this YAML: every parameter some line re.match-es."""
    lines = yaml.safe_load(yaml_file.read_text())["unfrozen_parameters"]
    return {name for name, _ in model.named_parameters() if any(re.match(line, name) for line in lines)}


def trained_by(model_dir: Path, selection_file: Path) -> tuple[set[str], int]:
    report = apply_selection(meta_model(model_dir), load_selection(str(selection_file), None, None))
    return set(report.trainable), report.trainable_parameters


@pytest.mark.parametrize("options", [{"top_percent": 50}, {"policy": "global", "top_percent": 30}, {"always_train": []}], ids=str)
def test_selection_json_yaml_and_freezing_train_the_same_parameters(qwen2, tmp_path, options):
    model_dir, table = qwen2
    out = tmp_path / "sel"
    select(table, out, **options)
    summary = json.loads((out / SELECTION_JSON_FILE).read_text())
    expected = axolotl_trains(meta_model(model_dir), out / UNFROZEN_YAML_FILE)
    biases = {name for name in expected if name.endswith(".bias")}
    assert biases and all(name.removesuffix(".bias") + ".weight" in summary["trainable_tensors"] for name in biases)
    assert set(summary["parameters"]) == expected  # selection.json lists what the YAML trains
    from_json, json_count = trained_by(model_dir, out / SELECTION_JSON_FILE)
    from_yaml, yaml_count = trained_by(model_dir, out / UNFROZEN_YAML_FILE)
    assert from_json == from_yaml == expected  # before: selection.json trained the weights only
    assert json_count == yaml_count == summary["trainable_parameters"]  # the trainable share counts the biases
    rows = {r["tensor_name"]: r for r in pq.read_table(out / SELECTION_TABLE_FILE).to_pylist()}
    assert {name for name, r in rows.items() if r["selected"]} == expected
    for bias in biases:  # the "why" of each trained bias: its module's weight was selected
        weight = bias.removesuffix(".bias") + ".weight"
        assert rows[bias]["trained_with"] == weight
        assert rows[bias]["reason"] == f"trained with its module {bias.removesuffix('.bias')}: its weight is {rows[weight]['reason']}"


def test_the_report_line_and_the_audit_count_the_biases_and_say_why(qwen2, tmp_path):
    from stages.layer_select import report
    from stages.store import open_store
    from stages.store.lineage import audit_run

    _, table = qwen2
    store = open_store(str(tmp_path / "store"))
    outcome = run_select(SelectConfig(snr_input=str(table), top_percent=50), StageContext(store))
    result = outcome.detail
    extra = len(result.summary["parameters"]) - len(result.summary["trainable_tensors"])
    assert extra > 0 and f"(and {extra} biases of their modules)" in report(result)
    assert result.summary["trainable_parameters"] == sum(e.parameter_count for e in result.entries if e.selected)
    selection = audit_run(store, outcome.manifest.run_id)["selection"]
    assert [t["tensor_name"] for t in selection["trainable"]] == result.summary["parameters"]
    assert selection["trainable_parameters"] == result.summary["trainable_parameters"]
    assert all(t["reason"].startswith("trained with its module") for t in selection["trainable"] if t["tensor_name"].endswith(".bias"))


def test_a_selection_json_without_parameters_trains_each_modules_bias(qwen2, tmp_path):
    """selection.json written before `parameters` existed (or from a reference JSON) still means the module."""
    model_dir, table = qwen2
    out = tmp_path / "sel"
    select(table, out, top_percent=50)
    summary = json.loads((out / SELECTION_JSON_FILE).read_text())
    old = tmp_path / "old-selection.json"
    old.write_text(json.dumps({k: v for k, v in summary.items() if k != "parameters"}))
    trained, _ = trained_by(model_dir, old)
    assert trained == set(summary["parameters"])


def test_an_always_trained_weight_brings_its_bias_with_an_exact_line(qwen2, tmp_path):
    model_dir, table = qwen2
    out = tmp_path / "sel"
    weight = "model.layers.0.self_attn.q_proj.weight"
    select(table, out, top_percent=50, always_train=[f"^{re.escape(weight)}$"], exclude_types=["self_attn.q_proj"])
    lines = yaml.safe_load((out / UNFROZEN_YAML_FILE).read_text())["unfrozen_parameters"]
    assert r"^model\.layers\.0\.self_attn\.q_proj\.bias$" in lines
    summary = json.loads((out / SELECTION_JSON_FILE).read_text())
    assert "model.layers.0.self_attn.q_proj.bias" in summary["parameters"]
    assert set(summary["parameters"]) == axolotl_trains(meta_model(model_dir), out / UNFROZEN_YAML_FILE)


def test_the_budget_counts_the_biases_a_module_brings(qwen2, tmp_path):
    _, table = qwen2
    result = select(table, tmp_path / "sel", policy="budget", budget_percent=30, always_train=[])
    assert result.summary["trainable_parameters"] <= 0.30 * result.summary["total_parameters"]
    assert any(e.trained_with for e in result.entries)


def test_a_module_name_that_prefixes_another_modules_name_is_written_so_it_matches_its_own_tensors_only(tmp_path):
    """`…mlp.gate` (a router) re.match-es `…mlp.gate_proj.weight` too: the line is anchored to the module instead."""
    flat = {
        "model.layers.0.mlp.gate": {"snr": 9.0, "type": "mlp.gate"},
        "model.layers.0.mlp.gate_proj": {"snr": 1.0, "type": "mlp.gate_proj"},
        "model.layers.1.mlp.gate_proj": {"snr": 2.0, "type": "mlp.gate_proj"},
    }
    source = tmp_path / "snr.json"
    source.write_text(json.dumps(flat))
    out = tmp_path / "sel"
    select(source, out, policy="global", top_percent=34, always_train=[])
    lines = yaml.safe_load((out / UNFROZEN_YAML_FILE).read_text())["unfrozen_parameters"]
    assert lines == [r"^model\.layers\.0\.mlp\.gate\."]
    names = [f"{n}.weight" for n in flat]
    assert [n for n in names if any(re.match(line, n) for line in lines)] == ["model.layers.0.mlp.gate.weight"]
    summary = json.loads((out / SELECTION_JSON_FILE).read_text())
    assert summary["parameters"] is None  # a reference JSON does not list the model's biases; trainers add each module's


def test_the_reference_yaml_is_unchanged_for_a_model_without_biases(tiny_snr_table, tmp_path):
    out = tmp_path / "sel"
    result = select(tiny_snr_table, out, top_percent=50)
    assert result.summary["parameters"] == result.summary["trainable_tensors"]
    assert not any(line.startswith("^") for line in result.summary["unfrozen_parameters"][2:])


@pytest.mark.integration
def test_cpt_with_selection_json_trains_the_selected_modules_biases(tmp_path):
    """Real DeepSpeed training (2 steps) of a Qwen2 from selection.json: the selected modules' biases change, the rest do not."""
    from safetensors.torch import load_file

    from stages import cpt
    from stages.base.contracts import TRAINED_TENSORS_TABLE
    from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
    from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
    from stages.store import open_store, read_table

    from .helpers import TINY

    corpus = domain_corpus(120)
    model = write_tokenizer(write_synthetic_model(tmp_path / "model", SyntheticSpec(**{**TINY, "architecture": "qwen2"})), corpus, 512)
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "part.txt").write_text("\n".join(corpus) + "\n")
    table = tmp_path / "snr.parquet"
    run_scan(ScanConfig(model_dir=str(model), output=str(table)), QUIET)
    select(table, tmp_path / "sel", top_percent=50, always_train=[])
    summary = json.loads((tmp_path / "sel" / SELECTION_JSON_FILE).read_text())
    options = dict(max_steps=2, seq_len=64, micro_batch_size=2, gradient_accumulation_steps=1, learning_rate=5e-3, warmup_steps=0)
    config = cpt.CptConfig(model=str(model), data=str(drop), selection=str(tmp_path / "sel" / SELECTION_JSON_FILE), save_steps=0, **options)
    store = open_store(str(tmp_path / "store"))
    result = cpt.run(config, StageContext(store, work_dir=tmp_path / "work", progress=False))
    trained = set(summary["parameters"])
    assert any(name.endswith(".bias") for name in trained)
    assert set(result.detail.freeze.trainable) == trained
    before = load_file(str(model / "model.safetensors"))
    after = load_file(str(tmp_path / "store" / "runs" / result.run_id / "cpt" / "model" / "model.safetensors"))
    assert {name for name in before if not torch.equal(before[name], after[name])} == trained
    rows = read_table(store, TRAINED_TENSORS_TABLE, run_id=result.run_id).to_pylist()
    assert {r["tensor_name"] for r in rows if r["changed"]} == trained
    assert (
        json.loads((tmp_path / "store" / "runs" / result.run_id / "cpt" / "training.json").read_text())["trainable_parameters"]
        == (summary["trainable_parameters"])
    )
