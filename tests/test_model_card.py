"""Model cards: the README.md in every trained model folder, and `spectrum card RUN`, both from the store's records."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from spectrum_cli import card_command
from spectrum_cli.prices import add_price_argument, currency_from_args, prices_from_args
from stages import cpt, evaluate, layer_select, snr_scan
from stages.base.contracts import (
    CPT,
    DOWNLOAD,
    EVALUATE,
    LAYER_SELECT,
    SELECTION_JSON_FILE,
    SNR_SCAN,
    SNR_TABLE,
    TRAINED_TENSORS_TABLE,
    TRAINING_FILE,
)
from stages.base.errors import InputError, SpectrumError
from stages.core.cli import execute
from stages.core.stage import StageContext
from stages.download import DownloadConfig, read_summary
from stages.download import run as download
from stages.report.card import CardFacts, EvaluationFact, TensorFact, card_facts, render_card, training_card, training_facts
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
from stages.selection.document import POLICY_OPTIONS, SelectionDocument
from stages.store import commit_manifest, load_manifest, open_store, output_key, read_output, read_table, start_manifest, write_table
from stages.store.compute import Prices

from .helpers import COMMIT, TINY, hub_cache_snapshot

HUB_ID = "org/tiny-card"
YAML_SELECTION = "unfrozen_parameters:\n- ^lm_head.weight$\n- model.layers.1.mlp\n"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def card_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`spectrum card …` as the CLI runs it (the lead wires card_command into spectrum_cli/main.py)."""
    parser = argparse.ArgumentParser(prog="spectrum card")
    card_command.add_arguments(parser)
    code = execute(card_command.run, parser.parse_args(list(argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- render_card: fast ---------------------------------------------------------------------------------


def facts(**overrides) -> CardFacts:
    values = dict(
        run_id="20260101T120000Z-1a2b3c4d",
        step=CPT,
        code_version="1.2.3",
        store_uri="s3://***@bucket/prefix",
        base_model="org/base",
        datasets=("sha256-" + "a" * 64,),
        data_location="store:data/sha256-" + "a" * 64,
        method="selection",
        lora_rank=0,
        selection_source="s3://bucket/prefix/runs/sel/layer_select/selection.json",
        selection_sha256="b" * 64,
        policy={"policy": "reference", "top_percent": 25.0},
        estimator="reference",
        scan="scan/snr_scan",
        trainable_parameters=250,
        total_parameters=1000,
        embeddings=(("model.embed_tokens.weight", "input embeddings", False), ("lm_head.weight", "output embeddings", True)),
        tensors=(TensorFact("lm_head.weight", 200, 3.5, 0.01), TensorFact("odd|name`x\nweight", 50, None, None)),
        steps=8,
    )
    return CardFacts(**{**values, **overrides})


def test_the_card_has_hugging_face_metadata_and_every_section():
    card = render_card(facts())
    assert front_matter(card) == {
        "base_model": "org/base",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["spectrum", "continued-pretraining"],
        "datasets": ["sha256-" + "a" * 64],
    }
    assert front_matter(render_card(facts(step="sft.x")))["tags"] == ["spectrum", "sft"]
    assert "top_percent: `25.0`" in card and "SNR estimator: reference" in card and "SNR scan: `scan/snr_scan`" in card
    assert "250 of 1,000 parameters (25.00%)" in card
    assert "`model.embed_tokens.weight` (input embeddings, frozen); `lm_head.weight` (output embeddings, trained)" in card
    assert "| `lm_head.weight` | 200 | 3.5 | 0.01 |" in card
    assert "| `odd\\|name'x weight` | 50 | n/a | n/a |" in card  # one table row, whatever the name holds
    assert "spectrum audit 20260101T120000Z-1a2b3c4d --store s3://***@bucket/prefix" in card
    assert "Not in this card: the model had not been evaluated; `spectrum card 20260101T120000Z-1a2b3c4d --step cpt --store" in card
    assert "Not in this card: it is recorded when the training has finished" in card


def test_the_card_shows_the_evaluation_with_deltas_and_the_compute_with_a_cost():
    evaluation = (EvaluationFact("perplexity", "heldout", 20.0, 15.0, -5.0), EvaluationFact("perplexity", "general", 30.0, None, None))
    card = render_card(facts(evaluation=evaluation, evaluation_source="run/evaluate", compute="0.0100 GPU-h, cost 0.05", gpu_hours=0.01))
    assert "From `run/evaluate`." in card
    assert "| perplexity | heldout | 20 | 15 | -5 |" in card and "| perplexity | general | 30 | n/a | n/a |" in card
    assert "Training: 0.0100 GPU-h, cost 0.05." in card


def test_full_and_lora_training_say_there_was_no_selection():
    assert "Full fine-tuning: every parameter was trained" in render_card(facts(method="full", policy=None, selection_source=None))
    assert "LoRA adapters of rank 8" in render_card(facts(method="lora", lora_rank=8, policy=None, selection_source=None))


# --- the card of a committed run: errors, fast -------------------------------------------------------------


def test_a_run_without_the_training_step_or_whose_training_failed_is_one_error_line(tmp_path, capsys):
    store = open_store(str(tmp_path / "store"))
    commit_manifest(store, start_manifest(CPT, "1.0", "broken", {}, []).finish([], status="failed"))
    with pytest.raises(InputError, match="run 'nothing' has no committed cpt step"):
        card_facts(store, "nothing")
    with pytest.raises(InputError, match="the cpt step of run 'broken' failed: it published no model"):
        card_facts(store, "broken")
    with pytest.raises(InputError, match="'evaluate' is not a training step"):
        card_facts(store, "broken", step=EVALUATE)
    code, out, err = card_cli(capsys, "broken/sft", "--store", str(tmp_path / "store"))
    assert code == 2 and out == "" and err.startswith("error: run 'broken' has no committed sft step") and err.count("\n") == 1
    (tmp_path / "taken.md").write_text("mine")
    code, _, err = card_cli(capsys, "broken", "--out", str(tmp_path / "taken.md"), "--store", str(tmp_path / "store"))
    assert code == 4 and "already exists" in err and (tmp_path / "taken.md").read_text() == "mine"


# --- the card reads the lineage it shows, not the store: fast ------------------------------------------------

TREE = "models/sha256-" + "c" * 64
UNRELATED = 30


def commit_stage(store, run_id, stage, inputs, parameters=None, outputs=()):
    manifest = start_manifest(stage, "1.0", run_id, parameters or {}, list(inputs)).finish(list(outputs))
    commit_manifest(store, manifest)
    return manifest


def publish_download(store, run_id, tree, hub_id):
    """A download of a hub model: its files in the `models/` tree, named by the download's manifest."""
    files = [store.put_bytes(f"{tree}/config.json", tree.encode())]
    source = [{"uri": f"hf://{hub_id}/config.json", "sha256": files[0].sha256, "size": files[0].size}]
    commit_stage(store, run_id, DOWNLOAD, source, {"model": hub_id, "model_commit": COMMIT}, files)
    return files


def lineage_store(root: Path, *, training_run: str = "train", download_run: str = "fetch", unrelated_downloads: bool = False):
    """scan -> select -> cpt of a model downloaded from the hub, each in its own run unless told; then UNRELATED runs of every
    stage (and, with `unrelated_downloads`, downloads of other models) that a card of the training must not read."""
    store = open_store(str(root / "store"))
    model_files = publish_download(store, download_run, TREE, HUB_ID)
    snr = [
        {"tensor_name": name, "scanned": True, "snr": snr, "is_input_embedding": False, "is_output_embedding": name == "lm_head.weight"}
        for name, snr in (("lm_head.weight", 7.5), ("model.layers.0.mlp.down_proj.weight", 2.0))
    ]
    table = write_table(store, SNR_TABLE, pa.Table.from_pylist(snr), stage=SNR_SCAN, run_id="scan")
    commit_stage(store, "scan", SNR_SCAN, model_files, outputs=[table])
    document = SelectionDocument(("lm_head.weight",), recorded_policy={"policy": "top_percent", "top_percent": 50.0}, estimator="mp")
    selection = store.put_bytes(output_key("select", LAYER_SELECT, SELECTION_JSON_FILE), document.to_json())
    commit_stage(store, "select", LAYER_SELECT, [table], outputs=[selection])
    record = {"model": f"store:{TREE}", "data": None, "steps": 2, "trainable_parameters": 10, "total_parameters": 40}
    rows = [
        {"tensor_name": "lm_head.weight", "trainable": True, "parameter_count": 10, "relative_change": 0.01},
        {"tensor_name": "model.layers.0.mlp.down_proj.weight", "trainable": False, "parameter_count": 30, "relative_change": 0.0},
    ]
    outputs = [
        store.put_bytes(output_key(training_run, CPT, TRAINING_FILE), json.dumps(record).encode()),
        write_table(store, TRAINED_TENSORS_TABLE, pa.Table.from_pylist(rows), stage=CPT, run_id=training_run),
    ]
    commit_stage(store, training_run, CPT, [*model_files, selection], outputs=outputs)
    for index in range(UNRELATED):
        run_id = f"unrelated-{index:03d}"
        other = store.put_bytes(f"blobs/{run_id}", run_id.encode())
        for stage in (SNR_SCAN, LAYER_SELECT, CPT, EVALUATE):
            commit_stage(store, run_id, stage, [other], {"index": index})
        if unrelated_downloads:
            publish_download(store, run_id, f"models/sha256-{index:064d}", f"org/other-{index}")
    return store


def count_reads(store, monkeypatch) -> tuple[list[str], list[str]]:
    """The manifest keys the store is asked for, and the prefixes it lists."""
    manifests, listed = [], []
    get_bytes, listing = store.get_bytes, store.list

    def counted_get(key, *args, **kwargs):
        if key.endswith("/manifest.json"):
            manifests.append(key)
        return get_bytes(key, *args, **kwargs)

    def counted_list(prefix, *args, **kwargs):
        listed.append(prefix)
        return listing(prefix, *args, **kwargs)

    monkeypatch.setattr(store, "get_bytes", counted_get)
    monkeypatch.setattr(store, "list", counted_list)
    return manifests, listed


def read_runs(keys: list[str]) -> set[str]:
    return {key.split("/")[1] for key in keys}


def test_a_card_reads_its_lineage_by_key_and_no_manifest_of_an_unrelated_run(tmp_path, monkeypatch):
    store = lineage_store(tmp_path)
    manifests, listed = count_reads(store, monkeypatch)

    card = render_card(card_facts(store, "train"))

    assert read_runs(manifests) == {"train", "select", "scan", "fetch"}  # the download found through the download index
    assert not any(prefix in ("", "runs/") or prefix.startswith("runs") for prefix in listed)
    metadata = front_matter(card)
    assert metadata["base_model"] == HUB_ID
    assert "written by `select/layer_select`" in card and "- top_percent: `50.0`" in card and "SNR estimator: mp" in card
    assert "SNR scan: `scan/snr_scan`" in card and "| `lm_head.weight` | 10 | 7.5 | 0.01 |" in card
    assert "`lm_head.weight` (output embeddings, trained)" in card


def test_a_pipelines_own_download_is_read_and_no_other(tmp_path, monkeypatch):
    store = lineage_store(tmp_path, training_run="pipe", download_run="pipe", unrelated_downloads=True)
    manifests, _ = count_reads(store, monkeypatch)

    assert card_facts(store, "pipe").base_model == HUB_ID
    assert read_runs(manifests) == {"pipe", "select", "scan"}


def training_inputs(store, run_id="train"):
    manifest = load_manifest(store, run_id, CPT)
    record = json.loads(read_output(store, manifest, TRAINING_FILE)[0])
    rows = read_table(store, TRAINED_TENSORS_TABLE, run_id=run_id).to_pylist()
    return manifest, record, rows, manifest.inputs[-1]


def test_a_broken_snr_table_gives_a_minimal_card_at_training_time_and_an_error_afterwards(tmp_path, caplog):
    store = lineage_store(tmp_path)
    manifest, record, rows, selection = training_inputs(store)
    assert training_facts(store, manifest, record, rows, selection) == card_facts(store, "train").at_training()
    part = next((tmp_path / "store" / "tables" / SNR_TABLE).rglob("*.parquet"))
    part.chmod(0o644)
    part.write_bytes(b"not parquet")

    with caplog.at_level(logging.WARNING, logger="stages.report.card"):
        card = training_card(store, manifest, record, rows, selection)
    assert [r.getMessage() for r in caplog.records if r.name == "stages.report.card"] == [
        f"the model card of train/cpt is minimal: {card.split('at training time: ')[1].split('; run `')[0]}"
    ]
    assert front_matter(card) == {
        "base_model": f"store:{TREE}",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["spectrum", "continued-pretraining"],
        "datasets": [],
    }
    reason = card.split("The full card could not be built at training time: ")[1]
    assert "\n" not in reason.split("`")[0] and f"; run `spectrum card train --step cpt --store {store.root_uri}` for it." in card
    assert "spectrum audit train" in card and "## Tensors trained" not in card
    with pytest.raises(SpectrumError):  # `spectrum card` says what is wrong instead
        card_facts(store, "train")


def test_a_store_that_fails_while_the_card_is_built_gives_a_minimal_card(tmp_path, monkeypatch):
    store = lineage_store(tmp_path)
    manifest, record, rows, selection = training_inputs(store)

    def down(*args, **kwargs):
        raise OSError("s3://key:secret@host/bucket: connection reset\nretry later")

    monkeypatch.setattr(store, "list", down)  # the download index cannot be listed
    facts = training_facts(store, manifest, record, rows, selection)
    assert facts.unavailable is not None and "secret" not in facts.unavailable and "\n" not in facts.unavailable
    assert facts.unavailable.startswith("OSError: s3://***@host/bucket: connection reset retry later")


def price_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_price_argument(parser)
    return parser.parse_args(list(argv))


def test_currency_marks_the_cost_and_is_checked():
    assert currency_from_args(price_args()) == ""
    assert currency_from_args(price_args("--price-per-device-hour", "2", "--currency", "$")) == "$"
    with pytest.raises(InputError, match=r"--currency '\$' marks a cost: give it with --price-per-device-hour"):
        prices_from_args(price_args("--currency", "$"))
    with pytest.raises(InputError, match="expected a short currency mark"):
        prices_from_args(price_args("--price-per-device-hour", "2", "--currency", "dollars!!"))
    with pytest.raises(InputError, match="expected a short currency mark"):
        currency_from_args(price_args("--price-per-device-hour", "2", "--currency", "$\n"))


def test_spectrum_card_shows_the_cost_in_the_currency_given(tmp_path, capsys):
    store = lineage_store(tmp_path)
    compute = {"device": "cuda", "device_name": "H200", "device_count": 2, "seconds": 1800.0, "device_seconds": 3600.0}
    manifest = load_manifest(store, "train", CPT)
    (tmp_path / "store" / "runs" / "train" / CPT / "manifest.json").unlink()
    commit_manifest(store, replace(manifest, compute=compute))
    code, out, err = card_cli(capsys, "train", "--store", store.root_uri, "--price-per-device-hour", "4.5", "--currency", "EUR ")
    assert code == 0 and err == "" and "Training: 1.0000 GPU-h, cost EUR 4.50." in out
    code, _, err = card_cli(capsys, "train", "--store", store.root_uri, "--currency", "$")
    assert code == 2 and err.startswith("error: --currency '$' marks a cost") and err.count("\n") == 1


# --- the real thing: trained models carry their card ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A hub model and a drop downloaded, scanned and selected; `spectrum cpt` by hand from them and evaluated in the
    same run; and a cpt of local folders with a local YAML selection, written to --out-dir too."""
    from spectrum_cli.main import main

    root = tmp_path_factory.mktemp("card")
    corpus = domain_corpus(120)
    model = write_tokenizer(write_synthetic_model(root / "model", SyntheticSpec(**TINY)), corpus, TINY["vocab_size"])
    (root / "drop").mkdir()
    (root / "drop" / "logs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus))
    (root / "selection.yaml").write_text(YAML_SELECTION)
    snapshot = hub_cache_snapshot(root / "hub", HUB_ID, COMMIT, {p.name: p.read_bytes() for p in model.iterdir()})
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    store_dir = root / "store"
    store = open_store(str(store_dir))
    quiet = {"work_dir": root / "work", "progress": False}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(root / "hub"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("SPECTRUM_CACHE", str(root / "cache"))
        fetched = download(DownloadConfig(model=HUB_ID, data=str(root / "drop")), StageContext(store, run_id="fetch", **quiet))
        summary = read_summary(store, fetched.manifest)
        models, data = (f"store:{entry['uri'].split(store.root_uri.rstrip('/') + '/')[1]}" for entry in (summary["model"], summary["data"]))
        snr_scan.run(snr_scan.ScanConfig(model_dir=models, model_id=HUB_ID, workers=1), StageContext(store, run_id="scan", **quiet))
        layer_select.run(layer_select.SelectConfig(snr_run="scan", top_percent=50), StageContext(store, run_id="select", **quiet))
        small = ["--max-steps", "2", "--seq-len", "64", "--micro-batch-size", "2", "--warmup-steps", "1", "--save-steps", "0"]
        argv = ["cpt", models, "--data", data, "--selection-run", "select", "--store", str(store_dir), "--run-id", "train"]
        assert main([*argv, *small, "--heldout-percent", "20", "--no-progress", "--work-dir", str(root / "work")]) == 0
        evaluate.run(
            evaluate.EvaluateConfig(cpt_run="train", general=str(root / "drop"), seq_len=32, max_tokens=256, snr_drift=False),
            StageContext(store, run_id="train", **quiet),
        )
        local = cpt.CptConfig(
            model=str(model), data=str(root / "drop"), selection=str(root / "selection.yaml"), out_dir=str(root / "out"),
            max_steps=2, seq_len=64, micro_batch_size=2, warmup_steps=1, save_steps=0,
        )  # fmt: skip
        cpt.run(local, StageContext(store, run_id="local", **quiet))
    return store, root, summary


def committed_card(store, run_id: str) -> str:
    return (Path(store.root_uri.removeprefix("file://")) / "runs" / run_id / CPT / "model" / "README.md").read_text()


@pytest.mark.integration
def test_the_card_in_the_model_folder_is_the_card_of_the_stores_records(trained):
    store, _, summary = trained
    card = committed_card(store, "train")
    assert card == render_card(card_facts(store, "train").at_training())  # generated from records, at produce time and after
    manifest = load_manifest(store, "train", CPT)
    assert any(o["key"] == "runs/train/cpt/model/README.md" for o in manifest.outputs)  # a committed output of the model

    metadata = front_matter(card)
    assert metadata["base_model"] == HUB_ID  # the download came from the hub
    assert metadata["datasets"] == [summary["data"]["tree"]] and metadata["tags"] == ["spectrum", "continued-pretraining"]
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    selection = json.loads((Path(store.root_uri.removeprefix("file://")) / "runs/select/layer_select/selection.json").read_text())
    assert all(f"- {name}: `{json.dumps(selection[name])}`" in card for name in POLICY_OPTIONS if name in selection)
    assert "SNR scan: `scan/snr_scan`" in card
    assert f"SNR estimator: {selection['estimator']}" in card
    training = json.loads((Path(store.root_uri.removeprefix("file://")) / "runs/train/cpt/training.json").read_text())
    assert f"{training['trainable_parameters']:,} of {training['total_parameters']:,} parameters" in card
    assert "`model.embed_tokens.weight` (input embeddings" in card
    snr = {r["tensor_name"]: r["snr"] for r in read_table(store, "snr", run_id="scan").to_pylist() if r["scanned"]}
    tensors = [r for r in read_table(store, "trained_tensors", run_id="train").to_pylist() if r["trainable"]]
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [r["tensor_name"] for r in tensors]
    for row, tensor in zip(rows, tensors, strict=True):
        shown = row.split("|")[3].strip()
        expected = snr.get(tensor["tensor_name"])
        assert shown == ("n/a" if expected is None else f"{expected:.6g}"), row
    assert f"spectrum audit train --store {store.root_uri}" in card and "no evaluation" not in card


@pytest.mark.integration
def test_spectrum_card_adds_the_evaluation_and_the_gpu_hours(trained, capsys, tmp_path):
    store, _, _ = trained
    code, out, err = card_cli(capsys, "train", "--store", store.root_uri, "--price-per-device-hour", "2.5")
    assert code == 0 and err == ""
    assert "From `train/evaluate`." in out and "| perplexity | heldout |" in out
    evaluation = read_table(store, "evaluation", run_id="train").to_pylist()
    delta = next(r["value"] for r in evaluation if r["model"] == "delta" and r["metric"] == "perplexity" and r["dataset"] == "heldout")
    assert f"{delta:.6g} |" in next(line for line in out.splitlines() if line.startswith("| perplexity | heldout |"))
    compute = load_manifest(store, "train", CPT).compute
    assert compute["device"] == "cpu" and "0.0000 GPU-h" in out and f"{compute['device_seconds'] / 3600:.4f} CPU-h" in out
    assert f"cost {compute['device_seconds'] / 3600 * 2.5:.2f}" in out
    assert out.rstrip("\n") == render_card(card_facts(store, "train", prices=Prices({}, 2.5))).rstrip("\n")

    out_file = tmp_path / "card.md"
    code, out, _ = card_cli(capsys, "train", "--store", store.root_uri, "--out", str(out_file))
    assert code == 0 and "wrote the model card of train/cpt" in out and front_matter(out_file.read_text())["base_model"] == HUB_ID
    code, _, err = card_cli(capsys, "train", "--store", store.root_uri, "--evaluation-run", "local")
    assert code == 2 and "error: --evaluation-run local: run 'local' has no committed evaluate step" in err


@pytest.mark.integration
def test_a_model_trained_from_local_folders_has_its_card_in_the_store_and_in_out_dir(trained):
    store, root, _ = trained
    card = committed_card(store, "local")
    assert (root / "out" / "README.md").read_text() == card
    assert card == render_card(card_facts(store, "local").at_training())
    metadata = front_matter(card)
    assert metadata["base_model"] == str((root / "model").resolve())  # not from the hub: where training.json says it was
    assert metadata["datasets"] == [read_summary(store, load_manifest(store, "fetch", "download"))["data"]["tree"]]  # same drop
    assert "unfrozen_parameters: `\"2 patterns (an Axolotl YAML)\"`" in card
    assert "`lm_head.weight` (output embeddings, trained)" in card
    assert "No evaluation: run local has no committed evaluate step" in render_card(card_facts(store, "local"))


@pytest.mark.integration
def test_a_training_whose_snr_table_is_broken_commits_with_a_minimal_card(trained, caplog):
    store, root, summary = trained
    quiet = {"work_dir": root / "work", "progress": False}
    models, data = (f"store:{summary[kind]['uri'].split(store.root_uri.rstrip('/') + '/')[1]}" for kind in ("model", "data"))
    scan_config = snr_scan.ScanConfig(model_dir=models, model_id="another-label", workers=1)  # not the fixture's scan: not reused
    snr_scan.run(scan_config, StageContext(store, run_id="scan-broken", **quiet))
    layer_select.run(layer_select.SelectConfig(snr_run="scan-broken", top_percent=50), StageContext(store, run_id="select-broken", **quiet))
    part = next((Path(store.root_uri.removeprefix("file://")) / "tables" / SNR_TABLE).glob("stage=*/run_id=scan-broken/*.parquet"))
    part.chmod(0o644)
    part.write_bytes(b"not parquet")  # the selection reads fine; the card's SNR column cannot be read
    config = cpt.CptConfig(
        model=models, data=data, selection_run="select-broken", max_steps=1, seq_len=64, micro_batch_size=2, warmup_steps=1, save_steps=0,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="stages.report.card"):
        cpt.run(config, StageContext(store, run_id="broken", **quiet))

    manifest = load_manifest(store, "broken", CPT)
    assert manifest.status == "succeeded"
    card = committed_card(store, "broken")
    assert "The full card could not be built at training time: IntegrityError: " in card
    assert f"run `spectrum card broken --step cpt --store {store.root_uri}` for it." in card
    assert front_matter(card)["tags"] == ["spectrum", "continued-pretraining"]
    warned = [r.getMessage() for r in caplog.records if r.name == "stages.report.card"]
    assert len(warned) == 1 and warned[0].startswith("the model card of broken/cpt is minimal: IntegrityError: ")
