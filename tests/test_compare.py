"""spectrum compare: every CPU method end to end through the real stages, each arm an auditable run; it resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.compare import run_compare
from stages import compare
from stages.base.contracts import COMPARISON_TABLE
from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.evaluation.corpus import python_docs
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
from stages.store import list_runs, load_manifest, open_store, read_table

from .helpers import TINY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    logs, general = domain_corpus(160, seed=2), python_docs().texts[:80]
    folder = write_synthetic_model(root / "model", SyntheticSpec(**{**TINY, "num_hidden_layers": 4}))  # 25% of 4 layers: one per type
    model = write_tokenizer(folder, logs + general, TINY["vocab_size"])
    (root / "drop").mkdir()
    (root / "drop" / "logs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in logs))
    (root / "general.txt").write_text("\n".join(general) + "\n")
    return model, root / "drop", root / "general.txt"


def config(inputs, **overrides) -> compare.CompareConfig:
    model, drop, general = inputs
    options = dict(model=str(model), data=str(drop), general=str(general), max_steps=3, seq_len=64, eval_max_tokens=512)
    return compare.CompareConfig(**{**options, **overrides})


def test_every_cpu_method_runs_as_its_own_run_and_an_interrupted_comparison_resumes(prefect_api, inputs, tmp_path):
    store = open_store(str(tmp_path / "store"))
    context = {"work_dir": tmp_path / "work", "progress": False}
    first = run_compare(config(inputs, methods=["full", "spectrum-25"]), StageContext(store, run_id="c1", **context))
    assert [r["method"] for r in first.detail] == ["full", "spectrum-25"]

    result = run_compare(config(inputs, out_dir=str(tmp_path / "out")), StageContext(store, run_id="c2", **context))
    rows = {r["method"]: r for r in result.detail}
    assert list(rows) == list(compare.METHODS)
    # arms committed by the first (interrupted) comparison are reused, the others are new runs
    assert rows["full"]["cpt_run"] == "c1-full" and rows["spectrum-25"]["cpt_run"] == "c1-spectrum-25"
    assert rows["lora"]["cpt_run"] == "c2-lora" and rows["spectrum-50"]["cpt_run"] == "c2-spectrum-50"

    assert rows["full"]["trainable_share"] == 1.0 and rows["full"]["time_ratio"] == 1.0 == rows["full"]["memory_ratio"]
    assert rows["lora"]["trainable_share"] < rows["spectrum-25"]["trainable_share"] < rows["spectrum-50"]["trainable_share"] < 1
    for row in rows.values():
        assert row["step_seconds"] > 0 and row["peak_memory_mib"] > 100 and row["final_loss"] > 0
        assert row["heldout_perplexity"] > 1 and row["general_perplexity"] > 1 and row["general_perplexity_base"] > 1

    # every arm is an auditable run of the real stages; the Gavish-Donoho arm selects from that estimator's scan
    runs = list_runs(store)
    assert runs["c1"] == ["snr_scan", "compare"] and runs["c2"] == ["snr_scan", "snr_scan.gavish_donoho", "compare"]
    assert load_manifest(store, "c2", "snr_scan").run_id == "c1"  # c2 reused c1's scan and recorded so
    stages = {arm: [s for s in runs[arm] if not s.startswith("evaluate.measure_")] for arm in ("c2-spectrum-25-gavish-donoho", "c2-lora")}
    assert stages == {"c2-spectrum-25-gavish-donoho": ["layer_select", "cpt", "evaluate"], "c2-lora": ["cpt", "evaluate"]}
    # the base model is measured once for every arm: each later arm's base measurements are reuse records of one run
    base_measured_by = {load_manifest(store, arm, s).run_id for arm in stages for s in runs[arm] if s.startswith("evaluate.measure_base")}
    assert len(base_measured_by) == 1
    gd_selection = load_manifest(store, "c2-spectrum-25-gavish-donoho", "layer_select")
    assert gd_selection.inputs[0]["uri"].endswith("stage%3Dsnr_scan.gavish_donoho/run_id%3Dc2/part-0.parquet")
    assert load_manifest(store, "c2", "snr_scan.gavish_donoho").parameters["estimator"] == "gavish-donoho"

    table = read_table(store, COMPARISON_TABLE, run_id="c2").to_pylist()
    assert [r["method"] for r in table] == list(compare.METHODS)
    assert "| spectrum-25-depth-aware |" in (tmp_path / "out" / "comparison.md").read_text()
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["methods"][0]["method"] == "full"

    again = run_compare(config(inputs), StageContext(store, **context))
    assert again.cached and again.run_id == "c2"

    # two seeds of two arms: seed 0 is the arms above (reused), seed 1 trains anew; the random arm draws with the seed
    seeded = run_compare(
        config(inputs, methods=["spectrum-25", "spectrum-25-random"], seeds=2, out_dir=str(tmp_path / "seeds")),
        StageContext(store, run_id="c3", **context),
    )
    assert [(r["method"], r["seed"]) for r in seeded.detail] == [("spectrum-25", 0), ("spectrum-25-random", 0)] + [
        ("spectrum-25", 1),
        ("spectrum-25-random", 1),
    ]
    assert [r["cpt_run"] for r in seeded.detail] == [
        "c1-spectrum-25",
        "c2-spectrum-25-random",
        "c3-spectrum-25-s1",
        "c3-spectrum-25-random-s1",
    ]
    assert load_manifest(store, "c3-spectrum-25-random-s1", "layer_select").parameters["rank_seed"] == 1
    assert load_manifest(store, "c3-spectrum-25-s1", "cpt").parameters["seed"] == 1
    written = json.loads((tmp_path / "seeds" / "comparison.json").read_text())
    random_arm = written["summary"][1]
    assert written["baseline"] == "spectrum-25" and random_arm["method"] == "spectrum-25-random" and random_arm["seeds"] == [0, 1]
    interval = random_arm["differences"]["heldout_perplexity"]
    assert interval["n"] == 2 and interval["low"] <= interval["mean"] <= interval["high"]
    assert "Paired difference to spectrum-25" in (tmp_path / "seeds" / "comparison.md").read_text()
    assert [r["seed"] for r in read_table(store, COMPARISON_TABLE, run_id="c3").to_pylist()] == [0, 0, 1, 1]


def test_unknown_or_repeated_methods_are_clear_errors(inputs, tmp_path):
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(InputError, match="unknown comparison method.*qlora-8.*choose from full, spectrum-50"):
        run_compare(config(inputs, methods=["full", "qlora-8"]), StageContext(store))
    with pytest.raises(InputError, match="lists a method twice"):
        run_compare(config(inputs, methods=["lora", "lora"]), StageContext(store))
    with pytest.raises(InputError, match="no data"):
        run_compare(config(inputs, data=None), StageContext(store))
    assert not (tmp_path / "store" / "runs").exists()
