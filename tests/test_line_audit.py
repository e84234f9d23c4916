"""`spectrum audit --line`: a line's chain of generations, what each changed, and the sha256 proof of the rest.

The line is built by hand in a file store (cpt and snr_scan stages committed with their tables, and the
line's generation records), so no model is trained: generation 1 promoted, 2 rejected, 3 promoted from 1.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pytest

from spectrum_cli.main import main
from stages.base.contracts import CPT, SNR_SCAN, SNR_TABLE, TRAINED_TENSORS_TABLE
from stages.base.errors import CorruptWeightsError, InputError
from stages.core.execution import execute_stage
from stages.core.stage import StageContext
from stages.store import lines, open_store
from stages.store.line_audit import IDENTICAL, audit_line
from stages.training.tensor_audit import TRAINED_TENSORS_SCHEMA

LINE = "acme-legal"
BASE = "hf:tiny-llama@main"
EMBED = "model.embed_tokens.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
HEAD = "lm_head.weight"
TENSORS = (EMBED, Q0, UP0, UP1, HEAD)
CHANGES = {"g1": {Q0: 0.1, HEAD: 0.2}, "g2": {UP1: 0.3}, "g3": {UP0: 0.05, Q0: 0.5}}  # run -> tensor -> relative change
SNR = {"g1": {Q0: 4.0, UP0: 2.0, UP1: 1.0}, "g2": {Q0: 3.5, UP0: 2.5, UP1: 1.5}, "g3": {Q0: 3.0, UP0: 2.2, UP1: 1.1}}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_uri(run: str) -> str:
    return f"store:runs/{run}/cpt/model"


def commit(store, stage: str, run: str, table_name: str, rows: list[dict], schema: pa.Schema | None = None) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    execute_stage(stage, StageContext(store, run_id=run, progress=False), {"fake": run}, [], lambda r: [r.write_table(table_name, table)])


def train(store, run: str, before: dict[str, str], tamper: dict[str, str] | None = None) -> dict[str, str]:
    """Commit run's snr_scan (of `before`) and cpt (changing CHANGES[run]); the tensors' sha256 after it."""
    scan = [{"tensor_name": n, "snr": SNR[run].get(n), "scanned": n in SNR[run], "tensor_sha256": before[n]} for n in TENSORS]
    commit(store, SNR_SCAN, run, SNR_TABLE, scan)
    after = {n: digest(f"{before[n]}+{run}") if n in CHANGES[run] else before[n] for n in TENSORS}
    rows = [
        {
            "tensor_name": n,
            "trainable": n in CHANGES[run] or n == UP1,
            "parameter_count": 64,
            "dtype": "float32",
            "sha256_before": (tamper or {}).get(n, before[n]),
            "sha256_after": after[n],
            "changed": n in CHANGES[run],
            "relative_change": CHANGES[run].get(n, 0.0),
        }
        for n in TENSORS
    ]
    commit(store, CPT, run, TRAINED_TENSORS_TABLE, rows, TRAINED_TENSORS_SCHEMA)
    return after


def decide(store, run: str, start: str, start_sha: str, decision: str) -> None:
    starting = {"uri": start, "sha256": start_sha}
    fields = {"drop": f"drop-{run}", "run_id": run, "starting_model": starting, "model": model_uri(run), "decision": decision}
    lines.record_decision(store, LINE, reasons=[], **fields)


def build(store, tamper: dict[str, str] | None = None) -> dict[str, str]:
    """Generations 1 (promoted), 2 (rejected, from 1), 3 (promoted, from 1); the base's sha256 per tensor."""
    base = {n: digest(n) for n in TENSORS}
    after1 = train(store, "g1", base)
    decide(store, "g1", BASE, digest("base"), lines.PROMOTED)
    train(store, "g2", after1)
    decide(store, "g2", model_uri("g1"), digest("g1"), lines.REJECTED)
    train(store, "g3", after1, tamper)
    decide(store, "g3", model_uri("g1"), digest("g1"), lines.PROMOTED)
    return base


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def test_the_production_audit_names_what_each_chain_generation_changed(store):
    base = build(store)
    audit = audit_line(store, LINE)
    assert audit["target"] | {"model": None} == {"generation": 3, "run_id": "g3", "model": None, "decision": "promoted", "production": True}
    assert audit["base"] == {"uri": BASE, "sha256": digest("base")}
    assert [g["generation"] for g in audit["chain"]] == [1, 3]  # the rejected generation 2 is no ancestor
    assert audit["excluded"] == [{"generation": 2, "run_id": "g2", "drop": "drop-g2", "decision": "rejected"}]
    assert {g["run_id"]: set(g["changed"]) for g in audit["chain"]} == {"g1": set(CHANGES["g1"]), "g3": set(CHANGES["g3"])}
    assert [g["scan_run"] for g in audit["chain"]] == ["g1", "g3"]

    tensors = {t["tensor_name"]: t for t in audit["tensors"]}
    assert set(tensors) == set(TENSORS)
    assert {n: t["trained_in"] for n, t in tensors.items()} == {EMBED: [], Q0: [1, 3], UP0: [3], UP1: [], HEAD: [1]}
    assert tensors[Q0]["cumulative_relative_change"] == pytest.approx(1.1 * 1.5 - 1)
    assert tensors[UP0]["cumulative_relative_change"] == pytest.approx(0.05)
    assert tensors[UP1]["cumulative_relative_change"] == 0.0  # changed by generation 2 only, which is not in the chain
    assert [g["snr"] for g in tensors[Q0]["generations"]] == [4.0, 3.0]
    assert [g["snr"] for g in tensors[HEAD]["generations"]] == [None, None]  # never scanned
    assert audit["never_trained"] == {"count": 2, "proof": IDENTICAL, "tensors": [EMBED, UP1]}
    for name in (EMBED, UP1):
        assert tensors[name]["proof"] == IDENTICAL and tensors[name]["sha256_now"] == tensors[name]["sha256_base"] == base[name]
    assert tensors[Q0]["sha256_now"] != base[Q0] and tensors[Q0]["proof"] == "changed by generation 1, 3"


def test_a_generation_audit_follows_its_own_chain(store):
    build(store)
    audit = audit_line(store, LINE, generation=2)
    assert audit["target"]["generation"] == 2 and audit["target"]["production"] is False
    assert [g["generation"] for g in audit["chain"]] == [1, 2] and audit["excluded"] == []
    trained = {t["tensor_name"]: t["trained_in"] for t in audit["tensors"] if t["trained_in"]}
    assert trained == {Q0: [1], HEAD: [1], UP1: [2]}
    assert [g["generation"] for g in audit_line(store, LINE, generation=1)["chain"]] == [1]


def test_a_rejected_generation_promoted_by_hand_is_in_the_chain_of_what_started_from_it(store):
    base = {n: digest(n) for n in TENSORS}
    after1 = train(store, "g1", base)
    decide(store, "g1", BASE, digest("base"), lines.PROMOTED)
    after2 = train(store, "g2", after1)
    decide(store, "g2", model_uri("g1"), digest("g1"), lines.REJECTED)
    lines.manual_promote(store, LINE, "g2", "the gate was too strict for this drop")
    train(store, "g3", after2)
    decide(store, "g3", model_uri("g2"), digest("g2"), lines.PROMOTED)
    audit = audit_line(store, LINE)
    assert [g["generation"] for g in audit["chain"]] == [1, 2, 3] and audit["excluded"] == []
    trained = {t["tensor_name"]: t["trained_in"] for t in audit["tensors"] if t["trained_in"]}
    assert trained == {Q0: [1, 3], HEAD: [1], UP1: [2], UP0: [3]}
    assert audit["never_trained"]["tensors"] == [EMBED]


def test_the_cli_summary_and_json(store, capsys):
    build(store)
    assert main(["audit", "--line", LINE, "--store", store.root_uri]) == 0
    text = capsys.readouterr().out
    assert "the production model of generation 3 (run g3" in text
    assert "generation 1: run g1" in text and "generation 3: run g3" in text and "2 of 5 tensors changed" in text
    assert "not in the chain: generation 2 (run g2, rejected)" in text
    assert f"tensors never trained since the base: 2, each {IDENTICAL}" in text
    assert main(["audit", "--line", LINE, "--generation", "2", "--json", "--store", store.root_uri]) == 0
    assert json.loads(capsys.readouterr().out) == audit_line(store, LINE, generation=2)


def test_a_tampered_sha256_breaks_the_chain(store, capsys):
    build(store, tamper={EMBED: digest("tampered")})  # generation 3 claims another starting EMBED than generation 1 left
    with pytest.raises(CorruptWeightsError, match=rf"generation 3 \(run g3\): tensor {EMBED} was sha256 {digest('tampered')[:12]}"):
        audit_line(store, LINE)
    assert audit_line(store, LINE, generation=2)["never_trained"]["count"] == 2  # the chain through generation 2 is intact
    assert main(["audit", "--line", LINE, "--store", store.root_uri]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: sha256 chain broken at line acme-legal, generation 3") and len(err.strip().splitlines()) == 1


def test_a_table_whose_unchanged_tensor_moved_breaks_the_chain(store):
    base = {n: digest(n) for n in TENSORS}
    scan = [{"tensor_name": n, "snr": None, "scanned": False, "tensor_sha256": base[n]} for n in TENSORS]
    commit(store, SNR_SCAN, "g1", SNR_TABLE, scan)
    rows = [
        {"tensor_name": n, "trainable": False, "parameter_count": 1, "dtype": "float32", "sha256_before": base[n],
         "sha256_after": digest("moved") if n == EMBED else base[n], "changed": False, "relative_change": 0.0}
        for n in TENSORS
    ]  # fmt: skip
    commit(store, CPT, "g1", TRAINED_TENSORS_TABLE, rows, TRAINED_TENSORS_SCHEMA)
    decide(store, "g1", BASE, digest("base"), lines.PROMOTED)
    with pytest.raises(CorruptWeightsError, match=f"tensor {EMBED} is marked unchanged but its sha256 went"):
        audit_line(store, LINE)


def test_a_scan_of_another_model_breaks_the_chain(store):
    build(store)
    other = {n: digest(f"other {n}") for n in TENSORS}
    scan = [{"tensor_name": n, "snr": 1.0, "scanned": True, "tensor_sha256": other[n]} for n in TENSORS]
    commit(store, SNR_SCAN, "g4", SNR_TABLE, scan)
    rows = audit_line(store, LINE)["tensors"]
    cpt = [
        {"tensor_name": t["tensor_name"], "trainable": False, "parameter_count": 1, "dtype": "float32",
         "sha256_before": t["sha256_now"], "sha256_after": t["sha256_now"], "changed": False, "relative_change": 0.0}
        for t in rows
    ]  # fmt: skip
    commit(store, CPT, "g4", TRAINED_TENSORS_TABLE, cpt, TRAINED_TENSORS_SCHEMA)
    decide(store, "g4", model_uri("g3"), digest("g3"), lines.PROMOTED)
    with pytest.raises(CorruptWeightsError, match="in the SNR scan of run g4 .* the model scanned is not the model trained"):
        audit_line(store, LINE)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--line", "no-such-line"], "line 'no-such-line' has no generations in"),
        (["--line", LINE, "--generation", "7"], f"line {LINE} has no generation 7"),
        (["--generation", "2"], "--generation applies to a line"),
        (["g1", "--line", LINE], "pass a run or --line, not both"),
        ([], "nothing to audit"),
    ],
)
def test_bad_requests_are_one_error_line(store, capsys, argv, message):
    build(store)
    assert main(["audit", *argv, "--store", store.root_uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_line_without_production_asks_for_a_generation(store, capsys):
    train(store, "g1", {n: digest(n) for n in TENSORS})
    decide(store, "g1", BASE, digest("base"), lines.REJECTED)
    with pytest.raises(InputError, match=f"no production model yet .* spectrum audit --line {LINE} --generation N"):
        audit_line(store, LINE)
    assert audit_line(store, LINE, generation=1)["target"]["decision"] == "rejected"


def test_a_generation_without_a_cpt_table_is_named(store):
    decide(store, "g1", BASE, digest("base"), lines.PROMOTED)
    with pytest.raises(InputError, match=r"generation 1 of line acme-legal \(run g1\) has no succeeded cpt stage"):
        audit_line(store, LINE)
