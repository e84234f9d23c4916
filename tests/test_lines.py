"""Model lines in the store (stages/store/lines.py): append-only generations and production pointer, on both backends."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from stages.base.errors import InputError
from stages.store import lines as L
from stages.store import open_store

LINE = "acme-legal"
BASE = {"uri": "hf://org/base", "sha256": "a" * 64}


def decide(store, run_id: str, decision: str = L.PROMOTED, drop: str | None = None, **extra):
    """A gate's decision on `run_id` (drop named after the run unless given)."""
    fields = {
        "drop": drop or f"drop-{run_id}",
        "run_id": run_id,
        "starting_model": BASE,
        "model": f"file:///models/{run_id}",
        "decision": decision,
        "reasons": [{"rule": "heldout_perplexity", "value": -0.02, "passed": decision == L.PROMOTED}],
    }
    return L.record_decision(store, LINE, **(fields | extra))


def snapshot(store) -> dict[str, bytes]:
    return {key: store.get_bytes(key) for key in store.list("lines/")}


def assert_only_appended(before: dict[str, bytes], after: dict[str, bytes], added: int) -> None:
    assert {k: after[k] for k in before} == before  # nothing earlier changed or vanished
    assert len(after) == len(before) + added


# --- generations ------------------------------------------------------------------------------


def test_generations_are_appended_contiguously_and_read_back(store):
    first, pointer = decide(store, "run-1")
    second, none = decide(store, "run-2", L.REJECTED)
    third, _ = decide(store, "run-3")

    assert [r.generation for r in (first, second, third)] == [1, 2, 3]
    assert none is None and pointer.generation == 1 and pointer.action == L.GATE
    assert L.generations(store, LINE) == [first, second, third]
    assert store.list(f"lines/{LINE}/generations/") == [f"lines/{LINE}/generations/{n}.json" for n in (1, 2, 3)]
    assert first.starting_model == BASE and first.decided_at.endswith("+00:00") and first.by["pid"]
    assert L.production(store, LINE).generation == 3  # gen 2 was rejected: production went 1 -> 3
    assert [p.generation for p in L.pointer_history(store, LINE)] == [1, 3]
    assert L.list_lines(store) == [LINE]


def test_one_record_per_run_and_per_drop_whoever_decides(store):
    first, pointer = decide(store, "run-1")
    before = snapshot(store)

    again, again_pointer = decide(store, "run-1", L.REJECTED)  # a taken-over run decides again: the first decision stands
    takeover, _ = decide(store, "run-1b", drop=first.drop)  # a new run of the same drop: that drop was decided

    assert again == first and again_pointer == pointer and takeover == first
    assert snapshot(store) == before


def test_racing_writers_get_one_record_per_number_no_gap_and_one_per_run(store):
    """4 threads (each its own store handle, like 4 watchers) append 2 runs each, and all 4 decide one shared run."""
    start = threading.Barrier(4)

    def writer(index: int) -> list[L.GenerationRecord]:
        mine = open_store(store.root_uri)
        start.wait(timeout=600)
        records = [decide(mine, f"run-{index}-{k}")[0] for k in range(2)]
        return [*records, decide(mine, "run-shared")[0]]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(writer, range(4)))

    records = L.generations(store, LINE)
    assert [r.generation for r in records] == list(range(1, 10))
    assert sorted(r.run_id for r in records) == sorted([f"run-{i}-{k}" for i in range(4) for k in range(2)] + ["run-shared"])
    assert len({result[-1].generation for result in results}) == 1  # every writer got the one record of the shared run
    history = L.pointer_history(store, LINE)
    gate = [p for p in history if p.action == L.GATE]
    # the gate promotes a generation once at most, and never one decided before a generation already recorded
    assert gate and len({p.generation for p in gate}) == len(gate)
    assert [p.seq for p in history] == list(range(1, len(history) + 1))


def test_racing_promotions_append_one_record_per_seq(store):
    for n in range(4):
        decide(store, f"run-{n}", L.REJECTED)
    start = threading.Barrier(4)

    def person(index: int) -> L.ProductionPointer:
        mine = open_store(store.root_uri)
        start.wait(timeout=600)
        return L.manual_promote(mine, LINE, f"run-{index}", f"person {index}")

    with ThreadPoolExecutor(4) as pool:
        pointers = list(pool.map(person, range(4)))

    history = L.pointer_history(store, LINE)
    assert sorted(p.seq for p in pointers) == [1, 2, 3, 4] and [p.seq for p in history] == [1, 2, 3, 4]
    assert sorted(p.why for p in history) == [f"person {i}" for i in range(4)]
    assert L.production(store, LINE) == history[-1]


def test_a_newer_generation_that_points_while_an_older_one_promotes_stays_production(store, monkeypatch):
    """Generation 1 passed the "newest?" check; generation 2 then recorded and took the pointer seq 1 wanted."""
    fields = {"starting_model": BASE, "decision": L.PROMOTED, "reasons": []}
    L.record_generation(store, LINE, drop="drop-1", run_id="run-1", model="file:///models/run-1", **fields)
    real = L.pointer_history
    raced: list = []

    def history_then_a_newer_generation_points(*args):
        before = real(*args)
        if not raced:
            raced.append("run-2")
            decide(store, "run-2")  # records generation 2 and points production at it (seq 1)
        return before  # what generation 1's promotion read: no pointer yet

    monkeypatch.setattr(L, "pointer_history", history_then_a_newer_generation_points)
    with pytest.raises(InputError, match="generation 2 was decided while this one was being promoted"):
        L.promote(store, LINE, 1, L.GATE, "passed the promotion gate")
    monkeypatch.undo()
    assert [(p.seq, p.generation) for p in L.pointer_history(store, LINE)] == [(1, 2)]
    assert L.production(store, LINE).generation == 2


# --- promotion by hand and rollback ------------------------------------------------------------------


def test_manual_promotion_and_rollback_append_and_change_nothing_earlier(store):
    decide(store, "run-1")
    decide(store, "run-2")
    rejected, _ = decide(store, "run-3", L.REJECTED)
    before = snapshot(store)

    manual = L.manual_promote(store, LINE, "run-3", "the gate's probe was broken for this drop", by="alice")
    after_manual = snapshot(store)
    back = L.rollback(store, LINE, 1, "regression reported")

    assert_only_appended(before, after_manual, 1)
    assert_only_appended(after_manual, snapshot(store), 1)
    assert (manual.seq, manual.generation, manual.action, manual.run_id, manual.model, manual.by) == (
        3, 3, L.MANUAL, "run-3", rejected.model, "alice"
    )
    assert (back.seq, back.generation, back.action, back.why) == (4, 1, L.ROLLBACK, "regression reported")
    assert L.production(store, LINE) == back
    status = L.line_status(store, LINE)
    assert [p["action"] for p in status["pointers"]] == [L.GATE, L.GATE, L.MANUAL, L.ROLLBACK]
    assert status["production"]["generation"] == 1 and len(status["generations"]) == 3


def test_a_line_without_records(store):
    assert L.production(store, LINE) is None
    assert L.line_status(store, LINE)["generations"] == [] and L.list_lines(store) == []


# --- refusals -----------------------------------------------------------------------------------


def test_refusals_name_the_field(store):
    decide(store, "run-1")
    decide(store, "run-2", L.REJECTED)
    before = snapshot(store)

    with pytest.raises(InputError, match=r"run run-9 is not a complete generation of line acme-legal"):
        L.manual_promote(store, LINE, "run-9", "why")
    with pytest.raises(InputError, match=r"generation 2 was never production"):
        L.rollback(store, LINE, 2, "why")
    with pytest.raises(InputError, match=r"generation 1: it is production already"):
        L.rollback(store, LINE, 1, "why")
    with pytest.raises(InputError, match=r"cannot promote run run-1: generation 1 is line acme-legal's production already"):
        L.manual_promote(store, LINE, "run-1", "why")
    with pytest.raises(InputError, match=r"line acme-legal has no generation 5 .*generations 1\.\.2"):
        L.rollback(store, LINE, 5, "why")
    with pytest.raises(InputError, match=r"generation must be a whole number"):
        L.promote(store, LINE, 0, L.MANUAL, "why")
    with pytest.raises(InputError, match=r"was rejected by its gate, so the gate cannot promote it"):
        L.promote(store, LINE, 2, L.GATE, "why")
    with pytest.raises(InputError, match=r"action must be one of gate, manual, rollback"):
        L.promote(store, LINE, 1, "sideways", "why")
    with pytest.raises(InputError, match=r"invalid line name '\.\./x'"):
        L.line_status(store, "../x")
    with pytest.raises(InputError, match=r"invalid run id 'a/b'"):
        decide(store, "a/b", drop="d")
    with pytest.raises(InputError, match=r"decision must be one of promoted, rejected"):
        decide(store, "run-3", "maybe")
    with pytest.raises(InputError, match=r"starting_model sha256"):
        decide(store, "run-3", starting_model={"uri": "x", "sha256": "short"})
    with pytest.raises(InputError, match=r"reasons must be a list"):
        decide(store, "run-3", reasons="passed")
    assert snapshot(store) == before


@pytest.mark.parametrize(
    ("key", "data", "message"),
    [
        ("lines/acme-legal/generations/notes.txt", b"hi", r"generations/notes\.txt is not a record of this line"),
        ("lines/acme-legal/generations/3.json", b"{}", r"generations/2\.json is missing although .*generations/3\.json exists"),
        ("lines/acme-legal/generations/2.json", b"{not json", r"generations/2\.json is not a generation record JSON document"),
        ("lines/acme-legal/generations/2.json", b"[1]", r"generations/2\.json is not a generation record \(a JSON object"),
        ("lines/acme-legal/generations/2.json", b'{"line": "acme-legal"}', r"2\.json is not a generation record .*missing field"),
        ("lines/acme-legal/production/02.json", b"{}", r"production/02\.json is not a record of this line"),
    ],
)
def test_foreign_or_damaged_records_are_errors_naming_the_key(store, key, data, message):
    decide(store, "run-1")
    store.put_bytes(key, data)

    with pytest.raises(InputError, match=message):
        L.line_status(store, LINE)
    with pytest.raises(InputError, match=message):
        decide(store, "run-2")


def test_a_record_of_another_line_or_number_is_refused(store):
    first, _ = decide(store, "run-1")
    store.put_bytes("lines/other/generations/1.json", store.get_bytes("lines/acme-legal/generations/1.json"))

    with pytest.raises(InputError, match=r"lines/other/generations/1\.json is not a generation record of line other .*'acme-legal'"):
        L.generations(store, "other")
    assert L.list_lines(store) == [LINE, "other"] and L.generations(store, LINE) == [first]


def test_skipped_drops_are_recorded_once(store):
    first = L.record_skipped_drop(store, LINE, "2023-12", "older than the last processed drop 2024-02")
    again = L.record_skipped_drop(store, LINE, "2023-12", "another watcher's words")

    assert again == first and L.skipped_drops(store, LINE) == [first]
    assert L.line_status(store, LINE)["skipped_drops"] == [first]
