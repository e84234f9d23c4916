"""A model line through the real pipeline: each drop continues from the promoted model, the gate decides, the line records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.pipeline_config import load_pipeline_config, parse_pipeline_config
from stages.base.errors import InputError
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
from stages.store import StageRef, lines, load_manifest, open_store
from stages.store.trees import local_copy

from .helpers import TINY

LENIENT = {"heldout_perplexity": {"max_relative_change": 10.0}}  # any trained model passes
STRICT = {"heldout_perplexity": {"max_relative_change": -0.99}}  # no 3-step model passes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("line")
    model = write_tokenizer(write_synthetic_model(root / "model", SyntheticSpec(**TINY)), domain_corpus(200, seed=4), TINY["vocab_size"])
    for index in (1, 2, 3):
        drop = root / f"drop-{index}"
        drop.mkdir()
        drop.joinpath("logs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_corpus(80, seed=10 + index)))
    (root / "general.txt").write_text("\n".join(domain_corpus(30, seed=99)) + "\n")
    assert model.is_dir()
    return root


def line_config(folder: Path, inputs: Path, drop: int, gate: dict, **extra) -> Path:
    document = {
        "model": str(inputs / "model"),
        "data": str(inputs / f"drop-{drop}"),
        "store": str(folder.parent / "store"),
        "report": False,
        "line": {"name": "acme", "continue_from": "promoted"},
        "gate": gate,
        "stages": {
            "layer_select": {"top_percent": 50},
            "cpt": {"max_steps": 3, "seq_len": 64, "save_steps": 0, "learning_rate": 3e-3, "warmup_steps": 0},
            "evaluate": {"seq_len": 64, "max_tokens": 512, "general": str(inputs / "general.txt"), "snr_drift": False},
        },
    }
    for step in extra.get("pin", {}):  # a pinned step does not run: it takes no options
        document["stages"].pop(step, None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump({**document, **extra}))
    return folder / "pipeline.yaml"


def model_files(store, uri: str) -> dict[str, str]:
    folder, refs = local_copy(uri, store)
    return {name: ref["sha256"] for name, ref in refs.items()}


@pytest.mark.integration
def test_each_generation_continues_from_the_promoted_model_and_a_rejected_one_changes_nothing(prefect_api, inputs, tmp_path):
    from flows.pipeline import run_pipeline

    store = open_store(str(tmp_path / "store"))
    first = run_pipeline(load_pipeline_config(line_config(tmp_path / "g1", inputs, 1, LENIENT)), run="g1", drop="drop-1")
    assert "promote" in first.ran and any("generation 1 (run g1) promoted" in line for line in first.lines), first.lines
    production = lines.production(store, "acme")
    assert production.generation == 1 and production.model == StageRef("g1", "cpt").output_uri("model")

    # generation 2 starts from generation 1's trained model (its bytes), and its strict gate rejects it
    second = run_pipeline(load_pipeline_config(line_config(tmp_path / "g2", inputs, 2, STRICT)), run="g2", drop="drop-2")
    downloaded = load_manifest(store, "g2", "download")
    assert downloaded.parameters["model"] == production.model
    started = {ref["uri"].rsplit("/", 1)[-1]: ref["sha256"] for ref in downloaded.inputs if ref.get("role") == "model"}
    # every file of the promoted model but its card (README.md: the download takes the model's own files)
    assert started == {name: sha for name, sha in model_files(store, production.model).items() if name != "README.md"}
    assert any("generation 2 (run g2) rejected" in line for line in second.lines), second.lines
    assert lines.production(store, "acme").generation == 1

    # generation 3 starts from the last promoted model (generation 1's), not the rejected one
    third = run_pipeline(load_pipeline_config(line_config(tmp_path / "g3", inputs, 3, LENIENT)), run="g3", drop="drop-3")
    assert load_manifest(store, "g3", "download").parameters["model"] == StageRef("g1", "cpt").output_uri("model")
    assert lines.production(store, "acme").generation == 3 and any("generation 3 (run g3) promoted" in x for x in third.lines)

    records = lines.generations(store, "acme")
    assert [(r.generation, r.drop, r.run_id, r.decision) for r in records] == [
        (1, "drop-1", "g1", "promoted"), (2, "drop-2", "g2", "rejected"), (3, "drop-3", "g3", "promoted"),
    ]  # fmt: skip
    rejected = records[1].reasons
    assert rejected and not rejected[0]["passed"] and rejected[0]["measured"] is not None
    assert records[1].starting_model["uri"] == records[2].starting_model["uri"] == StageRef("g1", "cpt").output_uri("model")
    assert records[0].starting_model["uri"] == str(inputs / "model") and len(records[0].starting_model["sha256"]) == 64

    # the audit of production: its chain is generations 1 and 3 (2 was rejected), each naming exactly what it changed
    from stages.base.contracts import TRAINED_TENSORS_TABLE
    from stages.store import read_table
    from stages.store.line_audit import audit_line

    audit = audit_line(store, "acme")
    assert [entry["generation"] for entry in audit["chain"]] == [1, 3]
    for entry in audit["chain"]:
        table = read_table(store, TRAINED_TENSORS_TABLE, run_id=entry["run_id"]).to_pylist()
        assert sorted(entry["changed"]) == sorted(r["tensor_name"] for r in table if r["changed"]), entry["generation"]
    assert audit["never_trained"]["count"] > 0  # the frozen tensors, proved identical to the base by the sha256 chain

    # a generation with its selection pinned: it scans the starting model but trains generation 1's selection
    pinned = load_pipeline_config(line_config(tmp_path / "g4", inputs, 3, LENIENT, pin={"layer_select": "g1"}))
    fourth = run_pipeline(pinned, run="g4", drop="drop-4")
    assert "[layer_select] pinned to run g1" in fourth.lines and "layer_select" not in fourth.ran
    assert load_manifest(store, "g4", "layer_select").run_id == "g1" and load_manifest(store, "g4", "snr_scan").run_id != "g1"
    assert any("runs/g1/layer_select/" in ref["uri"] for ref in load_manifest(store, "g4", "cpt").inputs)
    assert lines.generations(store, "acme")[-1].generation == 4

    # the same drop again (a person re-running it) trains from today's production, but the line decides a drop once
    again = run_pipeline(load_pipeline_config(line_config(tmp_path / "g3", inputs, 3, LENIENT)), run="g3b", drop="drop-3")
    assert any("drop drop-3 was decided already, as generation 3 by run g3" in line for line in again.lines), again.lines
    assert len(lines.generations(store, "acme")) == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gate": None}, r"gate: missing; a model line promotes a generation only when it passes a gate"),
        ({"line": {"name": "acme", "continue_from": "latest"}}, r"line.continue_from: 'latest' is not one of promoted, base"),
        ({"line": {"nme": "acme"}}, r"line.nme: not a line setting \(did you mean name\?\)"),
        ({"line": {"name": "../x"}}, r"line.name: invalid line name"),
        ({"gate": {"heldout_perplexity": {"max_relative_chnage": 1}}}, r"gate.heldout_perplexity.max_relative_chnage: not a rule"),
        ({"gate": {"perplexity": {"max_delta": 1}}}, r"gate.perplexity"),
        ({"gate": {"heldout_perplexity": {"max_delta": "a lot"}}}, r"gate.heldout_perplexity.max_delta"),
        ({"stages": {"promote": {"rules": ["heldout_perplexity.max_delta=1"]}}}, r"stages.promote: the promotion gate is declared"),
        ({"pin": {"cpt": "r1"}}, r"pin.cpt: not a step that can be pinned; they are snr_scan, layer_select"),
        ({"pin": {"layer_select": "r1/cpt"}}, r"pin.layer_select 'r1/cpt' names a cpt step"),
        ({"pin": {"layer_select": 3}}, r"pin.layer_select: expected a run id"),
        ({"pin": {"layer_select": "r1"}, "stages": {"layer_select": {"top_percent": 10}}}, r"stages.layer_select: the step is pinned"),
        ({"stages": {"download": {"model": "x"}}}, r"stages.download.model: set from the config's top-level model:"),
    ],
)
def test_bad_line_and_gate_configs_name_the_field(tmp_path, change, message):
    document = {"model": "m", "data": "d", "line": {"name": "acme"}, "gate": LENIENT, "stages": {}}
    for key, value in change.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    with pytest.raises(InputError, match=message):
        parse_pipeline_config(document, tmp_path / "pipeline.yaml")


def test_a_gate_adds_the_promote_step_after_evaluate(tmp_path):
    config = parse_pipeline_config({"model": "m", "data": "d", "gate": LENIENT}, tmp_path / "pipeline.yaml")
    assert config.stages == ["download", "snr_scan", "layer_select", "cpt", "evaluate", "promote"]
    assert config.options["promote"] == {"rules": ["heldout_perplexity.max_relative_change=10.0"]}
    assert config.line is None


def test_a_line_never_trains_a_drop_older_than_one_it_trained(tmp_path):
    from flows.watch import _out_of_order

    store = open_store(str(tmp_path / "store"))
    model = {"uri": "m", "sha256": "0" * 64}
    lines.record_generation(
        store, "acme", drop="2026-11", run_id="r1", starting_model=model, model="store:runs/r1/cpt/model", decision="promoted", reasons=[]
    )
    assert _out_of_order(store, "acme", "2026-12") is None
    assert "trained already" in _out_of_order(store, "acme", "2026-11")
    reason = _out_of_order(store, "acme", "2026-10")
    assert "older than drop 2026-11" in reason and "not trained" in reason
    assert [s["drop"] for s in lines.skipped_drops(store, "acme")] == ["2026-10"]


def _decided(store, drop: str, run: str, decision: str = "promoted", record_only: bool = False):
    fields = dict(drop=drop, run_id=run, starting_model={"uri": "m", "sha256": "0" * 64}, model=f"store:runs/{run}/cpt/model")
    if record_only:  # a watcher that stopped between the generation record and production
        return lines.record_generation(store, "acme", decision=decision, reasons=[], **fields)
    return lines.record_decision(store, "acme", decision=decision, reasons=[], **fields)


def test_a_promotion_left_unfinished_is_completed_by_the_next_pass_but_never_after_a_newer_generation(tmp_path):
    from flows.watch import _out_of_order

    store = open_store(str(tmp_path / "store"))
    _decided(store, "d1", "r1", record_only=True)
    assert lines.production(store, "acme") is None
    assert "trained already" in _out_of_order(store, "acme", "d1")  # the next pass finishes what the stopped watcher began
    assert lines.production(store, "acme").generation == 1

    _decided(store, "d2", "r2", record_only=True)
    _decided(store, "d3", "r3")  # production moves to generation 3; generation 2's promotion was never completed
    assert "trained already" in _out_of_order(store, "acme", "d2") and lines.production(store, "acme").generation == 3
    record, pointer = _decided(store, "d2", "r2-again")  # d2 re-run by hand: decided already, production does not go back
    assert record.run_id == "r2" and pointer is None and lines.production(store, "acme").generation == 3
    with pytest.raises(InputError, match="the gate promotes only the newest generation"):
        lines.promote(store, "acme", 2, lines.GATE, "late")


def test_a_line_refuses_a_drop_name_it_cannot_record_before_anything_runs(tmp_path):
    from flows.pipeline import run_pipeline

    folder = tmp_path / "Nov 2026"
    folder.mkdir()
    document = {"model": "m", "data": str(folder), "store": str(tmp_path / "store"), "line": {"name": "acme"}, "gate": LENIENT}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(InputError, match=r"invalid drop name .*'Nov 2026'"):
        run_pipeline(load_pipeline_config(tmp_path / "pipeline.yaml"))
    assert not (tmp_path / "store").exists()


def test_a_drop_older_than_one_claimed_already_waits_for_no_one_and_is_not_trained(tmp_path):
    from flows.watch import _claimed_later, claims_folder

    store = open_store(str(tmp_path / "store"))
    store.put_bytes(f"{claims_folder('incoming', 'acme')}/2026-11/0.json", b"{}")  # being trained by another watcher
    assert "older than drop 2026-11, which the line claimed already" in _claimed_later(store, "incoming", "2026-10", "acme")
    assert _claimed_later(store, "incoming", "2026-11", "acme") is None and _claimed_later(store, "incoming", "2026-12", "acme") is None
    assert _claimed_later(store, "incoming", "2026-10", "other-line") is None  # another line's claims are its own


def test_drops_numbered_without_padding_run_in_number_order(tmp_path):
    from flows.watch import _claimed_later, _out_of_order, claims_folder, drop_order, ready_drops

    store = open_store(str(tmp_path / "store"))
    for name in ("drop-10", "drop-9", "drop-8"):
        store.put_bytes(f"incoming/{name}/_SUCCESS", b"")
    assert ready_drops(store, "incoming") == ["drop-8", "drop-9", "drop-10"]
    assert sorted(["2026-12-01", "2026-11-30", "2026-02-01"], key=drop_order) == ["2026-02-01", "2026-11-30", "2026-12-01"]
    _decided(store, "drop-9", "r9")
    assert _out_of_order(store, "acme", "drop-10") is None  # newer than drop-9: trained next, not skipped for good
    assert "older than drop drop-9" in _out_of_order(store, "acme", "drop-8")
    store.put_bytes(f"{claims_folder('incoming', 'acme')}/drop-9/0.json", b"{}")
    assert _claimed_later(store, "incoming", "drop-10", "acme") is None  # drop-9 is the earlier one
    assert "older than drop drop-9" in _claimed_later(store, "incoming", "drop-8", "acme")


def test_a_line_s_next_run_completes_a_promotion_its_last_run_left_unfinished(tmp_path):
    """A manual run (or a watcher after the drop's folder was cleaned up) must not train from the generation before."""
    from flows.pipeline import PipelineResult, _starting_point

    store = open_store(str(tmp_path / "store"))
    _decided(store, "d1", "r1")
    _decided(store, "d2", "r2", record_only=True)  # passed its gate; its run stopped before production moved
    document = {"model": "base", "data": "d", "store": str(tmp_path / "store"), "line": {"name": "acme"}, "gate": LENIENT}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(document))
    config = load_pipeline_config(tmp_path / "pipeline.yaml")
    started = _starting_point(config, store, PipelineResult(run_id="r3", store=str(tmp_path / "store")))
    assert started.model == "store:runs/r2/cpt/model" and lines.production(store, "acme").generation == 2
    _decided(store, "d3", "r3", decision="rejected")
    again = _starting_point(config, store, PipelineResult(run_id="r4", store=str(tmp_path / "store")))
    assert again.model == "store:runs/r2/cpt/model"  # a rejection changes nothing
