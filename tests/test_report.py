"""report: a run and its lineage as one self-contained HTML page (checked in Chromium) and a Markdown file beside it."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from stages.base.contracts import (
    COMPARISON_TABLE,
    EVALUATION_TABLE,
    SELECTION_TABLE,
    SNR_DRIFT_TABLE,
    SNR_TABLE,
    TRAINED_TENSORS_TABLE,
    TRAINING_FILE,
    TRAINING_METRICS_TABLE,
)
from stages.base.errors import InputError, OutputExistsError
from stages.report import build_report, gather
from stages.report.charts import HeatCell, snr_heatmap
from stages.store import ObjectInfo, commit_manifest, load_manifest, open_store, output_key, start_manifest, write_table
from stages.store.compute import Prices

from .helpers import REPO_ROOT, TINY

CHROMIUM = Path("/usr/bin/chromium")
PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("snr", "training", "evaluation", "comparison", "drift", "compute", "lineage")
TYPES = ("self_attn.q_proj", "mlp.down_proj")
# The comparison table's columns, as the compare stage writes them.
COMPARISON_SCHEMA = pa.schema(
    [("method", pa.string()), ("cpt_run", pa.string()), ("evaluate_run", pa.string()), ("trainable_parameters", pa.int64()),
     ("total_parameters", pa.int64())]
    + [(name, pa.float64()) for name in ("trainable_share", "step_seconds", "train_seconds", "peak_memory_mib", "final_loss",
                                         "heldout_perplexity_base", "heldout_perplexity", "general_perplexity_base", "general_perplexity",
                                         "time_ratio", "memory_ratio")]
)  # fmt: skip


def commit(store, run_id: str, stage: str, tables: dict[str, list[dict]], inputs: list[ObjectInfo] = (), files: dict | None = None,
           compute: dict | None = None):  # fmt: skip
    """What a stage does: write its tables (and files), then commit the manifest naming them; returns the outputs.

    `compute`: the device time its manifest records instead of this process's (a dict, or {} for a manifest from before compute).
    """
    if not inputs:
        inputs = [store.put_bytes(f"blobs/{run_id}-{stage}.bin", f"{run_id}/{stage}".encode())]
    outputs = [write_table(store, name, pa.Table.from_pylist(rows), stage=stage, run_id=run_id) for name, rows in tables.items()]
    outputs += [store.put_bytes(output_key(run_id, stage, name), data) for name, data in (files or {}).items()]
    manifest = start_manifest(stage, "1.0", run_id, {}, list(inputs))
    finished = manifest.finish(outputs)
    commit_manifest(store, finished if compute is None else dataclasses.replace(finished, compute=compute or None))
    return outputs


def tensor(layer: int | None, module_type: str) -> str:
    return f"model.layers.{layer}.{module_type}.weight" if layer is not None else f"{module_type}.weight"


def snr_rows() -> list[dict]:
    rows = [
        {"tensor_name": tensor(layer, kind), "module_type": kind, "layer_index": layer, "scanned": True, "snr": 1.0 + layer + 3 * k,
         "parameter_count": 100, "tensor_sha256": f"{layer}{k}" * 8, "is_input_embedding": False, "is_output_embedding": False,
         "model_id": "hand-made"}
        for layer in range(3)
        for k, kind in enumerate(TYPES)
    ]  # fmt: skip
    rows.append({**rows[0], "tensor_name": "lm_head.weight", "module_type": "lm_head", "layer_index": None, "snr": 9.0,
                 "is_output_embedding": True})  # fmt: skip
    rows.append({**rows[0], "tensor_name": "model.norm.weight", "module_type": "model.norm", "layer_index": None, "scanned": False,
                 "snr": None})  # fmt: skip
    return rows


SELECTED = {tensor(2, "self_attn.q_proj"), tensor(2, "mlp.down_proj"), tensor(1, "mlp.down_proj"), "lm_head.weight"}
CHANGED = SELECTED - {tensor(1, "mlp.down_proj")}  # a selected tensor may end up unchanged; never a frozen one


def selection_rows() -> list[dict]:
    return [
        {"tensor_name": r["tensor_name"], "module_type": r["module_type"], "snr": r["snr"], "parameter_count": r["parameter_count"],
         "selected": r["tensor_name"] in SELECTED, "rank": 1, "reason": "hand-made"}
        for r in snr_rows()
    ]  # fmt: skip


def metrics_rows(steps: int = 6) -> list[dict]:
    return [
        {"step": s, "loss": 5.0 - 0.3 * s, "learning_rate": 1e-3 * min(1, s / 2), "grad_norm": 1.0, "tokens_per_second": 900.0,
         "step_seconds": 0.25, "peak_memory_bytes": 300 * 2**20}
        for s in range(1, steps + 1)
    ]  # fmt: skip


def evaluation_rows() -> list[dict]:
    values = {
        ("perplexity", "heldout"): (500.0, 150.0),
        ("perplexity", "general"): (400.0, 420.0),
        ("nll_per_token", "heldout"): (6.2, 5.0),
    }
    rows = []
    for (metric, dataset), (base, trained) in values.items():
        rows += [{"model": m, "metric": metric, "dataset": dataset, "value": v, "tokens": 2048}
                 for m, v in (("base", base), ("trained", trained), ("delta", trained - base))]  # fmt: skip
    return rows


def drift_rows() -> list[dict]:
    rows = []
    for r in snr_rows()[:-1]:
        changed = r["tensor_name"] in CHANGED
        after = r["snr"] * 1.1 if changed else r["snr"]
        rows.append({"tensor_name": r["tensor_name"], "module_type": r["module_type"], "layer_index": r["layer_index"],
                     "parameter_count": 100, "changed": changed, "snr_before": r["snr"], "snr_after": after,
                     "snr_change": after - r["snr"], "relative_snr_change": (after - r["snr"]) / r["snr"]})  # fmt: skip
    return rows


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


@pytest.fixture
def pipeline(store):
    """Four runs linked only by their inputs: scan -> select -> train (cpt) -> eval (evaluate)."""
    scan = commit(store, "scan", "snr_scan", {SNR_TABLE: snr_rows()})
    select = commit(store, "select", "layer_select", {SELECTION_TABLE: selection_rows()}, inputs=scan)
    tensors = [{"tensor_name": r["tensor_name"], "trainable": r["tensor_name"] in SELECTED, "parameter_count": r["parameter_count"],
                "changed": r["tensor_name"] in CHANGED} for r in snr_rows()]  # fmt: skip
    record = json.dumps({"model": "/models/hand-made", "trainable_parameters": 400, "total_parameters": 800}).encode()
    train = commit(store, "train", "cpt", {TRAINING_METRICS_TABLE: metrics_rows(), TRAINED_TENSORS_TABLE: tensors}, inputs=select,
                   files={TRAINING_FILE: record})  # fmt: skip
    commit(store, "eval", "evaluate", {EVALUATION_TABLE: evaluation_rows(), SNR_DRIFT_TABLE: drift_rows()}, inputs=train)
    return store


def images_of(page: str) -> list[bytes]:
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in sources), "every chart is embedded as a PNG data URI"
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources]


def test_a_report_gathers_the_runs_its_inputs_came_from(pipeline, tmp_path):
    result = build_report(pipeline, "eval", tmp_path / "out" / "report.html")

    assert result.html_path == tmp_path / "out" / "report.html" and result.markdown_path == tmp_path / "out" / "report.md"
    assert result.sections == ("snr", "training", "evaluation", "drift", "compute", "lineage")
    page = result.html_path.read_text()
    images = images_of(page)
    assert len(images) == result.images == 3 and all(image.startswith(PNG) for image in images)
    assert not re.search(r'(src|href)="(?!data:|#)', page), "nothing is fetched: no external stylesheet, script, font or link"
    assert "Not a comparison" in page and page.count("<table>") == 6
    markdown = result.markdown_path.read_text()
    assert markdown.startswith("# Spectrum report: run `eval`")
    assert "| perplexity    | held-out | 500.0 |   150.0 | -350.0 |          -70.0% |  2,048 |" in markdown
    assert "- held-out perplexity 500.0 → 150.0 (-70.0%)" in markdown and "- trainable share 50.0% (400 of 800 parameters)" in markdown
    assert "| self_attn.q_proj |                 1 / 3 |" in markdown  # selected / candidates per module type
    assert "_Not a comparison: no comparison table in this run or the runs it builds on._" in markdown

    data = gather(pipeline, "eval")
    assert [node.key for node in data.stages] == [("eval", "evaluate"), ("train", "cpt"), ("select", "layer_select"), ("scan", "snr_scan")]
    assert data.snr_key == ("scan", "snr_scan") and len(data.snr) == 7  # the unscanned norm is not on the map
    assert data.model == "hand-made"
    [selection] = data.selections
    assert (
        selection.snr_key == ("scan", "snr_scan")
        and selection.changed == CHANGED
        and {r["tensor_name"] for r in selection.rows if r["selected"]} == SELECTED
    )
    [training] = data.trainings
    assert training.label == "train/cpt" and training.share == (400, 800) and [r["step"] for r in training.metrics] == list(range(1, 7))
    [evaluation] = data.evaluations
    frozen = [r for r in evaluation.drift if not r["changed"]]
    assert frozen and all(r["snr_before"] == r["snr_after"] for r in frozen)  # the scatter's frozen points sit on its diagonal


def test_a_section_without_data_says_so_in_one_line(store, tmp_path):
    commit(store, "solo", "cpt", {TRAINING_METRICS_TABLE: metrics_rows(3)})

    result = build_report(store, "solo", tmp_path / "solo.html")

    assert result.sections == ("training", "compute", "lineage") and result.images == 1
    page = result.html_path.read_text()
    for line in ("No SNR scan or layer selection in this run", "No evaluation in this run", "Not a comparison", "No SNR drift"):
        assert page.count(line) == 1
        assert line in result.markdown_path.read_text()
    assert "| solo | cpt   | succeeded | 1.0" in result.markdown_path.read_text()  # the lineage table


def gpu(count: int, seconds: float, device: str = "cuda") -> dict:
    name = "NVIDIA H200" if device == "cuda" else None
    return {"device": device, "device_name": name, "device_count": count, "seconds": seconds, "device_seconds": count * seconds}


def test_the_compute_section_shows_gpu_hours_per_stage_and_for_the_run_and_a_cost(store, tmp_path, capsys):
    scan = commit(store, "scan", "snr_scan", {SNR_TABLE: snr_rows()}, compute=gpu(1, 1800, "cpu"))
    trained = commit(store, "train", "cpt", {TRAINING_METRICS_TABLE: metrics_rows(3)}, inputs=scan, compute=gpu(4, 900))
    commit(store, "eval", "evaluate", {EVALUATION_TABLE: evaluation_rows()}, inputs=trained, compute=gpu(1, 360))

    plain = build_report(store, "eval", tmp_path / "plain.html")
    assert "compute" in plain.sections
    markdown = plain.markdown_path.read_text()
    assert "Run eval: 0.1000 GPU-h." in markdown  # the run's own stage: 1 GPU x 6 minutes
    assert "With the earlier runs it builds on: 1.1000 GPU-h, 0.5000 CPU-h." in markdown
    assert "| train | cpt      | 4 × NVIDIA H200 |   900.0 | 1.0000 | 0.0000 |" in markdown
    assert "| scan  | snr_scan | 1 × cpu         | 1,800.0 | 0.0000 | 0.5000 |" in markdown
    assert "cost" not in markdown.split("## Compute")[1].split("## Lineage")[0]  # no price, no cost

    priced = build_report(store, "eval", tmp_path / "priced.html", prices=Prices({"cuda": 4.0, "cpu": 0.1}), currency="$")
    markdown = priced.markdown_path.read_text()
    assert "Run eval: 0.1000 GPU-h, cost \\$0.40." in markdown and "1.1000 GPU-h, 0.5000 CPU-h, cost \\$4.45." in markdown
    assert "| train | cpt      | 4 × NVIDIA H200 |   900.0 | 1.0000 | 0.0000 | \\$4.00 |" in markdown
    page = priced.html_path.read_text()
    assert "<p>Run eval: 0.1000 GPU-h, cost $0.40.</p>" in page and '<th class="num">cost</th>' in page

    gpu_only = build_report(store, "eval", tmp_path / "gpu.html", prices=Prices({"cuda": 4.0}))
    assert "The cost counts cpu time at 0: no price per device-hour was given for it." in gpu_only.markdown_path.read_text()

    from spectrum_cli.main import main

    out = tmp_path / "cli.html"
    assert main(["report", "eval", "--store", store.root_uri, "--out", str(out), "--price-per-device-hour", "2"]) == 0
    assert "Run eval: 0.1000 GPU-h, cost 0.20." in out.with_suffix(".md").read_text() and "compute" in capsys.readouterr().out
    assert main(["report", "eval", "--store", store.root_uri, "--out", str(tmp_path / "x.html"), "--price-per-device-hour", "gpu=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --price-per-device-hour gpu=2: unknown device kind") and not (tmp_path / "x.html").exists()


def test_stages_committed_before_compute_was_recorded_say_so(store, tmp_path):
    commit(store, "old", "cpt", {TRAINING_METRICS_TABLE: metrics_rows(3)}, compute={})
    result = build_report(store, "old", tmp_path / "old.html")
    assert "compute" not in result.sections
    assert "_No compute recorded: these stages were committed before manifests recorded device time._" in result.markdown_path.read_text()


def test_the_snr_map_falls_back_to_evaluates_scan_of_the_base_model(store, tmp_path):
    base = commit(store, "eval", "snr_scan.evaluate_base", {SNR_TABLE: snr_rows()})
    commit(store, "eval", "snr_scan.evaluate", {SNR_TABLE: [{**r, "snr": (r["snr"] or 0) + 1} for r in snr_rows()]})
    commit(store, "eval", "evaluate", {EVALUATION_TABLE: evaluation_rows()}, inputs=base)

    data = gather(store, "eval")

    assert data.snr_key == ("eval", "snr_scan.evaluate_base") and data.selections == [] and data.changed is None
    assert build_report(store, "eval", tmp_path / "r.html").sections == ("snr", "evaluation", "compute", "lineage")


def test_a_comparison_names_each_arm_by_its_method(pipeline, tmp_path):
    recorded = [load_manifest(pipeline, run, stage).outputs[-1] for run, stage in (("train", "cpt"), ("eval", "evaluate"))]
    rows = [
        {"method": "full", "cpt_run": "arm-full", "evaluate_run": "arm-full", "trainable_parameters": 800, "total_parameters": 800,
         "trainable_share": 1.0, "step_seconds": 0.5, "train_seconds": 3.0, "peak_memory_mib": 400.0, "final_loss": 3.0,
         "heldout_perplexity_base": 500.0, "heldout_perplexity": 140.0, "general_perplexity_base": 400.0, "general_perplexity": 480.0,
         "time_ratio": 1.0, "memory_ratio": 1.0},
        {"method": "spectrum-50", "cpt_run": "train", "evaluate_run": "eval", "trainable_parameters": 400, "total_parameters": 800,
         "trainable_share": 0.5, "step_seconds": 0.25, "train_seconds": 1.5, "peak_memory_mib": 300.0, "final_loss": 3.2,
         "heldout_perplexity_base": 500.0, "heldout_perplexity": 150.0, "general_perplexity_base": 400.0, "general_perplexity": 420.0,
         "time_ratio": 0.5, "memory_ratio": 0.75},
        {"method": "lora", "cpt_run": "arm-lora", "evaluate_run": None, "trainable_parameters": 16, "total_parameters": 816,
         "trainable_share": 0.02, "step_seconds": 0.2, "train_seconds": 1.2, "peak_memory_mib": None, "final_loss": None,
         "heldout_perplexity_base": None, "heldout_perplexity": None, "general_perplexity_base": None, "general_perplexity": None,
         "time_ratio": 0.4, "memory_ratio": None},
    ]  # fmt: skip
    outputs = [write_table(pipeline, COMPARISON_TABLE, pa.Table.from_pylist(rows, schema=COMPARISON_SCHEMA), stage="compare", run_id="cmp")]
    commit_manifest(pipeline, start_manifest("compare", "1.0", "cmp", {}, recorded).finish(outputs))

    result = build_report(pipeline, "cmp", tmp_path / "cmp.html")

    assert result.sections == SECTIONS and result.images == 4
    markdown = result.markdown_path.read_text()
    assert "| spectrum-50 |           50.0% |      0.250 (×0.50) |             300.0 (×0.75) |      3.200 |       500.0 → 150.0" in markdown
    assert "| lora        |            2.0% |      0.200 (×0.40) |                         — |          — |                   —" in markdown
    assert "- spectrum-50: time ×0.50, memory ×0.75 of full" in markdown
    assert "| spectrum-50 |     6 |" in markdown  # the arm's training is named by its method
    assert all(image.startswith(PNG) for image in images_of(result.html_path.read_text()))


def test_the_heatmap_draws_tensors_without_a_layer_and_without_an_snr():
    cells = [HeatCell(0, "q", 1.0, selected=True, changed=True), HeatCell(1, "q", float("nan")), HeatCell(None, "lm_head", 30.0)]
    assert snr_heatmap(cells, "title", show_changed=True).startswith(PNG)
    assert snr_heatmap(cells[:1], "one cell", show_changed=False).startswith(PNG)


def test_many_experts_fold_into_one_column_per_projection(store, tmp_path):
    rows = [
        {**snr_rows()[0], "tensor_name": f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight", "module_type": f"mlp.experts.{e}.up_proj",
         "layer_index": layer, "snr": 1.0 + e}
        for layer in range(2)
        for e in range(48)
    ]  # fmt: skip
    scan = commit(store, "moe", "snr_scan", {SNR_TABLE: rows})
    picked = [{"tensor_name": r["tensor_name"], "module_type": r["module_type"], "snr": r["snr"], "parameter_count": 10,
               "selected": r["snr"] > 24} for r in rows]  # fmt: skip
    commit(store, "moe", "layer_select", {SELECTION_TABLE: picked}, inputs=scan)

    result = build_report(store, "moe", tmp_path / "moe.html")

    assert re.search(r"\| mlp\.experts\.\\\*\.up_proj \| +48 / 96 \|", result.markdown_path.read_text())  # one row, not 48; * escaped
    assert result.images == 1


def test_bad_report_inputs_are_clear_errors(pipeline, tmp_path):
    commit(pipeline, "fetched", "download", {})
    (tmp_path / "a-file").write_text("")
    (tmp_path / "taken.html").write_text("")
    cases = [
        ("nope", tmp_path / "r.html", InputError, r"run 'nope' has no committed stage in .*nothing to report"),
        ("fetched", tmp_path / "r.html", InputError, r"run 'fetched' has nothing to report: no SNR scan.*fetched/download"),
        ("eval", tmp_path / "a-file" / "r.html", InputError, r"cannot be created: .*a-file is a file, not a folder"),
        ("eval", tmp_path, InputError, "must be an .html file"),
        ("eval", tmp_path / "report.pdf", InputError, "must be an .html file"),
        ("eval", tmp_path / "taken.html", OutputExistsError, "already exists"),
    ]
    for run_id, out, error, message in cases:
        with pytest.raises(error, match=message):
            build_report(pipeline, run_id, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "store", "taken.html"]
    assert build_report(pipeline, "eval", tmp_path / "taken.html", overwrite=True).images == 3


# --- the real thing: stages run on a tiny model, the page loaded in Chromium ---------------------------------


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """scan -> select -> cpt -> evaluate on a tiny 4-layer Llama, each its own run, and a comparison naming the arm."""
    from stages import cpt, evaluate, layer_select, snr_scan
    from stages.core.stage import StageContext
    from stages.evaluation.corpus import python_docs
    from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
    from stages.sample_models.tokenizer import domain_corpus, write_tokenizer

    root = tmp_path_factory.mktemp("report")
    domain, general = domain_corpus(160, seed=1), python_docs().texts[:120]
    model = write_synthetic_model(root / "model", SyntheticSpec(**{**TINY, "num_hidden_layers": 4}))
    write_tokenizer(model, domain + general, TINY["vocab_size"])
    for name, texts in (("logs", domain), ("general", general[:60])):
        (root / name).mkdir()
        (root / name / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    store = open_store(str(root / "store"))
    quiet = {"work_dir": root / "work", "progress": False}
    snr_scan.run(snr_scan.ScanConfig(model_dir=str(model), model_id="tiny-llama"), StageContext(store, run_id="scan", **quiet))
    layer_select.run(layer_select.SelectConfig(snr_run="scan", top_percent=50), StageContext(store, run_id="select", **quiet))
    cpt.run(
        cpt.CptConfig(model=str(model), data=str(root / "logs"), selection_run="select", max_steps=10, seq_len=64, micro_batch_size=4,
                      learning_rate=3e-3, warmup_steps=2, save_steps=0, heldout_percent=20),
        StageContext(store, run_id="train", **quiet),
    )  # fmt: skip
    evaluate.run(
        evaluate.EvaluateConfig(cpt_run="train", general=str(root / "general"), seq_len=64, max_tokens=1024),
        StageContext(store, run_id="eval", **quiet),
    )
    evaluation = {(r["model"], r["metric"], r["dataset"]): r["value"] for r in gather(store, "eval").evaluations[0].rows}
    training = gather(store, "train").trainings[0]
    arm = {"method": "spectrum-50", "cpt_run": "train", "evaluate_run": "eval", "trainable_parameters": training.share[0],
           "total_parameters": training.share[1], "trainable_share": training.share[0] / training.share[1],
           "step_seconds": sum(r["step_seconds"] for r in training.metrics) / len(training.metrics), "train_seconds": 5.0,
           "peak_memory_mib": max(r["peak_memory_bytes"] for r in training.metrics) / 2**20, "final_loss": training.metrics[-1]["loss"],
           "heldout_perplexity_base": evaluation[("base", "perplexity", "heldout")],
           "heldout_perplexity": evaluation[("trained", "perplexity", "heldout")],
           "general_perplexity_base": evaluation[("base", "perplexity", "general:general")],
           "general_perplexity": evaluation[("trained", "perplexity", "general:general")],
           "time_ratio": 0.6, "memory_ratio": 0.8}  # fmt: skip
    full = {**arm, "method": "full", "cpt_run": "cmp-full", "evaluate_run": "cmp-full", "trainable_share": 1.0, "time_ratio": 1.0,
            "memory_ratio": 1.0, "step_seconds": arm["step_seconds"] / 0.6, "peak_memory_mib": arm["peak_memory_mib"] / 0.8}  # fmt: skip
    lora = {**arm, "method": "lora", "cpt_run": "cmp-lora", "evaluate_run": None, "trainable_share": 0.03, "heldout_perplexity": None,
            "general_perplexity": None, "memory_ratio": None, "peak_memory_mib": None}  # fmt: skip
    table = pa.Table.from_pylist([full, arm, lora], schema=COMPARISON_SCHEMA)
    inputs = [load_manifest(store, run, stage).recorded_output(output_key(run, stage, name))
              for run, stage, name in (("train", "cpt", TRAINING_FILE), ("eval", "evaluate", "evaluation.json"))]  # fmt: skip
    outputs = [write_table(store, COMPARISON_TABLE, table, stage="compare", run_id="cmp")]
    commit_manifest(store, start_manifest("compare", "1.0", "cmp", {"methods": ["full", "spectrum-50", "lora"]}, inputs).finish(outputs))
    return store


def open_in_chromium(html: Path, screenshot: Path) -> dict:
    """Load the page in headless Chromium; what it requested, its images and tables, and a full-page screenshot."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"the report's browser test needs Debian's Chromium at {CHROMIUM}: apt-get install -y --no-install-recommends chromium "
            "(.ci/run installs it)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the report's browser test needs the playwright package: pip install -c constraints.txt -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(html.as_uri(), wait_until="load")
            seen = {
                "requests": requests,
                "images": page.eval_on_selector_all("img", "all => all.map(i => ({complete: i.complete, width: i.naturalWidth}))"),
                "tables": page.eval_on_selector_all("table", "all => all.map(t => t.querySelectorAll('tbody tr').length)"),
                "headings": page.eval_on_selector_all("h2", "all => all.map(h => h.textContent)"),
                "sections": page.eval_on_selector_all("section", "all => all.map(s => s.id)"),
                "title": page.title(),
                "overflow": page.evaluate("document.documentElement.scrollWidth > window.innerWidth"),
            }
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


@pytest.mark.integration
def test_the_report_of_a_real_comparison_loads_in_a_browser(real_store, tmp_path):
    result = build_report(real_store, "cmp", tmp_path / "report.html")
    assert result.sections == SECTIONS and result.images == 4

    seen = open_in_chromium(result.html_path, tmp_path / "report.png")
    artifacts = REPO_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "report.png", artifacts / "report.png")

    assert seen["requests"] == [result.html_path.as_uri()], "the page requests nothing but itself"
    assert len(seen["images"]) == 4 and all(image["complete"] and image["width"] > 0 for image in seen["images"])
    assert seen["sections"] == list(SECTIONS) and seen["title"] == "Spectrum report: cmp"
    assert len(seen["tables"]) == 7 and all(rows > 0 for rows in seen["tables"])
    assert "Compute" in seen["headings"]  # GPU-hours per stage and for the run
    assert not seen["overflow"], "the page fits a laptop screen without scrolling sideways"
    assert (tmp_path / "report.png").read_bytes().startswith(PNG)

    # the evaluate run alone: everything upstream, no comparison; frozen tensors on the drift diagonal
    alone = build_report(real_store, "eval", tmp_path / "eval.html")
    assert alone.sections == ("snr", "training", "evaluation", "drift", "compute", "lineage") and alone.images == 3
    data = gather(real_store, "eval")
    [selection] = data.selections
    changed = {r["tensor_name"] for r in data.evaluations[0].drift if r["changed"]}
    assert changed == selection.changed and changed <= {r["tensor_name"] for r in selection.rows if r["selected"]}
    assert all(r["snr_before"] == r["snr_after"] for r in data.evaluations[0].drift if not r["changed"])
    seen = open_in_chromium(alone.html_path, tmp_path / "eval.png")
    assert len(seen["images"]) == 3 and all(image["width"] > 0 for image in seen["images"])
    assert "Not a comparison: no comparison table in this run or the runs it builds on." in alone.html_path.read_text()


def test_spectrum_report_writes_the_page_and_says_where(pipeline, tmp_path, capsys):
    from spectrum_cli.main import main

    assert main(["report", "eval", "--store", pipeline.root_uri, "--out", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert f"report of run eval: {tmp_path / 'r.html'} (3 charts;" in out and (tmp_path / "r.md").is_file()
    assert main(["report", "eval", "--store", pipeline.root_uri, "--out", str(tmp_path / "r.html")]) == 4  # exists
    assert "error:" in capsys.readouterr().err
